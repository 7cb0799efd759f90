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

from flwr.app import Context, Message
from flwr.app import Error as FlowerError
from flwr.clientapp import ClientApp

from fedspeech.app.local_engine import DirectGrid

SECAGG_CONFIGS = "secaggplus_configs"  # Flower's SecAgg+ record name


@dataclass(frozen=True)
class Delivery:
    """One message handled by a node: its SecAgg+ stage (or ``plain``), outcome and duration."""

    stage: str
    node: int
    ok: bool
    seconds: float


class InProcessGrid(DirectGrid):
    """Delivers copies of the messages to ``app`` (see the module docstring).

    Args:
        app: the ClientApp every node runs.
        contexts: node id -> that node's Context.
    """

    def __init__(self, app: ClientApp, contexts: Mapping[int, Context]) -> None:
        super().__init__(contexts)
        self.app = app
        self.replies: list[Message] = []
        self.deliveries: list[Delivery] = []

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
