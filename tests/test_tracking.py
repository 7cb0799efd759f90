"""MLflow tracking against real stores: sqlite in tmp_path and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fedspeech.app.flower_launch import free_port
from fedspeech_server.mlflow_ops import apply_op, flatten_params
from fedspeech_server.mlflow_tracking import MlflowTracker
from fedspeech_server.tracking_buffer import BUFFER_FILE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROUND_METRICS = {
    1: {"train_loss": 3.1, "wer": 0.95, "cer": 0.7, "epsilon_max": 1.2, "epsilon_mean": 1.0},
    2: {"train_loss": 2.4, "wer": 0.80, "cer": 0.5, "epsilon_max": 1.9, "epsilon_mean": 1.6},
}


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    # The tracker sets these for http URIs (process-wide); set here, they are restored afterwards.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    # Any store MLflow might open implicitly lands here, not in the repo (asserted below).
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)


def _model_dir(root: Path) -> Path:
    model = root / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"not-really-safetensors")
    provenance = {"dp": True, "privacy_unit": "sample", "epsilon": 7.9, "accountant": "rdp"}
    config = {"format": "fedspeech-model", "provenance": provenance}
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return model


def _report_dir(root: Path) -> Path:
    report = root / "report"
    report.mkdir(parents=True)
    (report / "clients.tsv").write_text("client\tepsilon\n0\t1.9\n", encoding="utf-8")
    return report


def _steps(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _artifacts(client: MlflowClient, run_id: str, path: str) -> set[str]:
    return {f.path for f in client.list_artifacts(run_id, path)}


def test_flatten_params_strings_nested_and_truncated() -> None:
    # Execute
    flat = flatten_params({"a": {"b": [1, 2]}, "dp": False, "long": "x" * 7000, "none": None})

    # Assert
    assert flat["a.b"] == "[1, 2]"
    assert flat["dp"] == "false"
    assert flat["none"] == ""
    assert len(flat["long"]) == 6000 and flat["long"].endswith("...")


def test_run_records_params_metrics_artifacts_and_registered_model(tmp_path: Path) -> None:
    # Prepare
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    model = _model_dir(tmp_path)
    tracker = MlflowTracker(uri, "fed", "run-1", tmp_path / "run", registered_model_name="asr")

    # Execute
    tracker.log_params({"num-rounds": 2, "dp": True, "model": {"hidden-size": 64}})
    for rnd, metrics in ROUND_METRICS.items():
        tracker.log_round(rnd, {**metrics, "clients_ok": 2, "clients_failed": 0})
    tracker.log_artifacts(_report_dir(tmp_path))
    tracker.finish(model)

    # Assert
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["num-rounds"] == "2"
    assert run.data.params["model.hidden-size"] == "64"
    assert _steps(client, tracker.run_id, "wer") == {1: 0.95, 2: 0.80}
    assert _steps(client, tracker.run_id, "clients_ok") == {1: 2.0, 2: 2.0}
    assert _artifacts(client, tracker.run_id, "model") == {
        "model/model.safetensors",
        "model/config.json",
    }
    assert {"plots/wer_cer.png", "plots/epsilon.png"} <= _artifacts(client, tracker.run_id, "plots")
    assert _artifacts(client, tracker.run_id, "report") == {"report/clients.tsv"}
    params_json = client.download_artifacts(tracker.run_id, "config/params.json", str(tmp_path))
    assert json.loads(Path(params_json).read_text())["model"] == {"hidden-size": 64}
    plot = client.download_artifacts(tracker.run_id, "plots/wer_cer.png", str(tmp_path))
    assert Path(plot).read_bytes().startswith(PNG_MAGIC)
    version = client.get_model_version("asr", "1")
    assert version.run_id == tracker.run_id
    # ... as an MLflow 3 LoggedModel of the run, tagged with its privacy, aliased private
    (logged,) = client.search_logged_models([run.info.experiment_id])
    assert version.source == logged.artifact_location  # (sqlite's registry keeps no model_id)
    assert logged.source_run_id == tracker.run_id and logged.status == "READY"
    files = client.list_logged_model_artifacts(logged.model_id)
    assert {f.path for f in files} == {"model.safetensors", "config.json"}
    assert version.tags["epsilon"] == "7.9" and version.tags["privacy_unit"] == "sample"
    assert logged.tags["accountant"] == "rdp"
    assert str(client.get_model_version_by_alias("asr", "latest-private").version) == "1"
    assert not (tmp_path / "run" / BUFFER_FILE).exists()
    assert not (tmp_path / "cwd" / "mlflow.db").exists()
    assert not (tmp_path / "cwd" / "mlruns").exists()


def test_a_replayed_registration_adds_no_version_and_a_new_model_does(tmp_path: Path) -> None:
    # Prepare: a run whose model MLflow registered, the operation still on the buffer file
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.create_run(client.create_experiment("fed")).info.run_id
    model = _model_dir(tmp_path)
    register = {"op": "register", "name": "asr", "model_dir": str(model)}
    apply_op(client, run_id, register)
    # Execute: the operation is replayed; then the run (resumed) trains on and registers again
    apply_op(client, run_id, register)
    replayed = client.search_model_versions("name = 'asr'")
    (model / "model.safetensors").write_bytes(b"weights-after-more-rounds")
    apply_op(client, run_id, register)
    # Assert: the replay found the version (and logged model) it made; the new model is version 2
    assert [str(v.version) for v in replayed] == ["1"]
    versions = sorted(client.search_model_versions("name = 'asr'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2"]
    assert versions[0].tags["model_sha256"] != versions[1].tags["model_sha256"]
    experiment_id = client.get_run(run_id).info.experiment_id
    assert len(client.search_logged_models([experiment_id])) == 2
    assert str(client.get_model_version_by_alias("asr", "latest-private").version) == "2"


def test_a_registration_stopped_before_its_version_reuses_its_logged_model(
    tmp_path: Path,
) -> None:
    # Prepare: the model was logged (READY) but its version never made it (the process stopped)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.create_run(client.create_experiment("fed")).info.run_id
    register = {"op": "register", "name": "asr", "model_dir": str(_model_dir(tmp_path))}
    apply_op(client, run_id, register)
    client.delete_model_version("asr", "1")
    # Execute: the record is replayed
    apply_op(client, run_id, register)
    # Assert: a version again, from the one logged model
    experiment_id = client.get_run(run_id).info.experiment_id
    (logged,) = client.search_logged_models([experiment_id])
    (version,) = client.search_model_versions("name = 'asr'")
    assert version.source == logged.artifact_location and version.run_id == run_id


def test_user_level_dp_runs_send_mlflow_only_what_the_mechanism_covers(tmp_path: Path) -> None:
    # Prepare: the trackers a user-level DP run opens (MLflow behind the release filter + local)
    from fedspeech.config import RunConfig
    from fedspeech_server.tracking import USER_LEVEL_RELEASED, open_tracker, read_rounds

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    flat = {"privacy-unit": "user", "tracking-uri": uri, "experiment-name": "fed"}
    cfg = RunConfig.from_flat(flat)
    tracker = open_tracker(cfg, tmp_path / "run", None)
    per_client = {"train_loss": 2.0, "num_examples": 40.0, "clients_ok": 3.0, "retries": 0.0}
    covered = {"wer": 0.8, "user_epsilon": 1.5, "user_noise_std": 0.01, "clients_sampled": 3.0}
    # Execute
    tracker.log_params(cfg.to_flat())
    tracker.log_round(1, {**per_client, **covered})
    tracker.log_artifacts(_report_dir(tmp_path))
    tracker.fail("round 2: partition-3 failed: its own secret reason")
    # Assert: MLflow holds the covered metrics only, no report, no client's reason
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert set(run.data.metrics) == set(covered) and set(covered) <= USER_LEVEL_RELEASED
    assert _artifacts(client, tracker.run_id, "report") == set()
    assert "user-level DP" in run.data.params["released-metrics"]
    assert run.info.status == "FAILED"
    assert "partition-3" not in json.dumps(run.data.tags)
    # Assert: the server's own run folder keeps everything
    (row,) = read_rounds(tmp_path / "run")
    assert row["train_loss"] == 2.0 and row["wer"] == 0.8


def test_resume_continues_the_same_run(tmp_path: Path) -> None:
    # Prepare: phase 1 logs round 1 and stops without finishing (a crash or --stop-after)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MlflowTracker(uri, "fed", "run-1", tmp_path / "run")
    first.log_params({"num-rounds": 2, "lr": 0.001})
    first.log_round(1, ROUND_METRICS[1])

    # Execute: phase 2 reattaches, re-logs its config (one value changed), logs round 2
    second = MlflowTracker(uri, "fed", "run-1", tmp_path / "run", resume_run_id=first.run_id)
    second.log_params({"num-rounds": 2, "lr": 0.01})
    second.log_round(2, ROUND_METRICS[2])
    second.finish(_model_dir(tmp_path))

    # Assert
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert second.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.001"  # MLflow params are write-once: the first value stays
    assert _steps(client, first.run_id, "wer") == {1: 0.95, 2: 0.80}
    assert _steps(client, first.run_id, "epsilon_max") == {1: 1.2, 2: 1.9}
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_unknown_resume_id_starts_a_new_run(tmp_path: Path) -> None:
    # Execute
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "fed", "r", tmp_path / "run", resume_run_id="0" * 32)

    # Assert
    assert tracker.run_id != "0" * 32 and not tracker.run_id.startswith("pending-")


def test_outage_never_raises_and_buffers_to_disk(tmp_path: Path) -> None:
    # Prepare: an http tracking URI on a closed loopback port
    uri = f"http://127.0.0.1:{free_port()}"
    run_folder = tmp_path / "run"

    # Execute: everything the server loop calls (how long an outage holds each call:
    # benchmarks/fast_paths.py)
    tracker = MlflowTracker(uri, "fed", "r", run_folder, retry_interval_s=0)
    tracker.log_params({"num-rounds": 2})
    for rnd, metrics in ROUND_METRICS.items():
        tracker.log_round(rnd, metrics)
    tracker.log_artifacts(_report_dir(tmp_path))
    tracker.finish(_model_dir(tmp_path))

    # Assert
    assert tracker.run_id.startswith("pending-")
    lines = [json.loads(x) for x in (run_folder / BUFFER_FILE).read_text().splitlines()]
    ops = [x["op"] for x in lines]
    assert ops.count("metrics") == 2 and "params" in ops and ops[-1] == "terminate"
    assert (run_folder / "plots" / "wer_cer.png").read_bytes().startswith(PNG_MAGIC)


def test_buffer_flushed_when_store_returns_and_replayed_by_next_tracker(tmp_path: Path) -> None:
    # Prepare: a sqlite store that cannot open (its folder is a file) = MLflow unavailable
    blocker = tmp_path / "store"
    blocker.write_text("in the way", encoding="utf-8")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"
    crashed = MlflowTracker(uri, "fed", "r", tmp_path / "run", retry_interval_s=0)
    crashed.log_params({"num-rounds": 2})
    crashed.log_round(1, ROUND_METRICS[1])
    crashed.flush()  # its thread's attempts end before the store comes back
    assert crashed.run_id.startswith("pending-") and (tmp_path / "run" / BUFFER_FILE).is_file()

    # Execute: the process "dies"; the store comes back; the server resumes with the id it had
    blocker.unlink()
    resumed = MlflowTracker(
        uri, "fed", "r", tmp_path / "run", resume_run_id=crashed.run_id, retry_interval_s=0
    )
    resumed.log_round(2, ROUND_METRICS[2])
    resumed.finish(None)

    # Assert: round 1 (from the buffer file) and round 2 are in one run; the buffer is gone
    client = MlflowClient(tracking_uri=uri)
    assert not resumed.run_id.startswith("pending-")
    assert _steps(client, resumed.run_id, "wer") == {1: 0.95, 2: 0.80}
    assert client.get_run(resumed.run_id).data.params["num-rounds"] == "2"
    assert not (tmp_path / "run" / BUFFER_FILE).exists()


def test_placeholder_id_resumes_the_run_created_later(tmp_path: Path) -> None:
    # Prepare: phase 1 starts offline (its checkpoint keeps the placeholder id), then MLflow
    # comes back mid-run and the run is created
    blocker = tmp_path / "store"
    blocker.write_text("in the way", encoding="utf-8")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"
    first = MlflowTracker(uri, "fed", "r", tmp_path / "run", retry_interval_s=0)
    placeholder = first.run_id
    blocker.unlink()
    first.log_round(1, ROUND_METRICS[1])
    first.flush()  # calls return at once; this waits for the sending thread
    assert first.run_id != placeholder

    # Execute: resume with the placeholder
    second = MlflowTracker(uri, "fed", "r", tmp_path / "run", resume_run_id=placeholder)
    second.log_round(2, ROUND_METRICS[2])
    second.flush()

    # Assert
    assert second.run_id == first.run_id
    client = MlflowClient(tracking_uri=uri)
    assert _steps(client, first.run_id, "wer") == {1: 0.95, 2: 0.80}


# ---------------------------------------------------------------------- real mlflow server


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} not healthy after {timeout_s} s")


class MlflowServers:
    """Starts ``mlflow server`` processes on 127.0.0.1 and stops every one of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, port: int) -> str:
        """Start a server with a sqlite store under ``root``; return its URL once healthy."""
        self.root.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        with (self.root / "server.log").open("ab") as log:
            proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, timeout_s=90)
        return url

    def stop_all(self) -> None:
        """SIGTERM each server's process group (uvicorn workers included), then SIGKILL."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)


@pytest.fixture
def mlflow_servers(tmp_path: Path) -> Iterator[MlflowServers]:
    """Real MLflow servers on demand; always stopped at teardown."""
    servers = MlflowServers(tmp_path / "server")
    try:
        yield servers
    finally:
        servers.stop_all()


def test_server_down_then_up_receives_buffered_metrics(
    tmp_path: Path, mlflow_servers: MlflowServers
) -> None:
    # Prepare: no server yet at the tracking URI
    port = free_port()
    tracker = MlflowTracker(
        f"http://127.0.0.1:{port}", "fed", "r", tmp_path / "run", retry_interval_s=0
    )
    tracker.log_params({"num-rounds": 3})
    tracker.log_round(1, ROUND_METRICS[1])
    tracker.log_round(2, ROUND_METRICS[2])
    tracker.flush()  # calls return at once; this waits for the sending thread's attempt
    assert tracker.run_id.startswith("pending-") and (tmp_path / "run" / BUFFER_FILE).is_file()

    # Execute: the server comes up mid-run; the next round's call flushes the buffer
    url = mlflow_servers.start(port)
    tracker.log_round(3, {"wer": 0.7})
    tracker.finish(_model_dir(tmp_path))

    # Assert
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    assert _steps(client, tracker.run_id, "wer") == {1: 0.95, 2: 0.80, 3: 0.7}
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert "model/model.safetensors" in _artifacts(client, tracker.run_id, "model")
    assert client.get_model_version("fedspeech", "1").run_id == tracker.run_id
    assert not (tmp_path / "run" / BUFFER_FILE).exists()


@pytest.mark.slow
def test_server_going_down_mid_run_loses_nothing(
    tmp_path: Path, mlflow_servers: MlflowServers
) -> None:
    # Prepare: a tracking server that is up for round 1
    port = free_port()
    url = mlflow_servers.start(port)
    tracker = MlflowTracker(url, "fed", "r", tmp_path / "run", retry_interval_s=0)
    tracker.log_params({"num-rounds": 3})
    tracker.log_round(1, ROUND_METRICS[1])
    assert tracker.flush() and not tracker.run_id.startswith("pending-")

    # Execute: the server dies; round 2 is logged during the outage; the server comes back
    mlflow_servers.stop_all()
    tracker.log_round(2, ROUND_METRICS[2])
    assert not tracker.flush()
    buffered = (tmp_path / "run" / BUFFER_FILE).read_text()
    mlflow_servers.start(port)  # the same store
    tracker.log_round(3, {"wer": 0.7})
    tracker.finish(_model_dir(tmp_path))

    # Assert: round 2 waited in the run folder, then reached MLflow; every round is there once
    assert '"step": 2' in buffered
    client = MlflowClient(tracking_uri=url)
    assert _steps(client, tracker.run_id, "wer") == {1: 0.95, 2: 0.80, 3: 0.7}
    assert len(client.get_metric_history(tracker.run_id, "wer")) == 3
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert not (tmp_path / "run" / BUFFER_FILE).exists()
