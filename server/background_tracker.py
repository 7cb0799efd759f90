"""A tracker opened and fed on a thread of its own, so that opening it does not hold up round 1.

Opening the MLflow tracker costs about 2 s on the server before it has logged anything:
importing ``mlflow`` (~1.1 s) and opening a SQL store (SQLAlchemy, alembic: ~0.6 s), then
creating the run (docs/benchmarks.md, "Federation overhead"). ``BackgroundTracker`` does that on
one daemon thread and hands every later call to the same thread, in order, so the server starts
round 1 at once. The cost moves, it does not vanish: the thread takes a core's share while the
clients train.

``run_id`` waits until the tracker is open, and is then the tracker's own (MLflow's run id, or its
``pending-`` placeholder while MLflow is unreachable): what the server stores in its checkpoint
is exact. Until then ``placeholder`` names the run: a new run's ``pending-<hex>``, which the
tracker adopts (``fedspeech_server.mlflow_tracking``: ``mlflow_runs.json`` maps it to the MLflow
run), or on resume the id the run had. ``finish`` and ``fail`` wait for the thread to deliver
everything (with a progress line every ``PROGRESS_S``); a call after them runs on the caller's
thread. A tracker that cannot be opened at all (its import fails) is logged once, and its calls
are dropped: the run goes on, recorded in the run folder (``LocalTracker``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedspeech_server.tracker_protocol import EndStatus, Tracker
from fedspeech_server.tracking_buffer import new_placeholder

__all__ = ["BackgroundTracker"]

log = logging.getLogger(__name__)

PROGRESS_S = 10.0  # seconds between "still waiting" lines while finish/fail wait for the thread

Call = Callable[[Tracker], None]


class BackgroundTracker:
    """Opens ``open_inner(placeholder)`` on a thread and forwards every call to it there.

    Args:
        open_inner: builds the tracker, given the run id it is to continue (``placeholder``).
        run_id: the run to continue (resume); None starts a new one.
        name: what the log lines call the tracker (``"MLflow"``).
    """

    def __init__(
        self, open_inner: Callable[[str], Tracker], run_id: str | None = None, *, name: str
    ) -> None:
        self.placeholder = run_id or new_placeholder()
        self.name = name
        self._inner: Tracker | None = None
        self._opened = threading.Event()
        self._calls: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._work, args=(open_inner,), name=f"fedspeech-{name}-tracker", daemon=True
        )
        self._thread.start()

    @property
    def run_id(self) -> str:
        """The tracker's run id; waits until it is open (module doc)."""
        self._opened.wait()
        return self._inner.run_id if self._inner is not None else self.placeholder

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Forward (on the thread)."""
        params = dict(params)
        self._forward(lambda t: t.log_params(params))

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Forward (on the thread)."""
        metrics = dict(metrics)
        self._forward(lambda t: t.log_round(server_round, metrics))

    def log_artifacts(self, directory: Path) -> None:
        """Forward (on the thread)."""
        self._forward(lambda t: t.log_artifacts(directory))

    def finish(self, model_dir: Path | None) -> None:
        """Forward, then wait until the thread has delivered every call."""
        self._forward(lambda t: t.finish(model_dir))
        self._drain()

    def fail(self, reason: str, status: EndStatus = "FAILED") -> None:
        """Forward, then wait until the thread has delivered every call."""
        self._forward(lambda t: t.fail(reason, status))
        self._drain()

    def _forward(self, call: Call) -> None:
        if self._thread.is_alive():
            self._calls.put(call)
        elif self._inner is not None:  # after finish/fail: on this thread
            _deliver(self._inner, call, self.name)

    def _drain(self) -> None:
        if not self._thread.is_alive():
            return
        self._calls.put(None)
        self._thread.join(PROGRESS_S)
        while self._thread.is_alive():
            log.info("waiting for %s to take the run's last records", self.name)
            self._thread.join(PROGRESS_S)

    def _work(self, open_inner: Callable[[str], Tracker]) -> None:
        try:
            self._inner = open_inner(self.placeholder)
        except Exception:
            log.exception(
                "could not open the %s tracker: this run is recorded in its folder only", self.name
            )
        finally:
            self._opened.set()
        while (call := self._calls.get()) is not None:
            if self._inner is not None:
                _deliver(self._inner, call, self.name)


def _deliver(tracker: Tracker, call: Call, name: str) -> None:
    try:
        call(tracker)
    except Exception:  # trackers must not raise (tracker_protocol); never end the thread for it
        log.exception("the %s tracker failed a call; it is dropped", name)
