"""The MLflow calls behind ``MlflowTracker``: open a run, apply one recorded operation, register.

Everything takes an explicit ``MlflowClient`` and run id (never the fluent ``mlflow.*`` API with
its process-global active run). Operations are JSON-able dicts (see ``fedspeech_server.tracking_buffer``):
``params``, ``metrics``, ``text``, ``tag``, ``artifacts``, ``register``, ``terminate``.

``mlflow`` is imported by the functions that call it, not with this module (~1.1 s): the tracker
records operations with the plain helpers here at once and imports MLflow on its sending thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedspeech_server.tracking_buffer import Op

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "MODEL_ARTIFACT_PATH",
    "apply_op",
    "configure_http_client",
    "flatten_params",
    "is_permanent",
    "metric_history",
    "open_run",
]

log = logging.getLogger(__name__)

MODEL_ARTIFACT_PATH = "model"
# MLflow's limits (mlflow.utils.validation): longer param values are rejected by some stores.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
# Error codes that mean "MLflow understood and refused": retrying cannot help.
PERMANENT_ERRORS = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_STATE",
        "BAD_REQUEST",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
    }
)


def configure_http_client(timeout_s: int = 10, max_retries: int = 0, backoff_s: int = 1) -> None:
    """Bound how long one MLflow HTTP call may stall (unless the user set these variables).

    MLflow's defaults (120 s timeout, 7 retries with exponential back-off) would hold a federated
    round for minutes while a tracking server is down; the tracker retries on later calls
    instead. These are process-wide ``MLFLOW_HTTP_REQUEST_*`` environment variables, which
    MLflow reads on every request; values already set win.

    Args:
        timeout_s: seconds per HTTP request.
        max_retries: retries within one request.
        backoff_s: back-off factor between those retries.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(backoff_s))


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a (nested) config into MLflow param strings.

    Booleans become ``true``/``false``, ``None`` the empty string, lists JSON; values longer than
    MLflow's limit are cut (the tracker also logs the untruncated config as an artifact).

    >>> flatten_params({"dp": True, "model": {"hidden-size": 256}, "target-epsilon": None})
    {'dp': 'true', 'model.hidden-size': '256', 'target-epsilon': ''}
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif value is None:
            text = ""
        elif isinstance(value, list | tuple):
            text = json.dumps(list(value), default=str)
        else:
            text = str(value)
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - 3] + "..."
        flat[name[:MAX_KEY]] = text
    return flat


def is_permanent(err: Exception) -> bool:
    """Whether MLflow refused a request for good (as opposed to being unreachable)."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.error_code in PERMANENT_ERRORS


def sqlite_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a new experiment in a sqlite store: ``<db folder>/mlruns/<experiment>``.

    MLflow's own default is ``./mlruns`` in whatever the working directory happens to be.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not db_path or db_path == ":memory:":
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment) or "experiment"
    return (Path(db_path).resolve().parent / "mlruns" / safe).as_uri()


def open_run(
    client: MlflowClient,
    experiment: str,
    run_name: str,
    *,
    resume_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> tuple[str, bool]:
    """Reattach ``resume_run_id`` (status RUNNING again) or create a run in ``experiment``.

    The experiment is created when missing (restored when deleted). An unknown ``resume_run_id``
    gives a new run, tagged ``fedspeech.resume_of``.

    Returns:
        (run id, whether it is the resumed run).
    """
    found = client.get_experiment_by_name(experiment)
    if found is None:
        location = sqlite_artifact_location(client.tracking_uri, experiment)
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
        if found.lifecycle_stage == "deleted":
            log.warning("restoring deleted MLflow experiment %r", experiment)
            client.restore_experiment(experiment_id)
    run_tags = dict(tags or {})
    if resume_run_id:
        try:
            run = client.get_run(resume_run_id)
        except Exception as err:
            if not is_permanent(err):
                raise
            log.warning("cannot resume MLflow run %s (%s); starting a new run", resume_run_id, err)
            run_tags["fedspeech.resume_of"] = resume_run_id
        else:
            if run.info.lifecycle_stage == "deleted":
                client.restore_run(resume_run_id)
            client.update_run(resume_run_id, status="RUNNING")
            log.info("MLflow: resumed run %s", resume_run_id)
            return resume_run_id, True
    run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
    log.info("MLflow: run %s in experiment %r", run.info.run_id, experiment)
    return str(run.info.run_id), False


def metric_history(client: MlflowClient, run_id: str) -> dict[str, dict[int, float]]:
    """Every metric of a run: name -> {step: value}."""
    return {
        key: {int(m.step): float(m.value) for m in client.get_metric_history(run_id, key)}
        for key in client.get_run(run_id).data.metrics
    }


def apply_op(client: MlflowClient, run_id: str, op: Op) -> None:
    """Send one recorded operation to the run; raises what MLflow raises.

    An operation replayed from a buffer file may have reached MLflow already (the process
    stopped after sending it, before taking it off the file). Sent again, params keep their
    first values, tags, text, artifacts and the run's end are set again, a SQL store keeps
    one row per metric value, step and time (``test_tracking_thread.py``), and ``register``
    finds the version it made before (``register_model``).
    """
    from mlflow.entities import Metric

    kind = op["op"]
    if kind == "params":
        _log_params(client, run_id, op["params"])
    elif kind == "metrics":
        metrics = [Metric(k, v, op["timestamp"], op["step"]) for k, v in op["metrics"].items()]
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            batch = metrics[start : start + METRICS_PER_BATCH]
            client.log_batch(run_id, metrics=batch, synchronous=True)
    elif kind == "text":
        client.log_text(run_id, op["text"], op["artifact_file"])
    elif kind == "tag":
        client.set_tag(run_id, op["key"], op["value"])
    elif kind == "artifacts":
        local_dir = Path(op["local_dir"])
        if not local_dir.is_dir():
            log.warning("artifact folder %s no longer exists; not uploaded", local_dir)
            return
        client.log_artifacts(run_id, str(local_dir), op["artifact_path"])
    elif kind == "register":
        register_model(client, run_id, op["name"], op.get("model_dir"))
    elif kind == "terminate":
        client.set_terminated(run_id, op["status"])
    else:
        log.warning("unknown tracking operation %r dropped", kind)


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    # MLflow params are write-once: a resumed run keeps the first values (and we say so).
    existing = client.get_run(run_id).data.params
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    if changed:
        log.warning("MLflow params keep the run's first values; changed on resume: %s", changed)
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for start in range(0, len(new), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=new[start : start + PARAMS_PER_BATCH], synchronous=True)


# provenance keys (model directory config.json) that become tags of the logged model and version
PRIVACY_TAGS = ("privacy_unit", "epsilon", "delta", "accountant", "user_epsilon", "user_delta")
PRIVATE_ALIAS, PLAIN_ALIAS = "latest-private", "latest"


def register_model(
    client: MlflowClient, run_id: str, name: str, model_dir: str | Path | None = None
) -> str:
    """Register the run's final model as a new version of ``name``; returns the version.

    With ``model_dir`` (the model directory: safetensors + config.json, no pickle, no MLmodel
    flavor, so MLflow never loads it) the model is an MLflow 3 LoggedModel of the run, tagged
    with the privacy it was trained under (``PRIVACY_TAGS`` of its provenance, and
    ``data_hours`` where known), and the version gets the alias ``latest-private`` (a DP model)
    or ``latest``. Without it (an operation buffered by an older version) the source is the
    run's ``model/`` artifacts, as then.

    Registering is idempotent for a model directory: the version and the logged model carry
    its files' SHA-256 (tag ``model_sha256``), and a version of ``name`` from this run with the
    same digest is returned as it is (a replayed operation: the process stopped after MLflow
    took it, before it was taken off the buffer file). A resumed run that trained on registers
    its new model as a new version.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="fedspeech acoustic model (BiGRU-CTC)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {"format": "fedspeech-model", "files": "model.safetensors,config.json"}
    source, model_id, alias = f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}", None, None
    if model_dir is not None and Path(model_dir, "config.json").is_file():
        provenance = json.loads(Path(model_dir, "config.json").read_text(encoding="utf-8"))
        provenance = provenance.get("provenance") or {}
        alias = PRIVATE_ALIAS if provenance.get("dp") else PLAIN_ALIAS
        tags["model_sha256"] = _model_digest(Path(model_dir))
        done = _registered_already(client, name, run_id, tags["model_sha256"])
        if done is not None:  # a replay: MLflow took this operation before
            client.set_registered_model_alias(name, alias, done)
            log.info("MLflow: model %s version %s holds this model already", name, done)
            return done
        tags |= {k: str(provenance[k]) for k in PRIVACY_TAGS if provenance.get(k) is not None}
        if provenance.get("hours") is not None:
            tags["data_hours"] = str(provenance["hours"])
        if (provenance.get("run_config") or {}).get("init-model"):
            tags["init_model"] = str(provenance["run_config"]["init-model"])
        logged = _logged_model(client, name, run_id, tags, Path(model_dir))
        # the logged model's own artifact location: a models:/<id> source makes the registry
        # store look the model up through the global tracking URI, not this client's
        source, model_id = logged.artifact_location, logged.model_id
    version = client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags=tags,
        description=(
            "Model directory (safetensors + config.json, no pickle). Fetch with "
            f"`mlflow artifacts download -u models:/{name}/<version> -d DIR`, then "
            "`fedspeech transcribe --model DIR AUDIO`."
        ),
        await_creation_for=0,  # local registries are READY at once; never poll a server
        model_id=model_id,
    )
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    log.info("MLflow: registered model %s version %s (%s)", name, version.version, source)
    return str(version.version)


def _model_digest(model_dir: Path) -> str:
    """SHA-256 over a model directory's files (their names and bytes, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _registered_already(client: MlflowClient, name: str, run_id: str, digest: str) -> str | None:
    """The version of ``name`` this run registered for the model with ``digest``, if any."""
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        if version.name == name and version.tags.get("model_sha256") == digest:
            return str(version.version)
    return None


def _logged_model(
    client: MlflowClient, name: str, run_id: str, tags: Mapping[str, str], model_dir: Path
) -> Any:
    """The run's READY LoggedModel ``name`` of this model (``tags["model_sha256"]``), created
    and uploaded if there is none (a registration stopped before its version exists)."""
    experiment_id = client.get_run(run_id).info.experiment_id
    for logged in client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}'"
    ):
        if (
            logged.name == name
            and str(logged.status) == "READY"
            and logged.tags.get("model_sha256") == tags["model_sha256"]
        ):
            return logged
    logged = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, tags=dict(tags), model_type="bigru-ctc"
    )
    client.log_model_artifacts(logged.model_id, str(model_dir))
    client.finalize_logged_model(logged.model_id, "READY")
    return logged
