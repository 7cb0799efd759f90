"""Deployment on 127.0.0.1: a TLS SuperLink with SuperNode authentication, two authenticated
SuperNodes with their own data folders, a third whose node config has a mistyped key, an
unregistered intruder, and `flwr run` (~80 s here; in the default suite because it is the
product's deployment path).

The same commands as docs/deployment.md, with certificates from scripts/make_certs.sh.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from fedspeech.app.flower_launch import (
    flower_env,
    free_port,
    stop_launched,
    tagged_processes,
    write_run_config,
)
from fedspeech.config import RunConfig
from fedspeech.fed_data import client_manifest, corpus_manifest
from tests.conftest import TINY_SIMULATION

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class Deployment:
    """Flower processes on 127.0.0.1 sharing one FLWR_HOME; ``stop`` ends all they started."""

    def __init__(self, root: Path, certs: Path) -> None:
        self.root = root
        self.certs = certs
        self.port = free_port()
        self.launch_id = uuid.uuid4().hex
        home = root / "flwr-home"
        home.mkdir(parents=True)
        self.env = flower_env(home, self.launch_id)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local-tls"\n\n[superlink.local-tls]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{certs / "ca.crt"}"\n',
            encoding="utf-8",
        )
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, command: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start ``command`` (a Flower console script) with its output in ``<name>.log``."""
        with (self.root / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [str(BIN / command[0]), *command[1:]],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start_superlink(self) -> None:
        """TLS on every API, SuperNode authentication on, state in a database file."""
        c = self.certs
        proc = self.start(
            "superlink",
            [
                "flower-superlink",
                *("--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.crt")),
                *("--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth"),
                *("--host", "127.0.0.1", "--port", str(self.port)),
                *("--database", str(self.root / "superlink.db")),
            ],
        )
        context = ssl.create_default_context(cafile=str(c / "ca.crt"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, self.log("superlink")
            try:
                url = f"https://127.0.0.1:{self.port}/health"
                with urllib.request.urlopen(url, timeout=2, context=context) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.25)
        raise TimeoutError(self.log("superlink"))

    def start_supernode(
        self, name: str, key: str, node_config: str = ""
    ) -> subprocess.Popen[bytes]:
        """A SuperNode over TLS that signs in with the private key ``certs/<key>``."""
        command = [
            "flower-supernode",
            *("--root-certificates", str(self.certs / "ca.crt")),
            *("--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port())),
            *("--auth-supernode-private-key", str(self.certs / key)),
        ]
        if node_config:
            command += ["--node-config", node_config]
        return self.start(name, command)

    def flwr(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against the ``local-tls`` connection."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    def log(self, name: str) -> str:
        """The last lines a process wrote."""
        path = self.root / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-30:])

    def stop(self) -> None:
        """Stop every process started here and whatever they spawned (tagged by launch id)."""
        for proc in reversed(self.procs):
            stop_launched(proc, self.launch_id)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """Certificates + node keys (scripts/make_certs.sh) and a process set stopped afterwards."""
    certs = tmp_path / "certs"
    script = ROOT / "scripts" / "make_certs.sh"
    subprocess.run(
        ["bash", str(script), "--nodes", "4", str(certs)], check=True, capture_output=True
    )
    dep = Deployment(tmp_path, certs)
    try:
        yield dep
    finally:
        dep.stop()
        assert not tagged_processes(dep.launch_id), "Flower processes left running"


@pytest.mark.slow  # ~70 s: TLS + node auth with real SuperNodes (the default suite keeps the simulations)
@pytest.mark.timeout(900)  # its `flwr run` may wait 480 s and reports that itself
def test_tls_superlink_admits_registered_nodes_only_and_trains(
    tmp_path: Path, deployment: Deployment
) -> None:
    # Prepare: a tiny synthetic corpus split into two node data folders
    data = tmp_path / "data"
    cfg = RunConfig.from_flat({**TINY_SIMULATION, "data-dir": str(data), "num-partitions": 2})
    corpus_manifest(cfg, data)
    manifests = [client_manifest(cfg, data, i, 2) for i in range(2)]
    deployment.start_superlink()
    for k in (1, 2, 4):  # the operator registers three nodes' public keys
        public_key = str(deployment.certs / f"supernode-{k}.pub")
        reply = deployment.flwr("supernode", "register", public_key, timeout=60)
        assert reply.returncode == 0, reply.stdout + reply.stderr

    # Execute: two registered nodes, a registered one whose node config misspells
    # epsilon-budget, one node with an unregistered key, one with no key at all
    for k in (1, 2):
        deployment.start_supernode(f"node{k}", f"supernode-{k}", f'manifest="{manifests[k - 1]}"')
    typo = f'manifest="{manifests[0]}" epsilon-bugdet=3'
    deployment.start_supernode("typo", "supernode-4", typo)
    intruder = deployment.start_supernode("intruder", "supernode-3")
    anonymous = deployment.start(
        "anonymous",
        [
            "flower-supernode",
            *("--root-certificates", str(deployment.certs / "ca.crt")),
            *("--superlink", f"127.0.0.1:{deployment.port}", "--port", str(free_port())),
        ],
    )
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
