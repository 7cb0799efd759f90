"""Run tracking of the server: the plain trackers, and ``open_tracker`` to pick a run's.

The ``Tracker`` protocol they implement (call order, resuming, never raising) is in
``fedspeech_server.tracker_protocol``.

* ``NullTracker``: records nothing.
* ``LocalTracker``: JSON files in the run folder (``params.json``, ``rounds.jsonl`` with one line
  per round, ``tracking.json`` with the run id, artifacts and final model).

* ``FanOutTracker``: several at once (``open_tracker``: MLflow + local when a tracking URI is set).
* ``UserLevelRelease``: what a run under user-level DP may send to a shared tracker (MLflow):
  only metrics that the DP mechanism covers, no per-client report (docs/privacy.md).
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedspeech.config import RunConfig
from fedspeech_features.files import atomic_write

# EndStatus and Tracker are re-exported: callers name them from here too.
from fedspeech_server.tracker_protocol import EndStatus as EndStatus
from fedspeech_server.tracker_protocol import Tracker as Tracker

log = logging.getLogger(__name__)

ROUNDS_FILE = "rounds.jsonl"
# What a run under user-level DP sends to MLflow: functions of the noised global models (central
# evaluation, update norm), the mechanism's own noisy or public values, and the size of the
# server's Poisson draw (its coins and the population: no client's data). Everything else a
# round summary holds comes from single clients' replies (loss, examples, epsilons, statuses,
# their timings) and stays in the run folder (LocalTracker).
USER_LEVEL_RELEASED = frozenset(
    {
        "wer",
        "cer",
        "update_norm",
        "eval_seconds",
        "clients_sampled",
        "exchanged_weights",
        "user_epsilon",
        "user_clip_norm",
        "user_noise_std",
        "user_sample_rate",
        "user_unclipped_share",
    }
)
RELEASE_NOTE_PARAM = "released-metrics"
PARAMS_FILE = "params.json"
TRACKING_FILE = "tracking.json"


class NullTracker:
    """Records nothing."""

    def __init__(self, run_id: str | None = None) -> None:
        self._run_id = run_id or uuid.uuid4().hex

    @property
    def run_id(self) -> str:
        """A random id (kept across resumes like any other)."""
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Ignore."""

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Ignore."""

    def log_artifacts(self, directory: Path) -> None:
        """Ignore."""

    def finish(self, model_dir: Path | None) -> None:
        """Ignore."""

    def fail(self, reason: str, status: EndStatus = "FAILED") -> None:
        """Ignore."""


class LocalTracker:
    """JSON files in the run folder: ``params.json``, ``rounds.jsonl``, ``tracking.json``.

    Args:
        run_dir: the run folder.
        run_id: the id to continue (resume); None starts a new run.
        named_by: a tracker whose run id replaces ``run_id`` when ``tracking.json`` is next
            written after the start (artifacts, finish, fail): an ``MlflowTracker``'s, which is
            known only once MLflow has answered. Until then ``run_id`` (its placeholder) names
            the run.
    """

    def __init__(
        self, run_dir: str | Path, run_id: str | None = None, *, named_by: Tracker | None = None
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._named_by = named_by
        self._run_id = run_id or uuid.uuid4().hex
        self._info: dict[str, Any] = {"run_id": self._run_id, "artifacts": [], "model_dir": None}
        previous = _read_json(self.run_dir / TRACKING_FILE)
        if run_id and previous.get("run_id") == run_id:
            self._info.update(previous)
            self._info.pop("error", None)  # a resumed run is running again
        self._info["status"] = "RUNNING"
        self._write_info()

    @property
    def run_id(self) -> str:
        """This run's id."""
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Write ``params.json``."""
        atomic_write(self.run_dir / PARAMS_FILE, json.dumps(dict(params), indent=2) + "\n")

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Append one line ``{"round": r, ...metrics}`` to ``rounds.jsonl``."""
        row = {"round": server_round, **{k: _json_number(v) for k, v in metrics.items()}}
        with open(self.run_dir / ROUNDS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def log_artifacts(self, directory: Path) -> None:
        """Note the artifact folder in ``tracking.json`` (the files already lie in the run)."""
        self._adopt_run_id()
        self._info["artifacts"] = sorted({*self._info["artifacts"], str(directory)})
        self._write_info()

    def finish(self, model_dir: Path | None) -> None:
        """Note the final model directory in ``tracking.json``."""
        self._adopt_run_id()
        self._info["model_dir"] = None if model_dir is None else str(model_dir)
        self._info["status"] = "FINISHED"
        self._write_info()

    def fail(self, reason: str, status: EndStatus = "FAILED") -> None:
        """Note the ``status`` (FAILED or KILLED) and the ``error`` in ``tracking.json``."""
        self._adopt_run_id()
        self._info.update(status=status, error=reason)
        self._write_info()

    def _adopt_run_id(self) -> None:
        if self._named_by is not None:
            self._run_id = self._info["run_id"] = self._named_by.run_id

    def _write_info(self) -> None:
        atomic_write(self.run_dir / TRACKING_FILE, json.dumps(self._info, indent=2) + "\n")


def open_tracker(cfg: RunConfig, run_dir: Path, run_id: str | None) -> Tracker:
    """The tracker for a run (``run_id``: the one to continue on resume).

    Always a ``LocalTracker`` in the run folder (a record that needs no server); with a
    ``tracking-uri`` also MLflow (``MlflowTracker``, which reaches MLflow on a thread of its own
    while the run goes on), whose run id then names the run in both.
    """
    if not cfg.fed.tracking_uri:
        return LocalTracker(run_dir, run_id)

    from fedspeech_server.mlflow_tracking import open_mlflow_tracker

    remote = open_mlflow_tracker(cfg, run_dir, run_id)
    shared: Tracker = UserLevelRelease(remote) if cfg.user_level_dp else remote
    return FanOutTracker(
        shared, LocalTracker(run_dir, run_id or remote.placeholder, named_by=remote)
    )


class UserLevelRelease:
    """Passes to ``inner`` only what the user-level guarantee covers (``USER_LEVEL_RELEASED``).

    Round metrics are filtered, artifacts (the per-client report) are withheld, and the params
    get one more entry, ``released-metrics``, saying what the run's metrics are.
    """

    def __init__(self, inner: Tracker) -> None:
        self.inner = inner

    @property
    def run_id(self) -> str:
        """The inner tracker's run id."""
        return self.inner.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Forward, with the ``released-metrics`` note."""
        note = (
            "user-level DP: " + ", ".join(sorted(USER_LEVEL_RELEASED)) + " only; wer, cer and "
            "update_norm are computed from the noised global models, user_* are the mechanism's "
            "noisy or public values, clients_sampled is the server's Poisson draw, exchanged_weights "
            "follows from the run config; per-client "
            "values stay in the server's run folder"
        )
        self.inner.log_params({**params, RELEASE_NOTE_PARAM: note})

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Forward the covered metrics only."""
        released = {k: v for k, v in metrics.items() if k in USER_LEVEL_RELEASED}
        self.inner.log_round(server_round, released)

    def log_artifacts(self, directory: Path) -> None:
        """Withhold: the reports hold per-client rows (they stay in the run folder)."""
        log.info("user-level DP: %s stays in the run folder, not sent to the tracker", directory)

    def finish(self, model_dir: Path | None) -> None:
        """Forward (the model is what the guarantee covers)."""
        self.inner.finish(model_dir)

    def fail(self, reason: str, status: EndStatus = "FAILED") -> None:
        """Forward that the run ended; the reason (it names clients) stays in the run folder."""
        del reason
        self.inner.fail(
            "the run stopped; the reason is in the server's run folder (tracking.json)", status
        )


class FanOutTracker:
    """Reports to several trackers; the first one's ``run_id`` is the run's id."""

    def __init__(self, primary: Tracker, *others: Tracker) -> None:
        self._trackers = (primary, *others)

    @property
    def run_id(self) -> str:
        """The primary tracker's run id."""
        return self._trackers[0].run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Forward to every tracker."""
        for t in self._trackers:
            t.log_params(params)

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Forward to every tracker."""
        for t in self._trackers:
            t.log_round(server_round, metrics)

    def log_artifacts(self, directory: Path) -> None:
        """Forward to every tracker."""
        for t in self._trackers:
            t.log_artifacts(directory)

    def finish(self, model_dir: Path | None) -> None:
        """Forward to every tracker."""
        for t in self._trackers:
            t.finish(model_dir)

    def fail(self, reason: str, status: EndStatus = "FAILED") -> None:
        """Forward to every tracker."""
        for t in self._trackers:
            t.fail(reason, status)


def close_unfinished_run(
    cfg: RunConfig, run_dir: Path, status: EndStatus, reason: str
) -> str | None:
    """End a tracking run that its server never closed (killed, interrupted, crashed).

    A ServerApp that is stopped from outside (Ctrl-C, SIGTERM, a crash of its process) cannot
    report: its run would stay RUNNING in ``tracking.json`` and in MLflow. The launcher calls
    this afterwards. A run the server closed itself is left as it is, with one exception: an
    interrupted launch (``KILLED``) overrides a FAILED that the server, being stopped, reported
    while it went down (its message is kept in the reason).

    Returns:
        The tracking run id (None: the run never opened one).
    """
    info = read_tracking_info(run_dir)
    run_id, current = info.get("run_id"), info.get("status")
    if not run_id or current not in ("RUNNING", "FAILED" if status == "KILLED" else "RUNNING"):
        return run_id
    if current == "FAILED":
        reason = f"{reason}; while it was stopped the server reported: {info.get('error')}"
    tracker = open_tracker(cfg, run_dir, run_id)
    tracker.fail(reason, status)
    return tracker.run_id


def read_tracking_info(run_dir: str | Path) -> dict[str, Any]:
    """A ``LocalTracker``'s ``tracking.json``: run id, ``status``, ``error``, model directory."""
    return _read_json(Path(run_dir) / TRACKING_FILE)


def read_rounds(run_dir: str | Path) -> list[dict[str, Any]]:
    """The training rounds' rows a ``LocalTracker`` appended to ``rounds.jsonl`` (round >= 1)."""
    return [row for row in _read_round_rows(run_dir) if row.get("round", 0) >= 1]


def read_start(run_dir: str | Path) -> dict[str, Any] | None:
    """The row of round 0, the starting model's evaluation (None: not evaluated)."""
    return next((row for row in _read_round_rows(run_dir) if row.get("round") == 0), None)


def _read_round_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / ROUNDS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _json_number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
