"""The local engine (``fedspeech simulate --engine local``): failures stay with their node.

A ClientApp that raises answers with an error reply; a worker process that dies mid-message
fails that message only (the other nodes of the round reply, the worker is replaced, the next
round has every node back); a message past ``round-timeout`` gets no reply and its worker is
restarted. In every case the run goes on, the failures are counted, and the privacy spent by a
node that crashed after training stays charged. A resumed run continues its ledgers and its
MLflow run as on Flower's runtime. The happy path (epsilon, declines, MLflow) is
``tests/test_federation.py``, parametrized over both engines.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import Message, RecordDict

from fedspeech.app import interrupts
from fedspeech.app.cli import _build_parser
from fedspeech.app.cli import main as cli_main
from fedspeech.app.local_engine import _AffinityQueue, kept_workers, server_identity
from fedspeech.app.simulate import SimulationOutcome, choose_engine, simulate
from fedspeech.config import ConfigError, RunConfig
from fedspeech.fed_data import client_manifest
from fedspeech.modeldir import load_model_dir
from fedspeech_client.local_round import round_steps
from fedspeech_client.node_state import load_ledger
from fedspeech_features.manifest import read_manifest
from tests.conftest import TINY_SIMULATION, run_processes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny synthetic corpus (and feature cache) for the module's simulations."""
    return tmp_path_factory.mktemp("local-engine-data")


@pytest.fixture()
def no_workers_left() -> Iterator[None]:
    """Afterwards no worker process of this test's pool may be alive."""
    yield
    assert not multiprocessing.active_children()


def _round_steps(data_dir: Path, overrides: dict[str, object], partition: int) -> int:
    """DP-SGD steps one round of ``partition`` (of 3) takes: one epoch of its examples."""
    cfg = RunConfig.from_flat({**overrides, "num-partitions": 3})
    size = len(read_manifest(client_manifest(cfg, data_dir, partition, 3)))
    _, steps = round_steps(size, int(overrides["batch-size"]), 1)  # type: ignore[call-overload]
    return int(steps)


def _ledger_steps(run_dir: Path, partition: int) -> int | None:
    """Steps in ``partition``'s saved privacy ledger (None: no ledger)."""
    ledger = load_ledger(run_dir / "client-state" / f"partition-{partition}.json", 1e-5)
    return None if ledger is None else ledger.num_steps


def _overrides(data_dir: Path, run_dir: Path, **more: object) -> dict[str, object]:
    return {
        **TINY_SIMULATION,
        "data-dir": str(data_dir),
        "tracking-uri": f"sqlite:///{run_dir.parent / 'mlflow.db'}",
        "min-successful-clients": 2,
        **more,
    }


class _KillOnMarker:
    """Kills each process that announces a ``hang`` in ``marker`` (``FEDSPEECH_FAULT_MARKER``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker
        self.killed: list[int] = []
        self._seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> _KillOnMarker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            lines = self.marker.read_text().splitlines() if self.marker.exists() else []
            for line in lines[self._seen :]:
                pid, kind = line.split()[:2]
                if kind.startswith("hang"):
                    os.kill(int(pid), signal.SIGKILL)
                    self.killed.append(int(pid))
            self._seen = len(lines)


@pytest.mark.usefixtures("no_workers_left")
def test_a_raising_client_and_a_killed_worker_fail_only_their_own_messages(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: partition 0 raises in round 1; partition 1's worker is killed in round 2 after
    # it trained (its ledger is saved before the fault acts, as in a real crash)
    run_dir = tmp_path / "run"
    overrides = _overrides(data_dir, run_dir, **{"num-server-rounds": 3})
    marker = tmp_path / "faults.txt"
    monkeypatch.setenv("FEDSPEECH_FAULT", "0:raise@1,1:hang=120@2")
    monkeypatch.setenv("FEDSPEECH_FAULT_MARKER", str(marker))
    # Execute
    with _KillOnMarker(marker) as killer:
        outcome = simulate(overrides=overrides, num_supernodes=3, out=run_dir, engine="local")
    # Assert: every round ran with the other two nodes, and round 3 with all three again
    assert outcome.finished and outcome.rounds == 3
    assert len(killer.killed) == 1
    counts = [(h["clients_ok"], h["clients_failed"]) for h in outcome.history]
    assert counts == [(2, 1), (2, 1), (3, 0)]
    # ... and each failure is counted in its partition's row (the replies that failed carried
    # no partition id: the server knows it from the node's other rounds)
    lines = (run_dir / "report" / "clients.tsv").read_text().splitlines()
    rows = {r.split("\t")[0]: dict(zip(lines[0].split("\t"), r.split("\t"), strict=True))
            for r in lines[1:]}  # fmt: skip
    assert sorted(rows) == ["partition-0", "partition-1", "partition-2"]
    assert [rows[f"partition-{i}"]["rounds_failed"] for i in range(3)] == ["1", "1", "0"]
    assert "injected fault" in rows["partition-0"]["last_reason"]
    assert "worker process died" in rows["partition-1"]["last_reason"]
    # Assert: partition 1 is charged for all three rounds, the one it crashed in included
    assert _ledger_steps(run_dir, 1) == 3 * _round_steps(data_dir, overrides, 1)


@pytest.mark.slow  # waits out a 15 s round timeout
@pytest.mark.usefixtures("no_workers_left")
def test_a_message_past_the_round_timeout_is_missing_and_its_worker_restarted(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: partition 2 hangs in round 1, past the round timeout
    run_dir = tmp_path / "run"
    overrides = _overrides(data_dir, run_dir, **{"num-server-rounds": 2, "round-timeout": 15.0})
    monkeypatch.setenv("FEDSPEECH_FAULT", "2:hang=600@1")
    # Execute
    outcome = simulate(overrides=overrides, num_supernodes=3, out=run_dir, engine="local")
    # Assert: round 1 went on without it; in round 2 its restarted worker answered
    assert outcome.finished
    counts = [(h["clients_ok"], h["clients_failed"]) for h in outcome.history]
    assert counts == [(2, 1), (3, 0)]
    assert "no reply before the timeout" in (run_dir / "report" / "clients.tsv").read_text()


@pytest.mark.usefixtures("no_workers_left")
def test_a_run_resumed_on_the_local_engine_continues_its_ledgers_and_tracking_run(
    data_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a finished 2-round run
    run_dir = tmp_path / "run"
    overrides = _overrides(data_dir, run_dir, **{"num-server-rounds": 2})
    log_file = tmp_path / "run.log"
    first = simulate(
        overrides=overrides, num_supernodes=3, out=run_dir, engine="local", output=log_file
    )
    # (round 2: each worker took first a node it served in round 1, whose examples it kept)
    assert log_file.read_text().count("examples, kept in memory since the last round") >= 2
    # Execute: one more round
    resumed = simulate(overrides={"num-server-rounds": 3}, out=run_dir, resume=True, engine="local")
    # Assert: round 3 ran in the same MLflow run, and every node's ledger holds its 3 rounds
    assert first.finished and resumed.finished and resumed.rounds == 3
    assert resumed.tracking_run_id == first.tracking_run_id
    assert [h["round"] for h in resumed.history] == [1, 2, 3]
    for i in range(3):
        assert _ledger_steps(run_dir, i) == 3 * _round_steps(data_dir, overrides, i)
    assert resumed.history[2]["epsilon_max"] > resumed.history[1]["epsilon_max"]


@pytest.mark.slow  # a run on Flower's runtime first (~20 s)
@pytest.mark.usefixtures("no_workers_left")
def test_a_run_started_on_flowers_runtime_resumes_on_the_default_engine_with_its_ledgers(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # (runs started before the local engine became the default resume on it: the ledgers and
    # the tracking run must carry over, or a resumed run would under-report epsilon)
    # Prepare: one round on Flower's runtime
    run_dir = tmp_path / "run"
    overrides = _overrides(data_dir, run_dir, **{"num-server-rounds": 1})
    first = simulate(
        overrides=overrides,
        num_supernodes=3,
        out=run_dir,
        engine="flower",
        output=tmp_path / "f.log",
    )
    # Execute: the README's resume command, on the default engine
    with caplog.at_level(logging.INFO, logger="fedspeech"):
        resumed = simulate(overrides={"num-server-rounds": 2}, out=run_dir, resume=True)
    # Assert: the local engine ran round 2, in the same MLflow run, and every node's ledger
    # holds both rounds' steps
    assert "engine: local" in caplog.text
    assert first.finished and resumed.finished and [h["round"] for h in resumed.history] == [1, 2]
    assert resumed.tracking_run_id == first.tracking_run_id
    for i in range(3):
        assert _ledger_steps(run_dir, i) == 2 * _round_steps(data_dir, overrides, i)
    assert resumed.history[1]["epsilon_max"] > resumed.history[0]["epsilon_max"]


@pytest.mark.usefixtures("no_workers_left")
def test_kept_workers_serve_the_next_run_with_its_environment_and_its_log(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two one-round runs; only the second has partition 0 raise
    runs = [tmp_path / "first", tmp_path / "second"]

    def run(folder: Path) -> SimulationOutcome:
        overrides = _overrides(data_dir, folder / "run", **{"num-server-rounds": 1})
        return simulate(
            overrides=overrides,
            num_supernodes=3,
            out=folder / "run",
            engine="local",
            output=folder / "run.log",
        )

    # Execute
    with kept_workers():
        first = run(runs[0])
        workers = {child.pid for child in multiprocessing.active_children()}
        monkeypatch.setenv("FEDSPEECH_FAULT", "0:raise@1")
        second = run(runs[1])
        # Assert: the second run had the first's workers
        assert workers and {child.pid for child in multiprocessing.active_children()} == workers
    # Assert: each run's environment and log: the fault in the second only, each run's client
    # records in its own log; the second run's nodes were in memory already
    assert [(h["clients_ok"], h["clients_failed"]) for h in first.history] == [(3, 0)]
    assert [(h["clients_ok"], h["clients_failed"]) for h in second.history] == [(2, 1)]
    logs = [(folder / "run.log").read_text() for folder in runs]
    assert all("INFO fedspeech_client.local_round" in text for text in logs)
    assert "injected fault" not in logs[0] and "injected fault" in logs[1]
    assert "kept in memory since the last round" in logs[1]


@pytest.mark.usefixtures("no_workers_left")
def test_two_runs_with_a_dp_seed_train_the_same_cohorts(data_dir: Path, tmp_path: Path) -> None:
    # Prepare: 5 nodes, 2 a round, 3 rounds; dp-seed set (without it Flower draws unseeded)
    def cohorts(name: str) -> list[set[int]]:
        run_dir, log_file = tmp_path / name / "run", tmp_path / name / "run.log"
        more = {"num-server-rounds": 3, "clients-per-round": 2, "dp-seed": 5}
        outcome = simulate(
            overrides=_overrides(data_dir, run_dir, **more),
            num_supernodes=5,
            out=run_dir,
            engine="local",
            output=log_file,
        )
        assert outcome.finished
        trained = re.findall(r"partition (\d+)/5 round (\d+): train-loss", log_file.read_text())
        return [{int(p) for p, r in trained if int(r) == n} for n in (1, 2, 3)]

    # Execute
    with kept_workers():
        first, second = cohorts("first"), cohorts("second")
    # Assert: the same two partitions each round in both runs
    assert first == second and all(len(c) == 2 for c in first)


def test_a_ctrl_c_that_python_drops_in_a_finalizer_still_stops_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the CLI's handlers (restored afterwards), and an object whose finalizer is
    # running when the signal comes
    monkeypatch.setattr(interrupts, "_interrupted", threading.Event())
    dropped: list[type[BaseException] | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    class _Finalized:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)

    try:
        interrupts.stop_on_signals()
        interrupts.raise_if_interrupted()  # nothing came yet
        # Execute: the KeyboardInterrupt raised inside __del__ is dropped by Python
        _Finalized()
        # Assert: dropped indeed, and the wait loops' check raises it again
        assert dropped == [KeyboardInterrupt]
        with pytest.raises(KeyboardInterrupt):
            interrupts.raise_if_interrupted()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_gpu_shares_are_refused_on_the_local_engine(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="use --engine flower"):
        simulate(out=tmp_path / "run", engine="local", client_gpus=0.5)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("engine", "gpus", "ray_address", "expected"),
    [
        ("auto", 0.0, None, "local"),
        ("auto", 0.0, "local", "local"),  # Ray's own word for "start one here"
        ("auto", 0.25, None, "flower"),  # GPU shares are Ray's
        ("auto", 0.0, "127.0.0.1:6379", "flower"),  # a Ray cluster to join
        ("flower", 0.0, None, "flower"),
        ("local", 0.0, "127.0.0.1:6379", "local"),  # asked for by name
    ],
)
def test_auto_takes_the_local_engine_unless_the_run_needs_ray(
    engine: str,
    gpus: float,
    ray_address: str | None,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    if ray_address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", ray_address)
    # Execute / Assert
    assert choose_engine(engine, gpus) == expected


def test_the_default_engine_is_auto_and_an_unknown_one_is_refused_before_launch(
    tmp_path: Path,
) -> None:
    assert _build_parser().parse_args(["simulate"]).engine == "auto"
    with pytest.raises(ConfigError, match="engine 'ray': choose one of auto, flower, local"):
        simulate(out=tmp_path / "run", engine="ray")
    assert not (tmp_path / "run").exists()


def test_the_cli_refuses_an_unknown_engine(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli_main(["simulate", "--engine", "ray"])
    assert stop.value.code == 2
    assert "invalid choice: 'ray'" in capsys.readouterr().err


def test_a_free_worker_takes_first_a_node_it_served_last() -> None:
    # Prepare: nodes 1..5 in this order; worker 0 ran node 4 last, worker 1 ran nodes 2 and 5
    with server_identity():
        messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in range(1, 6)]
    queue = _AffinityQueue(messages, {4: 0, 2: 1, 5: 1, 3: 7})
    # Execute: the workers free up in this order
    taken = [queue.take(slot).metadata.dst_node_id for slot in (1, 0, 0, 1, 1)]
    # Assert: each its own nodes (oldest first), then the oldest of the rest; each message once
    assert taken == [2, 4, 1, 5, 3] and len(queue) == 0
    with pytest.raises(IndexError):
        queue.take(0)


@pytest.mark.usefixtures("no_workers_left")
def test_an_adapter_run_resumed_continues_its_adapters_like_an_uninterrupted_run(
    data_dir: Path, tmp_path: Path
) -> None:
    # Prepare: DP-SGD on rank-2 adapters of the tiny model, 3 clients; the same run twice
    adapters = {"trainable": "adapters", "adapter-rank": 2}
    whole, split = tmp_path / "whole" / "run", tmp_path / "split" / "run"

    def run(run_dir: Path, rounds: int) -> SimulationOutcome:
        overrides = _overrides(data_dir, run_dir, **adapters, **{"num-server-rounds": rounds})
        return simulate(
            overrides=overrides, num_supernodes=3, out=run_dir, engine="local",
            output=run_dir.with_suffix(".log"),
        )  # fmt: skip

    # Execute: 2 rounds at once; 1 round, then resumed to 2
    uninterrupted = run(whole, 2)
    run(split, 1)
    after_one = dict(load_model_dir(split / "checkpoint" / "model").model.state_dict())
    resumed = simulate(overrides={"num-server-rounds": 2}, out=split, resume=True, engine="local")
    # Assert: round 1 trained the adapters' B (zero at the start) and the checkpoint kept them
    assert uninterrupted.finished and resumed.finished and resumed.rounds == 2
    ups = [k for k in after_one if k.startswith("adapters.up.")]
    assert ups and all(after_one[k].abs().max() > 0 for k in ups)
    # Assert: the resumed run went on from them as the uninterrupted one did: the same privacy
    # spent, the same losses, the same exported model (to float rounding)
    keys = ("clients_ok", "num_examples", "epsilon_max")
    assert [[h[k] for k in keys] for h in resumed.history] == [
        [h[k] for k in keys] for h in uninterrupted.history
    ]
    losses = [[h["train_loss"] for h in o.history] for o in (resumed, uninterrupted)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert resumed.model_dir is not None and uninterrupted.model_dir is not None
    expected = dict(load_model_dir(uninterrupted.model_dir).model.state_dict())
    final = dict(load_model_dir(resumed.model_dir).model.state_dict())
    assert final.keys() == expected.keys() and not any(k.startswith("adapters.") for k in final)
    for name, value in final.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-5)


def test_an_interrupted_cli_run_stops_its_workers_and_leaks_nothing(
    data_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a long tiny run, started as from a terminal (its own process group)
    run_dir = tmp_path / "run"
    overrides = _overrides(data_dir, run_dir, **{"num-server-rounds": 500})
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    args = ["simulate", "--engine", "local", "--run-dir", str(run_dir), "--run-config", run_config]
    with (tmp_path / "out.txt").open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "fedspeech"), *args],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    # Execute: Ctrl-C once the workers have trained (a round checkpointed)
    while not (run_dir / "checkpoint" / "state.json").is_file() and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=120)
    # Assert: interrupted, nothing of the run left, and no resource the killed workers held
    # reported leaked (multiprocessing's resource tracker writes its warning to stderr)
    text = (tmp_path / "out.txt").read_text(errors="replace")
    assert rc == 130, text[-2000:]
    assert text.rstrip().splitlines()[-1].startswith("simulate: interrupted"), text[-2000:]
    time.sleep(0.5)
    assert not run_processes(run_dir)
    assert "leaked" not in text, text[-2000:]
