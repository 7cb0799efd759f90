"""The local engine's forkserver forked from the simulating process (``fedspeech.app.zygote``).

Each check runs in a fresh Python (a process that never started a forkserver, as a user's
``fedspeech simulate``): its workers must come from a fork of that process, hold none of its
descriptors, and the fork must end with the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fedspeech.app import zygote

_SCRIPT = r"""
import json, os, select, sys, time
from fedspeech.app.local_engine import WorkerPool

threads = int(sys.argv[1])
read_end, write_end = os.pipe()  # a descriptor this process holds when the pool starts
pool = WorkerPool(1, threads=threads, preload=("fedspeech_client.app",))
pool.start()
while not pool.warmed:  # the worker is created in the background
    time.sleep(0.01)
worker = pool.warmed[0].result(timeout=120)
os.close(write_end)  # now only a process that kept a copy holds the write end
eof = bool(select.select([read_end], [], [], 30)[0]) and os.read(read_end, 1) == b""
with open(f"/proc/{worker}/stat") as fh:
    server = int(fh.read().rsplit(")", 1)[1].split()[1])  # the worker's parent: the forkserver
with open(f"/proc/{server}/stat") as fh:
    server_parent = int(fh.read().rsplit(")", 1)[1].split()[1])
with open(f"/proc/{server}/cmdline", "rb") as fh:
    server_cmdline = fh.read().split(b"\0")
with open("/proc/self/cmdline", "rb") as fh:
    own_cmdline = fh.read().split(b"\0")
pool.close()
print(json.dumps({
    "me": os.getpid(), "server": server, "forked": server_parent == os.getpid()
    and server_cmdline == own_cmdline, "eof": eof,
}))
"""


def _run(threads: int) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(threads)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _gone(pid: int) -> bool:
    for _ in range(100):  # it notices its parent's exit at once; allow for a slow machine
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with Path(f"/proc/{pid}/stat").open() as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped
                return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="the zygote is Linux-only")
def test_workers_come_from_a_fork_of_this_process_holding_none_of_its_descriptors() -> None:
    # Execute: a fresh process starts a one-worker pool (one torch thread: the zygote's case)
    result = _run(threads=1)
    # Assert: the forkserver is a fork of it (its child, its command line); the pipe it had
    # open reached EOF when it closed its own end; the fork ended with it
    assert result["forked"] is True and result["eof"] is True
    assert _gone(int(str(result["server"])))


@pytest.mark.skipif(sys.platform != "linux", reason="the zygote is Linux-only")
def test_workers_with_several_torch_threads_come_from_a_fresh_forkserver() -> None:
    # (GNU OpenMP's pool does not survive a fork: such a worker could hang)
    result = _run(threads=2)
    assert result["forked"] is False and result["eof"] is True
    assert _gone(int(str(result["server"])))


@pytest.mark.skipif(sys.platform != "linux", reason="the zygote is Linux-only")
def test_the_fork_is_refused_where_it_is_not_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    assert zygote.usable(2) == "2 torch threads per worker"
    with monkeypatch.context() as patched:
        patched.setattr(torch.cuda, "is_initialized", lambda: True)
        assert "CUDA is initialized" in str(zygote.usable(1))
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:  # (this test process may run a forkserver already: either refusal will do)
        reason = zygote.usable(1)
        assert reason is not None
        assert "threads in this process" in reason or reason == "a forkserver runs already"
    finally:
        stop.set()
        other.join()


_FIRST_ROUNDS = r"""
import json, sys
from fedspeech.app.local_engine import PRELOAD, PRELOAD_DP

preload = PRELOAD_DP if sys.argv[1] == "dp" else PRELOAD
for name in preload:
    __import__(name)
import torch
from fedspeech.config import RunConfig
from fedspeech.model import BiGRUCTC, plain_state_dict
from fedspeech_client.local_round import run_round
from tests.conftest import TINY_NODE

torch.set_num_threads(1)
before = set(sys.modules)
cfg = RunConfig.from_flat({**TINY_NODE, "batch-size": 4, "dp": sys.argv[1] == "dp"})
g = torch.Generator().manual_seed(0)
examples = [
    type("U", (), {"feats": torch.randn(10, 6, generator=g), "labels": torch.tensor([3, 4])})()
    for _ in range(8)
]
state = plain_state_dict(BiGRUCTC(cfg.model.model_config(cfg.features.frame_dim, 29)))
outcome = run_round(state, examples, cfg, server_round=1, prior=None, budget=None)
assert outcome.state_dict is not None
print(json.dumps(sorted(set(sys.modules) - before)))
"""


@pytest.mark.parametrize("mode", ["dp", "plain"])
def test_a_workers_first_round_imports_nothing_the_preload_left_out(mode: str) -> None:
    # (what a worker's first message imports, every worker pays again: torch._dynamo, which the
    # first optimizer imports, cost each worker 0.45-0.7 s before the forkserver preloaded it)
    # Execute: a fresh process imports the local engine's preload, then trains one round
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_ROUNDS, mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    # Assert: the round imported no module but torch.profiler's CUPTI stub (~1 ms)
    assert [name for name in imported if not name.startswith("torch.profiler.")] == []
