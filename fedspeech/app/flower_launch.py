"""Launch a local Flower simulation: a private SuperLink, ``flwr run``, and a full cleanup after.

What ``fedspeech simulate`` runs, equivalent to this shell session (ports are picked free, so
several simulations, and tests, can run side by side)::

    export FLWR_HOME=<out>/.flwr FLWR_TELEMETRY_ENABLED=0
    export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1   # else every run uv-syncs the app
    flower-superlink --insecure --simulation --isolation subprocess --host 127.0.0.1 --port P \\
        --control-api-address 127.0.0.1:C --disable-runtime-dependency-installation &
    # $FLWR_HOME/config.toml: [superlink] default = "fedspeech";
    #                         [superlink.fedspeech] address = "127.0.0.1:P", insecure = true
    flwr run <out>/.flwr/app --stream --run-config <out>/run_config.toml \\
        --federation-config "num-supernodes=N client-resources-num-cpus=1 client-resources-num-gpus=0.0"
    kill %1   # and what it started: SuperExec, the simulation process, Ray

The SuperLink and everything it spawns detach into their own sessions, so the cleanup cannot
rely on process groups: every process started here carries ``FEDSPEECH_LAUNCH_ID=<uuid>`` in its
environment, and whatever still carries it at the end is terminated (then killed).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

from fedspeech.app.interrupts import interrupts_ignored, raise_if_interrupted
from fedspeech.launch import LAUNCH_ID_VAR, server_done_marker

log = logging.getLogger("fedspeech")

CONNECTION = "fedspeech"
_STARTUP_TIMEOUT_S = 60.0
_STOP_GRACE_S = 10.0
_SETTLE_S = 0.5  # two empty scans this far apart end the cleanup
_CLEANUP_DEADLINE_S = 60.0
_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
_ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour / cursor codes


@dataclass(frozen=True)
class LocalSuperLink:
    """A running SuperLink started by :func:`local_superlink`."""

    process: subprocess.Popen[bytes]
    address: str
    flwr_home: Path
    env: Mapping[str, str]
    launch_id: str


RAY_ADDRESS_VAR = "RAY_ADDRESS"


def flower_env(flwr_home: Path, launch_id: str) -> dict[str, str]:
    """The environment every Flower process of a simulation gets (see the module docstring).

    Without ``RAY_ADDRESS`` the simulation gets a private Ray instance (``RAY_ADDRESS=local``):
    Flower's engine calls ``ray.init()`` with no address, which would otherwise join any cluster
    a ``ray start`` left on this machine, sized for something else. To run on a cluster, set
    ``RAY_ADDRESS`` to it (docs/deployment.md, section 9).
    """
    env = dict(os.environ)
    env.setdefault(RAY_ADDRESS_VAR, "local")
    bin_dir = str(Path(sys.executable).parent)  # flower-superexec etc. are found on PATH
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray's future default (actors without GPUs see the devices as set); also silences
            # the FutureWarning Ray prints at every start otherwise
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")]),
            LAUNCH_ID_VAR: launch_id,
        }
    )
    return env


@contextmanager
def local_superlink(flwr_home: Path) -> Iterator[LocalSuperLink]:
    """Run a simulation-mode SuperLink on free loopback ports; stop it and its children after.

    Also writes ``$FLWR_HOME/config.toml`` with the ``fedspeech`` connection to it.

    Raises:
        RuntimeError: the SuperLink exits or is not healthy within a minute.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    launch_id = uuid.uuid4().hex
    env = flower_env(flwr_home, launch_id)
    port, control = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n',
        encoding="utf-8",
    )
    command = [
        str(Path(sys.executable).parent / "flower-superlink"),
        *("--insecure", "--simulation", "--isolation", "subprocess"),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--control-api-address", f"127.0.0.1:{control}"),
        "--disable-runtime-dependency-installation",
    ]
    log_path = flwr_home / "superlink.log"
    # Adopt orphans for the launch: a Ray process whose parent died is re-parented to this
    # process instead of to init, so the cleanup finds it by parentage too, not only by its tag.
    children_before = frozenset(_children(os.getpid()))
    adopting = _set_child_subreaper(True)
    process = None
    try:
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        _wait_healthy(process, port, log_path)
        log.info("SuperLink on %s (pid %d, log %s)", address, process.pid, log_path)
        yield LocalSuperLink(process, address, flwr_home, env, launch_id)
    finally:
        if process is not None:
            stop_launched(process, launch_id, adopted_except=children_before if adopting else None)
        if adopting:
            _set_child_subreaper(False)


def federation_config(
    num_supernodes: int, *, client_cpus: int = 1, client_gpus: float = 0.0
) -> dict[str, object]:
    """The simulation's ``--federation-config``: its SuperNodes and each ClientApp's Ray resources.

    ``client_gpus`` is the share of a GPU Ray reserves per ClientApp (0.5: two clients train on
    one GPU at a time; 0: none reserved). The ``device`` run-config key says where a client
    trains; this only sizes how many run at once.

    >>> federation_config(4, client_cpus=2, client_gpus=0.5)
    {'num-supernodes': 4, 'client-resources-num-cpus': 2, 'client-resources-num-gpus': 0.5}

    Raises:
        ConfigError: ``client_gpus`` below 0, or above 1 and not a whole number (Ray's rule).
    """
    gpus = float(client_gpus)
    if not (0 <= gpus <= 1 or (gpus > 1 and gpus.is_integer())):  # NaN and inf fail both
        from fedspeech.config import ConfigError

        raise ConfigError(
            f"client GPUs must be a share in [0, 1] or a whole number, got {client_gpus}"
        )
    return {
        "num-supernodes": num_supernodes,
        "client-resources-num-cpus": client_cpus,
        "client-resources-num-gpus": gpus,
    }


def federation_arg(config: Mapping[str, object]) -> str:
    """``config`` as ``flwr run --federation-config`` takes it: ``"k=v k2=v2"``, TOML values."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())


def flwr_run(
    link: LocalSuperLink,
    app_dir: Path,
    *,
    run_config: Path,
    federation_config: Mapping[str, object],
    output: Path | None = None,
) -> int:
    """``flwr run APP fedspeech --stream ...`` against ``link``; returns its exit status.

    Returns 0 as soon as the ServerApp has marked the run done (``fedspeech.launch``): ``flwr
    run`` then gets ``_DONE_GRACE_S`` to stream the last log lines and is stopped, and the
    caller's cleanup stops the rest, instead of waiting for Flower's own teardown.

    Args:
        link: the SuperLink.
        app_dir: the Flower app (``write_app``'s folder, or a checkout with pyproject.toml).
        run_config: TOML file of run-config overrides.
        federation_config: e.g. ``{"num-supernodes": 4, "client-resources-num-cpus": 1}``
            (``federation_config()`` builds it).
        output: file for the streamed logs (None: this process's stdout).
    """
    federation = federation_arg(federation_config)
    command = [
        str(Path(sys.executable).parent / "flwr"),
        *("run", str(app_dir), CONNECTION, "--stream"),
        *("--run-config", str(run_config)),
        *("--federation-config", federation),
    ]
    log.info("%s", " ".join(command))
    done = server_done_marker(link.flwr_home, link.launch_id)
    # A terminal gets Flower's output as it is; a file (or a pipe) without the colour codes
    # Flower and Ray put on every line.
    tty = output is None and sys.stdout.isatty()
    sys.stdout.flush()
    sink = open(output, "ab") if output is not None else nullcontext(sys.stdout.buffer)  # noqa: SIM115
    with sink as fh:
        proc = subprocess.Popen(
            command,
            env=dict(link.env),
            stdout=None if tty else subprocess.PIPE,
            stderr=None if tty else subprocess.STDOUT,
        )
        stopper = _StopWhenDone(proc, done)
        try:
            if proc.stdout is not None:
                for line in proc.stdout:
                    fh.write(_ANSI.sub(b"", line))
                    fh.flush()
                    raise_if_interrupted()
            rc = proc.wait()
        except BaseException:  # as subprocess.run does: never leave the child running
            proc.kill()
            proc.wait()
            raise
        finally:
            stopper.cancel()
    return 0 if stopper.fired else rc


_DONE_POLL_S = 0.1
_DONE_GRACE_S = 1.0  # for the last log lines (Flower uploads them every 0.2 s)


class _StopWhenDone(threading.Thread):
    """Stops ``proc`` (``flwr run``) once ``marker`` exists (see ``flwr_run``)."""

    def __init__(self, proc: subprocess.Popen[bytes], marker: Path) -> None:
        super().__init__(name="fedspeech-done-watch", daemon=True)
        self.proc, self.marker = proc, marker
        self.fired = False
        self._cancel = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._cancel.wait(_DONE_POLL_S):
            if self.proc.poll() is not None:
                return
            if self.marker.exists():
                if not self._cancel.wait(_DONE_GRACE_S) and self.proc.poll() is None:
                    self.fired = True
                    log.info("the server finished the run: stopping the simulation's processes")
                    self.proc.terminate()
                return

    def cancel(self) -> None:
        """Stop watching (``flwr run`` ended) and wait for the thread."""
        self._cancel.set()
        self.join()


# The Flower app ``flwr run`` packs: the installed components, and every run-config key with its
# default (Flower accepts only ``--run-config`` keys its app declares).
SERVER_APP = "fedspeech_server.app:app"
CLIENT_APP = "fedspeech_client.app:app"


def write_app(dest: Path) -> Path:
    """Write the Flower app a simulation runs into ``dest`` (replaced); return it.

    The app is one ``pyproject.toml`` whose components name the installed packages: Flower puts
    the unpacked app first on ``sys.path``, and with no code in it the ServerApp and ClientApps
    run the installed ``fedspeech`` (a wheel, or the checkout through an editable install), never
    a stale copy. It packs in milliseconds (``flwr run`` of the checkout walked its ``.venv``:
    4.5 s a launch), and ``simulate`` needs no source checkout.
    """
    from fedspeech import __version__
    from fedspeech.config import RunConfig

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    header = [
        "[project]",
        'name = "fedspeech"',
        f'version = "{__version__}"',
        'description = "fedspeech simulation (components from the installed package)"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedspeech"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVER_APP}"',
        f'clientapp = "{CLIENT_APP}"',
        "",
        "[tool.flwr.app.config]",
    ]
    config = [f"{k} = {_toml_value(v)}" for k, v in RunConfig().to_flat().items()]
    (dest / "pyproject.toml").write_text("\n".join(header + config) + "\n", encoding="utf-8")
    return dest


def stop_launched(
    process: subprocess.Popen[bytes],
    launch_id: str,
    *,
    adopted_except: frozenset[int] | None = None,
) -> list[int]:
    """Stop ``process``, then every process tagged with ``launch_id``; returns the pids signalled.

    ``adopted_except``: when this process adopts orphans (``_set_child_subreaper``), its
    children other than these (the ones it had before the launch) are stopped too, and reaped.

    Tagged processes get SIGTERM, and SIGKILL if still alive ``_STOP_GRACE_S`` later. The scan
    repeats until two scans in a row (``_SETTLE_S`` apart) find nothing: a process that was
    starting when the stop began (Ray spawns its agents late) is caught by a later scan
    instead of being left behind. SIGINT and SIGTERM are ignored meanwhile: a Ctrl-C that
    arrives during the cleanup (the one that started it, a second one, or one at the very end of
    a run) used to abort it half-way and leave Ray's agents running.
    """
    with interrupts_ignored():
        return _stop_launched(process, launch_id, adopted_except)


def _stop_launched(
    process: subprocess.Popen[bytes], launch_id: str, adopted_except: frozenset[int] | None
) -> list[int]:
    def ours() -> list[int]:
        pids = set(tagged_processes(launch_id))
        if adopted_except is not None:
            _reap(adopted_except)
            pids |= set(_children(os.getpid())) - adopted_except - {process.pid}
        return sorted(p for p in pids if _alive(p))

    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    termed: dict[int, float] = {}  # pid -> when it got SIGTERM
    killed: set[int] = set()
    deadline = time.monotonic() + _CLEANUP_DEADLINE_S
    quiet = 0
    while time.monotonic() < deadline and quiet < 2:
        pids = ours()
        quiet = 0 if pids else quiet + 1
        now = time.monotonic()
        for pid in pids:
            if pid not in termed:
                _signal(pid, signal.SIGTERM)
                termed[pid] = now
            elif pid not in killed and now - termed[pid] > _STOP_GRACE_S:
                _signal(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(_SETTLE_S if not pids else 0.1)
    left = ours()
    if left:
        log.warning("processes still running after the cleanup: %s", left)
    if termed:
        log.info("stopped %d leftover simulation processes", len(termed))
    return sorted(termed)


def _set_child_subreaper(on: bool) -> bool:
    """Linux ``prctl(PR_SET_CHILD_SUBREAPER)``: adopt orphaned descendants; whether it is set.

    Only for the main thread of a process that waits for its children itself (the CLI, a test
    process): adopted processes that exit are reaped by ``_reap``.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _children(parent: int) -> list[int]:
    """Pids whose parent is ``parent`` (zombies included)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
    return found


def _reap(keep: frozenset[int]) -> None:
    """Collect the exit status of adopted children that have exited (not those in ``keep``)."""
    for pid in _children(os.getpid()):
        if pid not in keep and not _alive(pid):
            with suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _signal(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


def tagged_processes(launch_id: str) -> list[int]:
    """Pids of live processes whose environment holds ``FEDSPEECH_LAUNCH_ID=launch_id``."""
    return processes_with_env(f"{LAUNCH_ID_VAR}={launch_id}")


def processes_with_env(needle: str) -> list[int]:
    """Pids of live processes (not this one) whose environment holds ``needle`` (``NAME=value``)."""
    wanted = needle.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0") and _alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return found


def write_run_config(path: Path, flat: Mapping[str, object]) -> Path:
    """Write a flat run config as TOML (what ``flwr run --run-config FILE`` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{key} = {_toml_value(value)}" for key, value in flat.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"flower-superlink exited with {process.returncode}; see {log_path}:\n"
                + _tail(log_path)
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(
        f"flower-superlink not healthy after {_STARTUP_TIMEOUT_S:.0f} s; see {log_path}"
    )


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is already dead; its parent reaps it


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
