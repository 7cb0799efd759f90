"""The images for real: built from docker/, run as containers on host networking (127.0.0.1).

``bash docker/build.sh`` builds every image (on a local Debian base where no registry can be
reached). Then, as docs/deployment.md section 10 lists step by step: MLflow, a SuperLink with
TLS, SuperNode authentication and SuperExec authentication, its ServerApp executor, and two
SuperNodes with their own data folders, every one of them as uid 10001 with ``--network host``;
``flwr run`` from the host trains two DP rounds; the rounds are read back from MLflow and the
final model from the host's run folder. Every container is removed afterwards.

Needs a Docker engine and root (the bind-mounted folders are handed to uid 10001): skipped
without them, unless ``FEDSPEECH_REQUIRE_DOCKER=1`` (CI's slow stage, which starts dockerd with
scripts/docker_host.sh), where their absence fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from fedspeech.app.flower_launch import flower_env, free_port, write_run_config
from fedspeech.config import RunConfig
from fedspeech.fed_data import client_manifest, corpus_manifest
from fedspeech_features.manifest import read_manifest, write_manifest
from tests.conftest import TINY_SIMULATION

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VERSION = "0.1.0"
UID = 10001


def _docker_ready() -> str:
    """Why this test cannot run here ('' when it can)."""
    if shutil.which("docker") is None:
        return "no docker CLI"
    if os.geteuid() != 0:
        return "not root (the containers' folders are handed to uid 10001)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    return "" if info.returncode == 0 else f"no Docker engine: {info.stderr.strip()[-200:]}"


def _require_docker() -> None:
    reason = _docker_ready()
    if reason and os.environ.get("FEDSPEECH_REQUIRE_DOCKER") == "1":
        pytest.fail(f"FEDSPEECH_REQUIRE_DOCKER=1 but {reason} (see scripts/docker_host.sh)")
    if reason:
        pytest.skip(reason)


class Stack:
    """Containers of one test, named ``<prefix>-<service>``; ``remove`` deletes them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.prefix = f"fedspeech-test-{uuid.uuid4().hex[:8]}"
        self.names: list[str] = []

    def run(self, service: str, image: str, args: Sequence[str], mounts: Sequence[str]) -> str:
        """``docker run -d --network host`` of ``fedspeech/<image>`` with bind mounts."""
        name = f"{self.prefix}-{service}"
        command = ["docker", "run", "-d", "--name", name, "--network", "host"]
        for mount in mounts:
            command += ["-v", mount]
        command += [f"fedspeech/{image}:{VERSION}", *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        self.names.append(name)
        return name

    def logs(self, service: str) -> str:
        """The last lines of a container's output."""
        done = subprocess.run(
            ["docker", "logs", "--tail", "40", f"{self.prefix}-{service}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return done.stdout + done.stderr

    def inspect(self, service: str, template: str) -> str:
        done = subprocess.run(
            ["docker", "inspect", "-f", template, f"{self.prefix}-{service}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def remove(self) -> None:
        if self.names:
            subprocess.run(["docker", "rm", "-f", *self.names], capture_output=True, timeout=120)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    _require_docker()
    built = subprocess.run(
        ["bash", str(ROOT / "docker" / "build.sh")],
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    containers = Stack(tmp_path)
    try:
        yield containers
    finally:
        containers.remove()
    left = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"name={containers.prefix}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert left.stdout.strip() == "", "containers left behind"


def _owned(path: Path, mode: int = 0o750) -> Path:
    """``path`` (a folder, created) and everything in it, handed to uid 10001."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in [path, *path.rglob("*")]:
        os.chown(entry, UID, UID)
    path.chmod(mode)
    return path


def _node_folder(manifest: Path, folder: Path) -> None:
    """A SuperNode's data folder: its audio and a manifest with paths relative to it."""
    utterances = read_manifest(manifest)
    (folder / "audio").mkdir(parents=True)
    copied = []
    for utt in utterances:
        target = folder / "audio" / utt.path.name
        shutil.copy2(utt.path, target)
        copied.append(type(utt)(target, utt.transcript, utt.speaker, utt.duration_s))
    write_manifest(folder / "manifest.tsv", copied)


def _wait_http(url: str, what: str, stack: Stack, service: str, **kwargs: object) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2, **kwargs) as reply:  # type: ignore[arg-type]
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise TimeoutError(f"{what} not healthy: {stack.logs(service)}")


@pytest.mark.slow  # ~4 min with the images cached; building them first adds several minutes
@pytest.mark.timeout(3600)
def test_images_run_a_tls_federation_with_mlflow_as_non_root_on_host_networking(
    tmp_path: Path, stack: Stack
) -> None:
    import ssl

    # Prepare: certificates, node keys, the SuperExec secret; the private ones for uid 10001
    certs = tmp_path / "certs"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "make_certs.sh"), "--nodes", "2", str(certs)],
        check=True,
        capture_output=True,
    )
    for name in ("server.key", "superexec.secret", "supernode-1", "supernode-2"):
        os.chown(certs / name, UID, UID)
    # Prepare: two node data folders (a tiny synthetic corpus split by speaker) and the
    # folders of the SuperLink, the ServerApps and MLflow, all owned by uid 10001
    data = tmp_path / "host-data"
    cfg = RunConfig.from_flat({**TINY_SIMULATION, "data-dir": str(data), "num-partitions": 2})
    corpus_manifest(cfg, data)
    nodes = [tmp_path / f"node{k}" for k in (1, 2)]
    for k, folder in enumerate(nodes):
        _node_folder(client_manifest(cfg, data, k, 2), folder)
        _owned(folder)
    state, runs, mlflow_dir = (_owned(tmp_path / name) for name in ("state", "runs", "mlflow"))
    link, mlflow_port = free_port(), free_port()
    ca = f"{certs / 'ca.crt'}:/certs/ca.crt:ro"
    secret = f"{certs / 'superexec.secret'}:/certs/superexec.secret:ro"

    # Execute: MLflow, the SuperLink, its ServerApp executor, two SuperNodes (section 10)
    stack.run(
        "mlflow",
        "mlflow",
        [
            *("--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"),
            *("--backend-store-uri", "sqlite:////mlflow/mlflow.db"),
            *("--artifacts-destination", "/mlflow/artifacts"),
        ],
        [f"{mlflow_dir}:/mlflow"],
    )
    stack.run(
        "superlink",
        "superlink",
        [
            *("--ssl-ca-certfile", "/certs/ca.crt", "--ssl-certfile", "/certs/server.crt"),
            *("--ssl-keyfile", "/certs/server.key", "--enable-supernode-auth"),
            *("--superexec-auth-secret-file", "/certs/superexec.secret"),
            *("--isolation", "process", "--host", "127.0.0.1", "--port", str(link)),
            *("--database", "/state/superlink.db"),
        ],
        [
            f"{state}:/state",
            ca,
            f"{certs / 'server.crt'}:/certs/server.crt:ro",
            f"{certs / 'server.key'}:/certs/server.key:ro",
            secret,
        ],
    )
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    _wait_http(f"https://127.0.0.1:{link}/health", "SuperLink", stack, "superlink", context=context)
    _wait_http(f"http://127.0.0.1:{mlflow_port}/health", "MLflow", stack, "mlflow")
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = flower_env(home, stack.prefix)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "docker"\n\n[superlink.docker]\n'
        f'address = "127.0.0.1:{link}"\nroot-certificates = "{certs / "ca.crt"}"\n',
        encoding="utf-8",
    )

    def flwr(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp_path,
        )

    for k in (1, 2):
        reply = flwr("supernode", "register", str(certs / f"supernode-{k}.pub"), timeout=60)
        assert reply.returncode == 0, reply.stdout + reply.stderr
    stack.run(
        "serverapp",
        "serverapp",
        [
            *("--root-certificates", "/certs/ca.crt"),
            *("--runtime-api-address", f"127.0.0.1:{link}"),
            *("--superexec-auth-secret-file", "/certs/superexec.secret"),
        ],
        [f"{runs}:/runs", ca, secret],
    )
    for k, folder in enumerate(nodes, start=1):
        stack.run(
            f"supernode-{k}",
            "supernode",
            [
                *("--root-certificates", "/certs/ca.crt", "--superlink", f"127.0.0.1:{link}"),
                *("--port", str(free_port())),  # its ClientAppIo API: one port per node here
                *("--auth-supernode-private-key", "/certs/supernode.key"),
                *("--node-config", 'manifest="/data/manifest.tsv"'),
            ],
            [f"{folder}:/data", ca, f"{certs / f'supernode-{k}'}:/certs/supernode.key:ro"],
        )
    run_config = write_run_config(
        tmp_path / "run_config.toml",
        {
            **TINY_SIMULATION,
            **{"data-dir": "/runs/data", "num-partitions": 2, "out-dir": "/runs/run"},
            **{"num-server-rounds": 2, "min-clients": 2, "round-timeout": 300.0},
            "tracking-uri": f"http://127.0.0.1:{mlflow_port}",
        },
    )
    start = time.perf_counter()
    run = flwr("run", str(ROOT), "--stream", "--run-config", str(run_config), timeout=900)
    wall = time.perf_counter() - start

    # Assert: two private rounds with both nodes, the model moved, epsilon grew
    assert run.returncode == 0, (
        run.stdout[-3000:] + run.stderr[-2000:] + stack.logs("serverapp") + stack.logs("superlink")
    )
    history = json.loads((runs / "run" / "report" / "history.json").read_text())
    assert [h["round"] for h in history] == [1, 2], history
    assert all(h["clients_ok"] == 2 and h["update_norm"] > 0 for h in history)
    assert history[1]["epsilon_max"] > history[0]["epsilon_max"] > 0
    # Assert: the final model is on the host, written by uid 10001
    model = runs / "run" / "model" / "model.safetensors"
    assert model.is_file() and model.stat().st_uid == UID
    # Assert: each node kept its own feature cache and privacy ledger in its own folder
    for folder in nodes:
        assert any(p.stat().st_uid == UID for p in folder.rglob("*") if p.is_file())
    # Assert: MLflow (the container) holds the run with every round
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_port}")
    experiment = client.get_experiment_by_name("fedspeech")
    assert experiment is not None
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    for key, expected in (("wer", [0, 1, 2]), ("epsilon_max", [1, 2])):
        steps = [m.step for m in client.get_metric_history(mlflow_run.info.run_id, key)]
        assert sorted(steps) == expected, key
    # Assert: every container ran as uid 10001 on the host's network
    for service in ("mlflow", "superlink", "serverapp", "supernode-1", "supernode-2"):
        assert stack.inspect(service, "{{.Config.User}}") == f"{UID}:{UID}", service
        assert stack.inspect(service, "{{.HostConfig.NetworkMode}}") == "host", service
        assert stack.inspect(service, "{{.State.Running}}") == "true", stack.logs(service)
    print(
        f"\ndocker: TLS + node auth + SuperExec auth, 2 nodes x 2 DP rounds: flwr run {wall:.1f} s"
    )
