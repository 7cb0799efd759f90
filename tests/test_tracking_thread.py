"""The MLflow tracker's own sending thread (fedspeech_server.mlflow_tracking): the server's calls
return before MLflow answers, with their records on disk, and the run's records name MLflow's run."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fedspeech.config import RunConfig
from fedspeech_server.mlflow_tracking import PENDING, MlflowTracker
from fedspeech_server.tracking import open_tracker, read_tracking_info
from fedspeech_server.tracking_buffer import BUFFER_FILE, load_ops, read_run_ids, save_ops


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.chdir(tmp_path)


@contextlib.contextmanager
def hung_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A URL on 127.0.0.1 whose server accepts connections and never answers; its connections."""
    held: list[socket.socket] = []
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.2)

        def accept() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    held.append(server.accept()[0])

        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        try:
            yield f"http://127.0.0.1:{server.getsockname()[1]}", held
        finally:
            stop.set()
            acceptor.join()
            for connection in held:
                connection.close()


def test_the_run_folder_and_checkpoint_name_mlflows_run_across_a_resume(tmp_path: Path) -> None:
    # Prepare: a run tracked in a real sqlite MLflow store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = RunConfig.from_flat({"tracking-uri": uri, "experiment-name": "bg"})
    run_dir = tmp_path / "run"
    # Execute: a run that stops after round 1, then its resume, which finishes
    first = open_tracker(cfg, run_dir, None)
    placeholder = read_tracking_info(run_dir)["run_id"]  # what names the run at first
    first.log_params(cfg.to_flat())
    first.log_round(1, {"wer": 0.8})
    run_id = first.run_id  # the checkpoint's (FederatedRun.finish_round)
    first.fail("stopped after round 1", "KILLED")
    killed = read_tracking_info(run_dir)
    second = open_tracker(cfg, run_dir, run_id)
    second.log_round(2, {"wer": 0.6})
    second.finish(None)
    # Assert: the placeholder named the run until MLflow answered, and maps to its run
    assert placeholder.startswith(PENDING) and run_id != placeholder
    assert read_run_ids(run_dir)[placeholder] == run_id
    assert killed["run_id"] == run_id and killed["status"] == "KILLED"
    # Assert: MLflow holds one run with both rounds, finished; the folder names that run
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {m.step: m.value for m in client.get_metric_history(run_id, "wer")} == {1: 0.8, 2: 0.6}
    assert len(client.search_runs([run.info.experiment_id])) == 1
    info = json.loads((run_dir / "tracking.json").read_text(encoding="utf-8"))
    assert info["run_id"] == run_id and info["status"] == "FINISHED"


def test_a_tracking_server_that_never_answers_holds_up_no_call_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    with hung_server() as (url, held), caplog.at_level(logging.WARNING):
        cfg = RunConfig.from_flat({"tracking-uri": url})
        # Execute: a run's calls while the server hangs (each request waits 3 s for it)
        tracker = open_tracker(cfg, run_dir, None)
        tracker.log_params(cfg.to_flat())
        tracker.log_round(1, {"wer": 0.8})
        # Assert: they returned before the first request to MLflow gave up (a tracker that
        # waited for MLflow would have warned of the outage by now), their records on disk
        assert "unavailable" not in caplog.text
        assert [op["op"] for op in load_ops(run_dir / BUFFER_FILE)] == ["params", "text", "metrics"]
        # Execute: the end waits for the tracker, which gives up on the server
        tracker.finish(None)
        assert held  # the tracker did reach the server
    # Assert: every record waits in the run folder for the server's return, under the run's id
    assert "MLflow tracking at" in caplog.text and "unavailable" in caplog.text
    ops = load_ops(run_dir / BUFFER_FILE)
    assert [op["op"] for op in ops] == ["params", "text", "metrics", "artifacts", "terminate"]
    assert ops[2]["metrics"] == {"wer": 0.8}
    info = read_tracking_info(run_dir)
    assert info["status"] == "FINISHED" and info["run_id"].startswith(PENDING)
    assert {op["run_id"] for op in ops} == {info["run_id"]}


def test_a_call_after_the_end_still_reaches_mlflow(tmp_path: Path) -> None:
    # Prepare: a finished run (its sending thread ends)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "fed", "r", tmp_path / "run")
    tracker.log_round(1, {"wer": 0.8})
    tracker.finish(None)
    # Execute: a late call, as a launcher closing a run it found unfinished would make
    tracker.fail("stopped from outside", "KILLED")
    # Assert: MLflow has it
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert (
        run.info.status == "KILLED" and run.data.tags["fedspeech.error"] == "stopped from outside"
    )


def test_a_record_mlflow_took_just_before_a_crash_is_not_logged_twice_on_resume(
    tmp_path: Path,
) -> None:
    # Prepare: round 1 reached MLflow, but the process died before taking it off the buffer file
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MlflowTracker(uri, "fed", "r", tmp_path / "run")
    first.log_round(1, {"wer": 0.8, "cer": 0.5})
    assert first.flush()
    client = MlflowClient(tracking_uri=uri)
    (sent,) = client.get_metric_history(first.run_id, "wer")
    still_on_file = {
        "op": "metrics",
        "step": 1,
        "timestamp": sent.timestamp,
        "run_id": first.run_id,
    }
    save_ops(
        tmp_path / "run" / BUFFER_FILE, [{**still_on_file, "metrics": {"wer": 0.8, "cer": 0.5}}]
    )
    # Execute: the resumed run replays the file, then logs round 2
    second = MlflowTracker(uri, "fed", "r", tmp_path / "run", resume_run_id=first.run_id)
    second.log_round(2, {"wer": 0.6, "cer": 0.4})
    second.finish(None)
    # Assert: each round once in MLflow; the file is gone
    for key, values in {"wer": [0.8, 0.6], "cer": [0.5, 0.4]}.items():
        history = client.get_metric_history(first.run_id, key)
        assert sorted((m.step, m.value) for m in history) == [(1, values[0]), (2, values[1])]
    assert not (tmp_path / "run" / BUFFER_FILE).exists()
