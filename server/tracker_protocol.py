"""What the server reports a run to: the ``Tracker`` protocol and how an unfinished run ends.

A module of its own, imported by every tracker (``fedspeech_server.tracking`` with the plain
ones, ``fedspeech_server.mlflow_tracking``) and by what drives them, so that the MLflow tracker
needs nothing from ``tracking`` (which imports it lazily) and the two do not import each other.

The server calls, in order: ``log_params`` once per fresh run, ``log_round`` after every round
(after the checkpoint is on disk), then ``log_artifacts`` and ``finish`` at the end, or ``fail``
with the reason when the run stops early. The server keeps the tracker's ``run_id`` in every
checkpoint (from round 1's: a tracker may still be opening before), so a resumed run reopens the
same tracking run. Trackers must not raise for tracking trouble (a server that is down): warn and
carry on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

EndStatus = Literal["FAILED", "KILLED"]  # how a run that did not finish ended (MLflow's names)


class Tracker(Protocol):
    """What the server reports to; ``run_id`` is stored in the checkpoint for resuming."""

    @property
    def run_id(self) -> str:
        """Identifier of the tracking run (reopened on resume); a tracker that reaches its
        server in the background (``MlflowTracker``) answers once it has tried."""
        ...

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record the resolved run config (flat kebab-case keys) once per run."""
        ...

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Record one round's metrics (``fedspeech_server.rounds.RoundSummary.metrics()``)."""
        ...

    def log_artifacts(self, directory: Path) -> None:
        """Record the files in ``directory`` (reports: per-client table, history)."""
        ...

    def finish(self, model_dir: Path | None) -> None:
        """Record the final model directory and close the run."""
        ...

    def fail(self, reason: str, status: EndStatus = "FAILED") -> None:
        """Close the run as ``FAILED`` (or ``KILLED``: interrupted), keeping ``reason`` (a resume
        reopens it)."""
        ...
