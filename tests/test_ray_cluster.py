"""A simulation on a real two-node Ray cluster on 127.0.0.1 (docs/deployment.md, section 9).

The head and a second node are started with Ray's own ``ray start`` code, each with one CPU and a
resource of its own; ``fedspeech simulate`` joins the cluster through ``RAY_ADDRESS``. Ray's
GCS records every actor with the node it ran on, so the test can tell that Flower's ClientApp
actors ran on both nodes.

Loopback only: Ray replaces 127.0.0.1 in an address with the machine's outward address (so
that other machines can reach the node), unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which
the head and the simulation get; ``ray start`` refuses to start a second node with that setting,
so the second node runs ``ray start`` with the rewrite turned off (``_LOOPBACK_RAY``). Every
process listens on and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import ipaddress
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

from fedspeech.app.flower_launch import LAUNCH_ID_VAR, flower_env, free_port, tagged_processes
from fedspeech_server.tracking import read_rounds
from tests.conftest import TINY_SIMULATION

BIN = Path(sys.executable).parent

_LOOPBACK_RAY = (
    "import sys\n"
    "import ray._private.services as services\n"
    "services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 as it is\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "main()\n"
)
"""``ray start`` (Ray's CLI entry point) without the rewrite of 127.0.0.1 to the outward address."""

_ACTOR_NODES = (
    "import collections, json, sys\n"
    "import ray\n"
    "from ray._private import state\n"
    "ray.init(address=sys.argv[1], logging_level='ERROR')\n"
    "nodes = {n['NodeID']: sorted(k for k in n['Resources'] if k.startswith('fedspeech_'))"
    " for n in ray.nodes()}\n"
    "count = collections.Counter()\n"
    "for actor in state.actors().values():\n"
    "    if actor['ActorClassName'] == 'ClientAppActor':\n"
    "        count[','.join(nodes.get(actor['Address']['NodeID'], ['?']))] += 1\n"
    "print(json.dumps({'nodes': sorted(map(','.join, nodes.values())), 'actors': count}))\n"
)
"""Which nodes the cluster has (by their fedspeech_* resource) and the ClientApp actors on each.

``ray.util.state`` would need Ray's dashboard, which ``flwr[simulation]``'s Ray lacks; the GCS
table read here is what that API reads too (dead actors included)."""


class RayCluster:
    """``ray start`` processes on 127.0.0.1, tagged with a launch id so that all can be stopped."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.launch_id = uuid.uuid4().hex
        self.env = {
            **os.environ,
            LAUNCH_ID_VAR: self.launch_id,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }

    def ray(self, name: str, *args: str, loopback_cli: bool = False) -> None:
        """Run a ``ray`` CLI command to completion (``ray start`` daemonizes what it starts)."""
        command = (
            [sys.executable, "-c", _LOOPBACK_RAY, *args]
            if loopback_cli
            else [str(BIN / "ray"), *args]
        )
        env = dict(self.env)
        if loopback_cli:
            env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # a second node needs cluster mode
        log = self.root / f"{name}.log"
        with log.open("ab") as out:
            done = subprocess.run(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=120
            )
        assert done.returncode == 0, log.read_text(errors="replace")[-3000:]

    def start(self) -> None:
        """A head and a second node, one CPU each, told apart by a custom resource."""
        common = ["--num-cpus", "1", "--disable-usage-stats"]
        self.ray(
            "head",
            *("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port)),
            *("--include-dashboard", "false", "--resources", '{"fedspeech_head": 1}', *common),
        )
        self.ray(
            "worker",
            *("start", "--address", self.address, "--node-ip-address", "127.0.0.1"),
            *("--resources", '{"fedspeech_worker": 1}', *common),
            loopback_cli=True,
        )

    def actor_nodes(self) -> dict[str, object]:
        """The cluster's nodes and the ClientApp actors that ran on each (``_ACTOR_NODES``)."""
        done = subprocess.run(
            [sys.executable, "-c", _ACTOR_NODES, self.address],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    def listening_hosts(self) -> set[str]:
        """The addresses this cluster's processes listen on (TCP, from /proc)."""
        inodes = set()
        for pid in tagged_processes(self.launch_id):
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        target = os.readlink(fd)
                        if target.startswith("socket:["):
                            inodes.add(target[8:-1])
        hosts = set()
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    hosts.add(_host(fields[1].split(":")[0]))
        return hosts

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every process of this cluster (not other Ray instances)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            deadline = time.monotonic() + 15
            while (pids := tagged_processes(self.launch_id)) and time.monotonic() < deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                time.sleep(0.5)


def _host(hex_address: str) -> str:
    """A /proc/net/tcp{,6} local address (little-endian hex words) as text."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def _loopback(host: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (a dual-stack socket)."""
    address = ipaddress.ip_address(host)
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RayCluster]:
    """A started two-node cluster; stopped afterwards, and nothing of it may be left running."""
    ray_cluster = RayCluster(tmp_path)
    try:
        ray_cluster.start()
        yield ray_cluster
    finally:
        ray_cluster.stop()
    assert not tagged_processes(ray_cluster.launch_id), "Ray processes left running"


@pytest.mark.slow  # ~60 s: two raylets, a simulation of 2 rounds, the cluster's shutdown
@pytest.mark.timeout(600)
def test_simulation_runs_client_actors_on_both_nodes_of_a_ray_cluster(
    cluster: RayCluster, tmp_path: Path
) -> None:
    # Prepare: a tiny DP simulation of 4 clients, 2 rounds, pointed at the cluster
    run_dir = tmp_path / "run"
    settings = {
        **TINY_SIMULATION,
        "num-server-rounds": 2,
        "data-dir": str(tmp_path / "data"),
        "tracking-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
    command = [str(BIN / "fedspeech"), "simulate", "--num-supernodes", "4", "--client-cpus", "1"]
    command += ["--run-dir", str(run_dir), "--run-config", run_config]
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    listening = cluster.listening_hosts()
    # Execute
    log = tmp_path / "simulate.log"
    with log.open("wb") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=480)
    # Assert: the run finished both rounds
    assert done.returncode == 0, log.read_text(errors="replace")[-4000:]
    assert [row["round"] for row in read_rounds(run_dir)] == [1, 2]
    # Assert: the cluster has its two nodes, and ClientApp actors ran on each of them
    seen = cluster.actor_nodes()
    assert seen["nodes"] == ["fedspeech_head", "fedspeech_worker"]
    actors = dict(seen["actors"])  # type: ignore[call-overload]
    assert set(actors) == {"fedspeech_head", "fedspeech_worker"}, seen
    # Assert: the cluster listened on loopback only
    assert listening and all(map(_loopback, listening)), listening
    print(f"\nlistening on {sorted(listening)}; ClientApp actors per node: {actors}")


def test_simulations_get_a_private_ray_instance_unless_ray_address_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bare ray.init() (Flower's engine) joins any cluster `ray start` left on the machine.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert flower_env(tmp_path, "x")["RAY_ADDRESS"] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert flower_env(tmp_path, "x")["RAY_ADDRESS"] == "127.0.0.1:6379"
