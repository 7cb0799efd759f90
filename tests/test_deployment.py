"""Deployment on 127.0.0.1: a TLS SuperLink with SuperNode authentication, two authenticated
SuperNodes with their own data folders, a third whose node config has a mistyped key, an
unregistered intruder, a node without a key, and `flwr run` (~80 s here; slow: `make test-slow`).

The same commands as docs/deployment.md, with certificates from scripts/make_certs.sh; the
processes come from ``tests/loopback.py``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedspeech.app.flower_launch import write_run_config
from fedspeech.config import RunConfig
from fedspeech.fed_data import client_manifest, corpus_manifest
from tests.conftest import TINY_SIMULATION
from tests.loopback import LoopbackFlower, loopback_flower

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LoopbackFlower]:
    """Certificates + node keys (scripts/make_certs.sh) and a process set stopped afterwards."""
    certs = tmp_path / "certs"
    script = ROOT / "scripts" / "make_certs.sh"
    subprocess.run(
        ["bash", str(script), "--nodes", "4", str(certs)], check=True, capture_output=True
    )
    with loopback_flower(tmp_path, certs) as flower:
        yield flower


@pytest.mark.slow  # ~70 s: TLS + node auth with real SuperNodes (the default suite keeps the simulations)
@pytest.mark.timeout(900)  # its `flwr run` may wait 480 s and reports that itself
def test_tls_superlink_admits_registered_nodes_only_and_trains(
    tmp_path: Path, deployment: LoopbackFlower
) -> None:
    # Prepare: a tiny synthetic corpus split into two node data folders
    data = tmp_path / "data"
    cfg = RunConfig.from_flat({**TINY_SIMULATION, "data-dir": str(data), "num-partitions": 2})
    corpus_manifest(cfg, data)
    manifests = [client_manifest(cfg, data, i, 2) for i in range(2)]
    deployment.start_superlink(
        "--enable-supernode-auth", "--database", str(tmp_path / "superlink.db")
    )
    for k in (1, 2, 4):  # the operator registers three nodes' public keys
        public_key = str(deployment.certs / f"supernode-{k}.pub")
        reply = deployment.flwr("supernode", "register", public_key, timeout=60)
        assert reply.returncode == 0, reply.stdout + reply.stderr

    # Execute: two registered nodes, a registered one whose node config misspells
    # epsilon-budget, one node with an unregistered key, one with no key at all
    for k in (1, 2):
        manifest = f'manifest="{manifests[k - 1]}"'
        deployment.start_supernode(f"node{k}", manifest, key=f"supernode-{k}")
    typo = f'manifest="{manifests[0]}" epsilon-bugdet=3'
    deployment.start_supernode("typo", typo, key="supernode-4")
    intruder = deployment.start_supernode("intruder", key="supernode-3")
    anonymous = deployment.start_supernode("anonymous")
    run_config = write_run_config(
        tmp_path / "run_config.toml",
        {
            **TINY_SIMULATION,
            **{"data-dir": str(data), "num-partitions": 2, "out-dir": str(tmp_path / "run")},
            **{"num-server-rounds": 2, "min-clients": 3, "round-timeout": 300.0},
            "tracking-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
    )
    start = time.perf_counter()
    run = deployment.flwr(
        "run", str(ROOT), "--stream", "--run-config", str(run_config), timeout=480
    )
    wall = time.perf_counter() - start

    # Assert: both intruders were turned away
    assert intruder.wait(timeout=60) != 0, deployment.log("intruder")
    assert "Failed to activate SuperNode" in deployment.log("intruder")
    assert anonymous.wait(timeout=60) != 0, deployment.log("anonymous")
    assert "must be registered" in deployment.log("anonymous")
    # Assert: the registered nodes trained two private rounds and moved the global model
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    history = json.loads((tmp_path / "run" / "report" / "history.json").read_text())
    assert [h["round"] for h in history] == [1, 2], history
    assert all(h["clients_ok"] == 2 and h["update_norm"] > 0 for h in history)
    assert history[1]["epsilon_max"] > history[0]["epsilon_max"] > 0
    # Assert: the mistyped node failed its first message with an error naming the key, and the
    # run reported it (every round, in the per-client report and the ServerApp's log)
    assert all(h["clients_failed"] == 1 for h in history)
    lines = (tmp_path / "run" / "report" / "clients.tsv").read_text().splitlines()
    rows = [dict(zip(lines[0].split("\t"), line.split("\t"), strict=True)) for line in lines[1:]]
    (failed,) = [row for row in rows if "epsilon-bugdet" in row["last_reason"]]
    assert "unknown node-config key(s) 'epsilon-bugdet'; known keys:" in failed["last_reason"]
    assert failed["rounds_failed"] == "2" and failed["rounds_ok"] == "0"
    assert "epsilon-bugdet" in run.stdout + run.stderr
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    _assert_mlflow_rounds(f"sqlite:///{tmp_path / 'mlflow.db'}")
    print(f"\ndeployment TLS + node auth, 2 nodes x 2 rounds: flwr run {wall:.1f} s")


def _assert_mlflow_rounds(uri: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fedspeech")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    for key, expected in (("wer", [0, 1, 2]), ("epsilon_max", [1, 2])):  # 0: the start
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == expected, key
