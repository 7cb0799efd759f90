"""A Flower ``Grid`` that hands every call to another: the base of the server's grid wrappers.

The strategy's cohort grid (only the drawn nodes are connected) and SecAgg+'s tracing grid
(time, bytes and failures per protocol stage) each change one method; the rest is this.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class ForwardingGrid(Grid):
    """Every ``Grid`` method of ``inner``, unchanged; subclasses override what they change."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run: Run) -> None:
        """The wrapped Grid's."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """The wrapped Grid's."""
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """The wrapped Grid's."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """The wrapped Grid's."""
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """The wrapped Grid's."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The wrapped Grid's."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """The wrapped Grid's."""
        return self.inner.send_and_receive(messages, timeout=timeout)
