"""The tracker opened on a thread of its own (fedspeech_server.background_tracker): the server's
calls never wait for it to open, reach it in order, and the run's records name MLflow's run."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from fedspeech.config import RunConfig
from fedspeech_server.background_tracker import BackgroundTracker
from fedspeech_server.tracker_protocol import EndStatus
from fedspeech_server.tracking import open_tracker, read_tracking_info
from fedspeech_server.tracking_buffer import BUFFER_FILE, PENDING, load_ops, read_run_ids

GATE_S = 30.0  # the longest a test's tracker waits to be let open


class Recorder:
    """A tracker that notes its calls and the thread each came on."""

    def __init__(self, run_id: str = "mlflow-run-7") -> None:
        self.run_id = run_id
        self.calls: list[tuple[Any, ...]] = []
        self.threads: set[str] = set()

    def _note(self, *call: Any) -> None:
        self.calls.append(call)
        self.threads.add(threading.current_thread().name)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._note("params", dict(params))

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        self._note("round", server_round, dict(metrics))

    def log_artifacts(self, directory: Path) -> None:
        self._note("artifacts", directory)

    def finish(self, model_dir: Path | None) -> None:
        self._note("finish", model_dir)

    def fail(self, reason: str, status: EndStatus = "FAILED") -> None:
        self._note("fail", reason, status)


class GatedOpen:
    """A tracker factory that opens only once ``gate`` is set (as MLflow takes ~2 s)."""

    def __init__(self, tracker: Recorder) -> None:
        self.tracker = tracker
        self.gate = threading.Event()
        self.given: list[str] = []
        self.returned = threading.Event()

    def __call__(self, run_id: str) -> Recorder:
        self.given.append(run_id)
        self.gate.wait(GATE_S)
        self.returned.set()
        return self.tracker


def test_calls_do_not_wait_for_the_tracker_to_open_and_reach_it_in_order() -> None:
    # Prepare: a tracker still opening
    inner = Recorder()
    opener = GatedOpen(inner)
    tracker = BackgroundTracker(opener, name="test")
    # Execute: the server's calls of a run, while the tracker is not open
    tracker.log_params({"lr": 0.001})
    metrics = {"wer": 0.9}
    tracker.log_round(0, metrics)
    metrics["wer"] = 0.1  # the caller's dict changes after the call: the call keeps its values
    tracker.log_round(1, {"wer": 0.8})
    tracker.log_artifacts(Path("report"))
    # Assert: every call returned before the tracker opened, and none reached it yet
    assert not opener.returned.is_set() and inner.calls == []
    assert tracker.placeholder.startswith(PENDING) and opener.given == [tracker.placeholder]
    # Execute: let it open; finish waits for everything to be delivered
    opener.gate.set()
    tracker.finish(Path("model"))
    # Assert: in the order made, on the tracker's own thread; the run id is the tracker's
    assert inner.calls == [
        ("params", {"lr": 0.001}),
        ("round", 0, {"wer": 0.9}),
        ("round", 1, {"wer": 0.8}),
        ("artifacts", Path("report")),
        ("finish", Path("model")),
    ]
    assert inner.threads == {"fedspeech-test-tracker"}
    assert tracker.run_id == "mlflow-run-7"


def test_run_id_waits_until_the_tracker_is_open() -> None:
    # Prepare
    opener = GatedOpen(Recorder("mlflow-run-9"))
    tracker = BackgroundTracker(opener, "pending-abc", name="test")
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.append(tracker.run_id))
    # Execute: ask for the run id while the tracker opens
    reader.start()
    reader.join(0.5)
    # Assert: no answer before it is open (the placeholder is not handed out as the run id)
    assert reader.is_alive() and seen == []
    assert opener.given == ["pending-abc"] and tracker.placeholder == "pending-abc"
    opener.gate.set()
    reader.join(GATE_S)
    assert seen == ["mlflow-run-9"]
    tracker.fail("stopped", "KILLED")
    assert opener.tracker.calls == [("fail", "stopped", "KILLED")]


def test_a_tracker_that_cannot_open_is_reported_and_the_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: a tracker whose import fails
    def broken(run_id: str) -> Recorder:
        raise ImportError("No module named 'mlflow'")

    tracker = BackgroundTracker(broken, name="MLflow")
    # Execute: the whole run's calls
    with caplog.at_level(logging.ERROR, logger="fedspeech_server.background_tracker"):
        tracker.log_params({"lr": 0.001})
        tracker.log_round(1, {"wer": 0.8})
        tracker.finish(None)
        tracker.fail("late")  # after finish: dropped as well
    # Assert: one error naming the tracker and the import; the run keeps its placeholder
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "MLflow" in errors[0].getMessage()
    assert "No module named 'mlflow'" in caplog.text
    assert tracker.run_id == tracker.placeholder


def test_a_call_that_raises_is_reported_and_later_calls_still_arrive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: a tracker that breaks its protocol (raises) on one round
    class Flaky(Recorder):
        def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
            if server_round == 1:
                raise RuntimeError("refused round 1")
            super().log_round(server_round, metrics)

    inner = Flaky()
    tracker = BackgroundTracker(lambda run_id: inner, name="test")
    # Execute
    with caplog.at_level(logging.ERROR, logger="fedspeech_server.background_tracker"):
        tracker.log_round(1, {"wer": 0.8})
        tracker.log_round(2, {"wer": 0.7})
        tracker.finish(None)
    # Assert: round 1 reported as dropped; round 2 and the end delivered
    assert "refused round 1" in caplog.text and "dropped" in caplog.text
    assert inner.calls == [("round", 2, {"wer": 0.7}), ("finish", None)]


def test_a_call_after_the_end_runs_on_the_callers_thread() -> None:
    # Prepare: a finished run
    inner = Recorder()
    tracker = BackgroundTracker(lambda run_id: inner, name="test")
    tracker.finish(None)
    # Execute: a late call (a launcher closing the run again)
    tracker.fail("late", "KILLED")
    # Assert: delivered at once, here
    assert inner.calls[-1] == ("fail", "late", "KILLED")
    assert threading.current_thread().name in inner.threads


def test_an_mlflow_run_opened_in_the_background_is_named_alike_in_mlflow_and_the_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a run tracked in a real sqlite MLflow store
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)
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
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a "server" on 127.0.0.1 that accepts connections and never answers
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.chdir(tmp_path)
    held: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.2)
        stop = threading.Event()

        def accept() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    held.append(server.accept()[0])

        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        port = server.getsockname()[1]
        cfg = RunConfig.from_flat({"tracking-uri": f"http://127.0.0.1:{port}"})
        run_dir = tmp_path / "run"
        try:
            # Execute: a run's calls while the server hangs
            tracker = open_tracker(cfg, run_dir, None)
            tracker.log_params(cfg.to_flat())
            tracker.log_round(1, {"wer": 0.8})
            # Assert: they returned before the MLflow tracker had them (a tracker that got
            # them after its first request timed out would have buffered them on disk)
            assert not (run_dir / BUFFER_FILE).exists()
            # Execute: the end waits for the tracker, which gives up on the server
            tracker.finish(None)
        finally:
            stop.set()
            acceptor.join()
            for connection in held:
                connection.close()
    # Assert: every record waits in the run folder for the server's return, under the run's id
    ops = load_ops(run_dir / BUFFER_FILE)
    assert [op["op"] for op in ops] == ["params", "text", "metrics", "artifacts", "terminate"]
    assert ops[2]["metrics"] == {"wer": 0.8}
    info = read_tracking_info(run_dir)
    assert info["status"] == "FINISHED" and info["run_id"].startswith(PENDING)
    assert {op["run_id"] for op in ops} == {info["run_id"]} and held
