"""MLflow tracker of the federated server: config, per-round metrics, artifacts, registered model.

Implements ``fedspeech_server.tracker_protocol.Tracker`` with an explicit ``MlflowClient`` and run
id. Tracking must never cost the training run: every call appends operations to a queue, which is
mirrored to ``<run_folder>/tracking_buffer.jsonl`` before the call returns, and a thread of the
tracker's own sends them to MLflow in order (``fedspeech_server.mlflow_ops``), removing each from
the file once MLflow has it. That thread also imports ``mlflow`` (~1.1 s) and opens its store
(~0.6 s for a SQL one), so the server's rounds go on meanwhile, and a tracking server that hangs
holds up none of the server's calls. When MLflow is unreachable (server down at start or mid-run,
database locked) the tracker warns once per outage, keeps the queue and retries on later calls (at
most every ``retry_interval_s``); once MLflow answers the queue is sent and the file removed. A
tracker built on the same run folder later (``--resume`` after a crash) replays what the file
still holds. Errors retrying cannot fix (MLflow refusing a value) are logged and that operation
dropped. No method raises. ``finish``, ``fail`` and ``flush`` return once the thread has tried to
send what they queued (with a line every ``PROGRESS_S`` while it takes long).

``run_id`` waits for the thread's first attempt to reach MLflow (the server first reads it for
round 1's checkpoint). If that attempt failed, it is a placeholder ``pending-<hex>`` until MLflow
answers; resuming with it reattaches the MLflow run created for it later
(``<run_folder>/mlflow_runs.json``) or, if there never was one, creates the run and replays the
buffered rounds into it.

``finish`` uploads the model directory (``model.safetensors`` + ``config.json``) as plain files
under ``model/``, PNG plots of WER/CER, epsilon and loss per round under ``plots/``, and registers
``runs:/<run_id>/model`` as a version of the registered model. MLflow never loads the model (no
MLmodel flavor, nothing pickled): ``mlflow artifacts download -u models:/<name>/<version> -d DIR``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedspeech.config import RunConfig
from fedspeech_server.mlflow_ops import (
    MAX_PARAM_VALUE,
    apply_op,
    configure_http_client,
    flatten_params,
    is_permanent,
    metric_history,
    open_run,
)
from fedspeech_server.tracker_protocol import EndStatus
from fedspeech_server.tracking_buffer import (
    BUFFER_FILE,
    Op,
    load_ops,
    read_run_ids,
    remember_run_id,
    save_ops,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["MlflowTracker", "open_mlflow_tracker"]

log = logging.getLogger(__name__)

PENDING = "pending-"
PROGRESS_S = 10.0  # seconds between "still sending" lines while a call waits for the thread


class MlflowTracker:
    """Records one federated training run in MLflow; survives tracking outages (module doc).

    Args:
        tracking_uri: e.g. ``sqlite:///mlflow.db`` or ``http://127.0.0.1:5000``.
        experiment: experiment name (created when missing).
        run_name: display name of a new run.
        run_folder: the training run's local folder (buffer file and plots go there).
        resume_run_id: continue this run (an MLflow id or a ``pending-`` placeholder).
        registered_model_name: registry name for the final model; ``None`` skips registering.
        retry_interval_s: minimum seconds between reconnection attempts during an outage.

    Example:
        >>> tracker = MlflowTracker("sqlite:///mlflow.db", "fedspeech", "demo", Path("runs/demo"))
        ... # doctest: +SKIP
        >>> tracker.log_round(1, {"wer": 0.8, "epsilon_max": 1.2})  # doctest: +SKIP
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_folder: Path | str,
        resume_run_id: str | None = None,
        *,
        registered_model_name: str | None = "fedspeech",
        retry_interval_s: float = 30.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_folder = Path(run_folder)
        self.registered_model_name = registered_model_name
        self.retry_interval_s = retry_interval_s
        self._placeholder = f"{PENDING}{uuid.uuid4().hex}"
        if resume_run_id and resume_run_id.startswith(PENDING):
            self._placeholder = resume_run_id  # its buffered records are this run's
            resume_run_id = read_run_ids(self.run_folder).get(resume_run_id)
        self._resume_run_id = resume_run_id
        self._run_id: str | None = None
        self._client: MlflowClient | None = None
        self._history: dict[str, dict[int, float]] = {}
        self._pending: list[Op] = load_ops(self.buffer_path)
        if self._pending:
            log.info(
                "replaying %d tracking record(s) from %s", len(self._pending), self.buffer_path
            )
        self._offline = False
        self._next_attempt = 0.0
        if tracking_uri.startswith(("http://", "https://")):
            configure_http_client()
        # The sending thread: ``_asked`` counts requests to send, ``_tried`` those it has tried;
        # ``_lock`` guards them, ``_pending`` with its file, and ``_history``;
        # that thread runs while there is something to send, and ends after finish/fail.
        self._lock = threading.Condition()
        self._asked = self._tried = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        self._first_try = threading.Event()
        self._ask(force=True)

    @property
    def placeholder(self) -> str:
        """The ``pending-<hex>`` id that names the run until MLflow has answered."""
        return self._placeholder

    @property
    def run_id(self) -> str:
        """The MLflow run id, or ``placeholder`` while MLflow has not answered; waits for the
        first attempt to reach it."""
        self._first_try.wait()
        return self._current_id()

    @property
    def buffer_path(self) -> Path:
        """Where operations waiting for MLflow are mirrored during an outage."""
        return self.run_folder / BUFFER_FILE

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log the resolved run config as params (flattened) and as ``config/params.json``."""
        text = json.dumps(dict(params), indent=2, sort_keys=True, default=str)
        self._submit(
            {"op": "params", "params": flatten_params(params)},
            {"op": "text", "artifact_file": "config/params.json", "text": text},
        )

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Log one round's metrics (any keys) with ``step=server_round``; kept for the plots."""
        values: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                log.debug("metric %s=%r is not a number; not logged", key, value)
        with self._lock:
            for key, value in values.items():
                self._history.setdefault(key, {})[server_round] = value
        timestamp = int(time.time() * 1000)
        self._submit(
            {"op": "metrics", "step": server_round, "timestamp": timestamp, "metrics": values}
        )

    def log_artifacts(self, directory: Path | str, artifact_path: str | None = None) -> None:
        """Upload the files under ``directory`` as ``<artifact_path>/...``.

        Args:
            directory: e.g. the run's ``report/`` folder (per-client table, history). Files are
                read when uploaded, which may be later during an outage: keep them.
            artifact_path: folder in the run's artifacts; defaults to the directory's name.
        """
        path = Path(directory)
        name = artifact_path or path.name
        self._submit({"op": "artifacts", "local_dir": str(path), "artifact_path": name})

    def finish(self, model_dir: Path | str | None) -> None:
        """Upload the model and plots, register the model, and end the run as FINISHED."""
        from fedspeech_server.plots import plot_round_metrics  # lazy: matplotlib

        self.flush()  # attaches a resumed run (and its earlier rounds, for the plots)
        ops: list[Op] = []
        if model_dir is not None:
            ops.append({"op": "artifacts", "local_dir": str(model_dir), "artifact_path": "model"})
            if self.registered_model_name:
                ops.append(
                    {
                        "op": "register",
                        "name": self.registered_model_name,
                        "model_dir": str(model_dir),
                    }
                )
        try:
            plot_dir = self.run_folder / "plots"
            if plot_round_metrics(self._history, plot_dir):
                ops.append(
                    {"op": "artifacts", "local_dir": str(plot_dir), "artifact_path": "plots"}
                )
        except Exception:  # plots are a nicety: never fail the run for them
            log.exception("could not draw the round plots")
        ops.append({"op": "terminate", "status": "FINISHED"})
        self._wait(self._submit(*ops))
        self._close()

    def fail(self, reason: str = "", status: EndStatus = "FAILED") -> None:
        """End the run as FAILED, or KILLED when it was interrupted, keeping the reason."""
        self._wait(
            self._submit(
                {"op": "tag", "key": "fedspeech.error", "value": reason[:MAX_PARAM_VALUE]},
                {"op": "terminate", "status": status},
            )
        )
        self._close()

    def flush(self) -> bool:
        """Try to send everything pending now, regardless of the retry interval; waits for it.

        Returns:
            ``True`` when nothing is left pending.
        """
        self._wait(self._ask(force=True))
        with self._lock:
            return not self._pending

    # ------------------------------------------------------------------ queue and replay
    def _current_id(self) -> str:
        return self._run_id or self._placeholder

    def _submit(self, *ops: Op) -> int:
        """Queue ``ops`` (in the buffer file before this returns); the thread's request number."""
        with self._lock:
            self._pending.extend(ops)
            self._save_buffer()
        return self._ask()

    def _ask(self, *, force: bool = False) -> int:
        with self._lock:
            if force:
                self._next_attempt = 0.0
            self._asked += 1
            self._closing = False
            self._lock.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._send_loop, name="fedspeech-mlflow", daemon=True
                )
                self._thread.start()
            return self._asked

    def _close(self) -> None:
        """Let the thread end once it has nothing left to try (a later call starts another)."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()

    def _wait(self, request: int) -> None:
        """Until the thread has tried request number ``request``."""
        with self._lock:
            while not self._lock.wait_for(lambda: self._tried >= request, PROGRESS_S):
                log.info("still sending %d record(s) to MLflow", len(self._pending))

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._asked > self._tried or self._closing)
                if self._asked == self._tried:  # closing with nothing to try
                    self._thread = None
                    return
                request = self._asked
            try:
                self._try_send()
            finally:  # whatever happened, no caller waits for this request forever
                self._first_try.set()
                with self._lock:
                    self._tried = request
                    self._lock.notify_all()

    def _try_send(self) -> None:
        if time.monotonic() < self._next_attempt:
            return
        try:
            self._send_pending()
        except Exception as err:  # an outage: keep everything, retry later
            self._next_attempt = time.monotonic() + self.retry_interval_s
            self._report_outage(err)
        else:
            if self._offline:
                log.info("MLflow at %s reachable again; buffer flushed", self.tracking_uri)
            self._offline = False

    def _send_pending(self) -> None:
        if self._client is None:
            from mlflow import MlflowClient  # lazy: ~1.1 s, on this thread

            self._client = MlflowClient(
                tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
            )
        client = self._client
        if self._run_id is None:
            tags = {"fedspeech.run_folder": str(self.run_folder.resolve())}
            run_id, resumed = open_run(
                client, self.experiment, self.run_name, resume_run_id=self._resume_run_id, tags=tags
            )
            if resumed:  # earlier rounds, for the plots (values seen here win)
                earlier = metric_history(client, run_id)
                with self._lock:
                    for key, points in earlier.items():
                        self._history[key] = {**points, **self._history.get(key, {})}
            self._run_id = run_id
            try:
                remember_run_id(self.run_folder, self._placeholder, run_id)
            except OSError as err:
                log.warning("could not record the run id in %s: %s", self.run_folder, err)
        while True:
            with self._lock:
                if not self._pending:
                    return
                op = self._pending[0]
            target = self._target_run(op)
            if target is None:  # buffered by a run abandoned before MLflow ever saw it
                log.warning("dropping %s of abandoned tracking run %s", op["op"], op.get("run_id"))
            else:
                try:
                    apply_op(client, target, op)
                except Exception as err:
                    if not is_permanent(err):
                        raise
                    log.warning("MLflow refused %s (dropped): %s", op["op"], err)
            with self._lock:
                self._pending.pop(0)
                self._save_buffer()

    def _target_run(self, op: Op) -> str | None:
        """The MLflow run an operation belongs to (``None``: its run never existed)."""
        run_id = op.get("run_id")
        if not run_id or run_id == self._placeholder:
            return self._run_id
        if str(run_id).startswith(PENDING):
            return read_run_ids(self.run_folder).get(str(run_id))
        return str(run_id)

    def _report_outage(self, err: Exception) -> None:
        if self._offline:
            log.debug("MLflow still unavailable: %s", err)
            return
        self._offline = True
        first_line = str(err).splitlines()[0][:300] if str(err) else ""
        log.warning(
            "MLflow tracking at %s unavailable (%s: %s); training continues, %d record(s) "
            "kept in %s and retried every %.0f s",
            self.tracking_uri,
            type(err).__name__,
            first_line,
            len(self._pending),
            self.buffer_path,
            self.retry_interval_s,
        )

    def _save_buffer(self) -> None:
        """Mirror ``_pending`` to the buffer file (with ``_lock`` held)."""
        ops = [{**op, "run_id": op.get("run_id") or self._current_id()} for op in self._pending]
        try:
            save_ops(self.buffer_path, ops)
        except OSError as err:
            log.warning("could not write the tracking buffer %s: %s", self.buffer_path, err)


def open_mlflow_tracker(cfg: RunConfig, run_dir: Path, run_id: str | None) -> MlflowTracker:
    """The MLflow tracker for a run (a ``fedspeech_server.run.TrackerFactory``).

    Uses ``tracking-uri``, ``experiment-name`` (also the registered model's name) and ``run-name``
    (default: the run folder's name); ``run_id`` is the run to continue on resume.
    """
    fed = cfg.fed
    return MlflowTracker(
        fed.tracking_uri,
        fed.experiment_name,
        fed.run_name or Path(run_dir).resolve().name,
        run_dir,
        resume_run_id=run_id or None,
        registered_model_name=fed.experiment_name,
    )
