"""Real Flower processes on 127.0.0.1 for the deployment tests: a SuperLink (TLS or insecure),
SuperNodes and the ``flwr`` CLI sharing one FLWR_HOME, every process in its own process group and
tagged with one launch id, so that ``stop`` ends them and whatever they spawned.

Used by ``tests/test_deployment.py`` (TLS + SuperNode authentication) and
``tests/test_secagg_deployment.py`` (insecure, a SuperNode killed mid-protocol).
"""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from fedspeech.app.flower_launch import flower_env, free_port, stop_launched, tagged_processes

BIN = Path(sys.executable).parent
CONNECTION = "loopback"  # the flwr CLI's connection name in FLWR_HOME/config.toml


class LoopbackFlower:
    """Flower processes on 127.0.0.1 sharing one FLWR_HOME; ``stop`` ends all they started.

    Args:
        root: working folder (FLWR_HOME, ``logs/<name>.log`` of every process, databases).
        certs: a folder from ``scripts/make_certs.sh`` for TLS (``ca.crt``, ``server.*``, node
            keys); None runs every API insecure (still loopback only).
    """

    def __init__(self, root: Path, certs: Path | None = None) -> None:
        self.root = root
        self.certs = certs
        self.port = free_port()
        self.launch_id = uuid.uuid4().hex
        home = root / "flwr-home"
        home.mkdir(parents=True)
        self.env = flower_env(home, self.launch_id)
        security = f'root-certificates = "{certs / "ca.crt"}"' if certs else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{security}\n',
            encoding="utf-8",
        )
        self.logs = root / "logs"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, command: Sequence[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` (a console script of this venv) in its own process group, with
        its output in ``logs/<name>.log`` and ``env`` added to the common environment."""
        with (self.logs / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [str(BIN / command[0]), *command[1:]],
                env={**self.env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.root,
            )
        self.procs[name] = proc
        return proc

    def start_superlink(self, *extra: str) -> None:
        """A SuperLink on 127.0.0.1 (TLS on every API when ``certs``; ``extra`` arguments added),
        returned once its health endpoint answers."""
        security = ["--insecure"]
        context = None
        if self.certs:
            c = self.certs
            security = [
                *("--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.crt")),
                *("--ssl-keyfile", str(c / "server.key")),
            ]
            context = ssl.create_default_context(cafile=str(c / "ca.crt"))
        proc = self.start(
            "superlink",
            [
                "flower-superlink",
                *security,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *extra,
            ],
        )
        url = f"{'https' if self.certs else 'http'}://127.0.0.1:{self.port}/health"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, self.tails()
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.25)
        raise TimeoutError("SuperLink not healthy after 60 s\n" + self.tails())

    def supernode_command(self, *extra: str) -> list[str]:
        """``flower-supernode`` against this SuperLink (over TLS when ``certs``), plus ``extra``."""
        security = ["--root-certificates", str(self.certs / "ca.crt")] if self.certs else []
        return [
            "flower-supernode",
            *(security or ["--insecure"]),
            *("--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port())),
            *extra,
        ]

    def start_supernode(
        self,
        name: str,
        node_config: str = "",
        *,
        key: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """A SuperNode with ``node_config``, signing in with the private key ``certs/<key>``."""
        extra = ["--node-config", node_config] if node_config else []
        if key is not None:
            assert self.certs is not None, "node keys need certs"
            extra += ["--auth-supernode-private-key", str(self.certs / key)]
        return self.start(name, self.supernode_command(*extra), env)

    def flwr(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI (its default connection is this SuperLink)."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    def log(self, name: str, lines: int = 30) -> str:
        """The last lines one process wrote."""
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def tails(self, lines: int = 40) -> str:
        """The last lines of every process's log, for failure messages."""
        return "\n".join(
            f"----- {path.name} (last {lines} lines)\n{self.log(path.stem, lines)}"
            for path in sorted(self.logs.glob("*.log"))
        )

    def stop(self) -> None:
        """Stop every process started here and whatever they spawned (tagged by launch id)."""
        for proc in reversed(list(self.procs.values())):
            stop_launched(proc, self.launch_id)


@contextmanager
def loopback_flower(root: Path, certs: Path | None = None) -> Iterator[LoopbackFlower]:
    """A :class:`LoopbackFlower`, stopped afterwards; fails if any of its processes is left."""
    flower = LoopbackFlower(root, certs)
    try:
        yield flower
    finally:
        flower.stop()
        left = tagged_processes(flower.launch_id)
        assert not left, f"Flower processes left running: {left}"
