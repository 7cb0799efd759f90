"""A Flower ``Grid`` that runs a ClientApp in this process: ServerApp code without a federation.

Every message is delivered as a deep copy (as if serialized) to ``app`` with the destination
node's own ``Context`` (the simulation engine keeps one per node, so mods such as SecAgg+ keep
their state across messages), an exception becomes an error reply as in Flower, and everything
that comes back is recorded: the replies the server side received, per message the protocol stage
and whether it succeeded, and the seconds each ClientApp call took. Used by the secure
aggregation tests and ``benchmarks/secagg_cost.py``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message
from flwr.app import Error as FlowerError
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

SECAGG_CONFIGS = "secaggplus_configs"  # Flower's SecAgg+ record name


@dataclass(frozen=True)
class Delivery:
    """One message handled by a node: its SecAgg+ stage (or ``plain``), outcome and duration."""

    stage: str
    node: int
    ok: bool
    seconds: float


class InProcessGrid(Grid):
    """Delivers copies of the messages to ``app`` (see the module docstring).

    Args:
        app: the ClientApp every node runs.
        contexts: node id -> that node's Context.
    """

    def __init__(self, app: ClientApp, contexts: Mapping[int, Context]) -> None:
        self.app = app
        self.contexts = dict(contexts)
        self.replies: list[Message] = []
        self.deliveries: list[Delivery] = []

    def set_run(self, run: Run) -> None:
        """Unused: there is no SuperLink."""

    @property
    def run(self) -> Run:
        """Unused: there is no SuperLink."""
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Unused: strategies build their messages themselves."""
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        """The nodes of the federation."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Unused: see ``send_and_receive``."""
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Unused: see ``send_and_receive``."""
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run every message through its node's ClientApp, one after the other."""
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            delivered = Message(  # type: ignore[call-overload]
                content=copy.deepcopy(message.content), metadata=copy.deepcopy(message.metadata)
            )
            start = time.perf_counter()
            try:
                reply = self.app(delivered, self.contexts[node])
            except Exception as exc:  # Flower turns a ClientApp exception into an error reply
                reply = Message(FlowerError(code=1, reason=repr(exc)), reply_to=delivered)
            seconds = time.perf_counter() - start
            self.deliveries.append(
                Delivery(stage_of(message), node, not reply.has_error(), seconds)
            )
            replies.append(copy.deepcopy(reply))
        self.replies.extend(replies)
        return replies


def stage_of(message: Message) -> str:
    """The SecAgg+ stage a message asks for (``plain``: not a SecAgg+ message)."""
    record = message.content.config_records.get(SECAGG_CONFIGS)
    return str(record.get("stage", "")) if record is not None else "plain"
