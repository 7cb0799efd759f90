"""Faults injected into real Flower processes on 127.0.0.1 (issue 7; slow: `make test-all`).

* ClientApps that crash, hang past the round timeout, or send NaN / wrongly shaped weights
  (``FEDSPEECH_FAULT``, ``fedspeech_client.faults``): the rounds complete with the healthy clients.
* The server side of a simulation is killed (SIGKILL) mid-run and resumed: every round is run,
  checkpointed and tracked once, and the clients' epsilon keeps accumulating.
* A SuperNode of a TLS + node-authentication deployment is killed (SIGKILL) and restarted: it
  rejoins under the same identity and its privacy ledger (a file beside its data) continues.

Each test checks that every process it started is gone afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedspeech.app.cli import main as cli_main
from fedspeech.app.flower_launch import processes_with_env, write_run_config
from fedspeech.app.simulate import simulate
from fedspeech.config import RunConfig
from fedspeech.fed_data import client_manifest, corpus_manifest
from fedspeech.modeldir import load_model_dir
from fedspeech_client.node_state import LEDGER_DIR, load_ledger
from fedspeech_server.tracking import read_rounds, read_tracking_info
from tests.conftest import TINY_SIMULATION
from tests.loopback import LoopbackFlower, loopback_flower

ROOT = Path(__file__).resolve().parents[1]

# ~50-110 s each here; their own waits (round 1 of the killed run, `flwr run`) allow up to 400-480
# s, so the per-test limit sits above them and reports a hang only they did not catch.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny synthetic corpus (and feature cache) for the module's simulations."""
    return tmp_path_factory.mktemp("fault-data")


def _kill_all(needle: str) -> None:
    """SIGKILL every process tagged ``needle`` until none is left (children may be spawning)."""
    deadline = time.monotonic() + 30
    while (pids := processes_with_env(needle)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    assert not processes_with_env(needle), f"cannot kill {needle}"


def _mlflow_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def _log_tail(*paths: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in paths if p.is_file())


def test_rounds_complete_with_the_healthy_clients_despite_faulty_ones(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: 6 simulated nodes; partition 0 crashes, 1 hangs in round 1 past the timeout,
    # 2 sends NaN weights, 3 wrongly shaped ones; 4 and 5 are healthy
    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("FEDSPEECH_FAULT", "0:raise,1:hang=75@1,2:nan,3:shape")
    overrides = {
        **TINY_SIMULATION,
        **{"data-dir": str(data_dir), "tracking-uri": uri, "num-server-rounds": 2},
        **{"round-timeout": 45.0, "min-successful-clients": 2, "round-retries": 0},
    }
    # Execute
    start = time.perf_counter()
    outcome = simulate(
        overrides=overrides,
        num_supernodes=6,
        out=run_dir,
        output=tmp_path / "sim.log",
        engine="flower",
    )
    wall = time.perf_counter() - start
    log = _log_tail(tmp_path / "sim.log", run_dir / ".flwr" / "superlink.log")
    # Assert: both rounds completed; the bad updates were rejected, the crash and hang failed
    assert outcome.finished and outcome.rounds == 2, log
    first, second = outcome.history
    assert (first["clients_ok"], first["clients_failed"], first["clients_rejected"]) == (2, 2, 2)
    assert (second["clients_ok"], second["clients_failed"], second["clients_rejected"]) == (3, 1, 2)
    assert all(h["update_norm"] > 0 for h in outcome.history)
    # Assert: the final model is finite (loading refuses NaN/Inf weights) and has the right shapes
    assert outcome.model_dir is not None
    load_model_dir(outcome.model_dir)
    # Assert: each client's fate and reason in the per-client table
    rows = {
        line.split("\t")[0]: line.split("\t")
        for line in (run_dir / "report" / "clients.tsv").read_text().splitlines()[1:]
    }
    # columns: client, rounds_ok, rounds_declined, rounds_failed, rounds_rejected, ...
    assert (
        rows["partition-2"][1:5] == ["0", "0", "0", "2"] and "non-finite" in rows["partition-2"][-1]
    )
    assert rows["partition-3"][1:5] == ["0", "0", "0", "2"] and "shape" in rows["partition-3"][-1]
    assert rows["partition-4"][1:5] == ["2", "0", "0", "0"]
    assert "timeout" in (run_dir / "report" / "clients.tsv").read_text()
    # Assert: the counts reached MLflow
    run_id = read_tracking_info(run_dir)["run_id"]
    for key in ("clients_failed", "clients_rejected", "clients_ok"):
        assert _mlflow_steps(uri, run_id, key) == [1, 2], key
    print(f"\n6 clients (4 faulty) x 2 rounds: {wall:.1f} s wall")


def test_killed_server_resumes_from_the_last_complete_round(data_dir: Path, tmp_path: Path) -> None:
    # Prepare: `fedspeech simulate` (3 rounds) in its own process tree, tagged for the kill
    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {
        **TINY_SIMULATION,
        "data-dir": str(data_dir),
        "tracking-uri": uri,
        "num-server-rounds": 3,
    }
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
    args = [
        "simulate",
        *("--engine", "flower"),
        "--num-supernodes",
        "3",
        "--run-dir",
        str(run_dir),
        "--run-config",
        run_config,
    ]
    tag = f"FEDSPEECH_TEST_KILL={uuid.uuid4().hex}"
    env = {**os.environ, tag.split("=")[0]: tag.split("=")[1]}
    with open(tmp_path / "first.log", "wb") as out:
        first = subprocess.Popen(
            [str(BIN / "fedspeech"), *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    # Execute: SIGKILL the whole server side as soon as round 1 is checkpointed
    state_file = run_dir / "checkpoint" / "state.json"
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and first.poll() is None:
            if state_file.is_file() and json.loads(state_file.read_text() or "{}").get("round"):
                break
            time.sleep(0.1)
        killed_after = json.loads(state_file.read_text())["round"]
    finally:
        _kill_all(tag)
        first.wait()
    assert killed_after < 3, "the run finished before it could be killed"
    ledgers_at_kill = {
        p.name: load_ledger(p, 1e-5) for p in sorted((run_dir / "client-state").glob("*.json"))
    }
    start = time.perf_counter()
    rc = cli_main([*args, "--resume"])
    wall = time.perf_counter() - start
    # Assert: the resumed run finished rounds 1..3, each once, in the checkpoint, the run
    # folder's log and MLflow (one tracking run)
    assert rc == 0, _log_tail(tmp_path / "first.log", run_dir / ".flwr" / "superlink.log")
    state = json.loads(state_file.read_text())
    assert state["round"] == 3 and state["finished"]
    assert [h["round"] for h in state["history"]] == [1, 2, 3]
    assert [r["round"] for r in read_rounds(run_dir)] == [1, 2, 3]
    run_id = read_tracking_info(run_dir)["run_id"]
    assert run_id == state["tracking_run_id"]
    assert _mlflow_steps(uri, run_id, "wer") == [0, 1, 2, 3]  # round 0: the start
    # Assert: the clients' epsilon kept accumulating across the kill
    eps = [h["epsilon_max"] for h in state["history"]]
    assert eps[0] < eps[1] < eps[2], eps
    for name, before in ledgers_at_kill.items():
        after = load_ledger(run_dir / "client-state" / name, 1e-5)
        assert before is not None and after is not None
        assert after.num_steps > before.num_steps  # the history on disk went on, not anew
        assert after.epsilon() > before.epsilon()
    assert load_model_dir(run_dir / "model").provenance["rounds"] == 3
    assert not processes_with_env(tag)
    print(f"\nkilled after round {killed_after}; resume to round 3: {wall:.1f} s wall")


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LoopbackFlower]:
    """TLS certificates and node keys (scripts/make_certs.sh); processes stopped afterwards."""
    certs = tmp_path / "certs"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "make_certs.sh"), "--nodes", "2", str(certs)],
        check=True,
        capture_output=True,
    )
    with loopback_flower(tmp_path, certs) as flower:
        yield flower


def _start_node_until_admitted(
    dep: LoopbackFlower, name: str, key: str, node_config: str
) -> tuple[str, subprocess.Popen[bytes]]:
    """Start a SuperNode; while the SuperLink still holds the killed one's session, retry.

    Returns the node id it was admitted under and its process.
    """
    deadline = time.monotonic() + 150
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        label = f"{name}-{attempt}"
        proc = dep.start_supernode(label, node_config, key=key)
        while proc.poll() is None and "SuperNode ID:" not in dep.log(label):
            time.sleep(0.5)
        if proc.poll() is None:
            line = next(x for x in dep.log(label).splitlines() if "SuperNode ID:" in x)
            return line.rsplit("SuperNode ID:", 1)[1].strip(), proc
        time.sleep(5)  # refused: the SuperLink has not yet noticed the old process is gone
    raise TimeoutError(dep.log(f"{name}-{attempt}"))


def test_a_restarted_supernode_rejoins_and_its_epsilon_keeps_accumulating(
    tmp_path: Path, deployment: LoopbackFlower
) -> None:
    # Prepare: two authenticated nodes with their own data folders; one run of one round
    data = tmp_path / "data"
    cfg = RunConfig.from_flat({**TINY_SIMULATION, "data-dir": str(data), "num-partitions": 2})
    corpus_manifest(cfg, data)
    manifests = [client_manifest(cfg, data, i, 2) for i in range(2)]
    deployment.start_superlink(
        "--enable-supernode-auth", "--database", str(tmp_path / "superlink.db")
    )
    for k in (1, 2):
        reply = deployment.flwr(
            "supernode", "register", str(deployment.certs / f"supernode-{k}.pub"), timeout=60
        )
        assert reply.returncode == 0, reply.stdout + reply.stderr
    node_configs = [f'manifest="{m}"' for m in manifests]
    first_id, killed = _start_node_until_admitted(
        deployment, "node1", "supernode-1", node_configs[0]
    )
    _start_node_until_admitted(deployment, "node2", "supernode-2", node_configs[1])
    base = {
        **TINY_SIMULATION,
        **{"data-dir": str(data), "num-partitions": 2, "out-dir": str(tmp_path / "run")},
        **{"min-clients": 2, "min-successful-clients": 2, "round-timeout": 300.0},
        "tracking-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    run1 = write_run_config(tmp_path / "run1.toml", {**base, "num-server-rounds": 1})
    reply = deployment.flwr("run", str(ROOT), "--stream", "--run-config", str(run1), timeout=480)
    assert reply.returncode == 0, reply.stdout[-3000:] + reply.stderr[-2000:]
    ledger_file = manifests[0].parent / LEDGER_DIR / "ledger.json"
    after_one = load_ledger(ledger_file, 1e-5)
    assert after_one is not None and after_one.num_steps > 0
    # Execute: SIGKILL node 1 (no goodbye to the SuperLink), restart it, run round 2
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    start = time.perf_counter()
    second_id, _ = _start_node_until_admitted(
        deployment, "node1-restart", "supernode-1", node_configs[0]
    )
    waited = time.perf_counter() - start
    run2 = write_run_config(
        tmp_path / "run2.toml", {**base, "num-server-rounds": 2, "resume": True}
    )
    reply = deployment.flwr("run", str(ROOT), "--stream", "--run-config", str(run2), timeout=480)
    # Assert: same identity; both nodes trained round 2; node 1's ledger continued on disk
    assert reply.returncode == 0, reply.stdout[-3000:] + reply.stderr[-2000:]
    assert second_id == first_id
    history = json.loads((tmp_path / "run" / "report" / "history.json").read_text())
    assert [h["round"] for h in history] == [1, 2]
    assert history[1]["clients_ok"] == 2
    after_two = load_ledger(ledger_file, 1e-5)
    assert after_two is not None
    assert after_two.num_steps == 2 * after_one.num_steps
    assert after_two.epsilon() > after_one.epsilon()
    assert history[1]["epsilon_max"] > history[0]["epsilon_max"]
    print(f"\nnode 1 killed and readmitted after {waited:.0f} s; its ledger continued")
