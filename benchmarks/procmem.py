"""Peak memory of a process tree that detaches from its parent (a Flower simulation), from /proc.

A simulation's processes (SuperLink, SuperExec, ServerApp, the simulation process, Ray's GCS,
raylet, agents and ClientApp actors) start new sessions and are not all children of the launcher,
but all of them inherit its environment: ``TreeMemorySampler`` follows every process whose
environment holds a given ``NAME=value`` (``fedspeech simulate`` sets ``FLWR_HOME=<run>/.flwr``),
and samples in a background thread the sum of their resident set sizes (RSS: shared pages count
once per process, so the Ray object store and shared libraries are over-counted) and of their
proportional set sizes (PSS: shared pages split between the processes that map them; the sum is
what the processes take from the machine).

    with TreeMemorySampler("FLWR_HOME=/tmp/run/.flwr") as sampler:
        ...  # run the simulation
    sampler.peak.rss_bytes, sampler.peak.pss_bytes, sampler.peak.processes
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

_PAGE_KB = 1024


@dataclass
class MemoryPeak:
    """The largest sums seen (each maximised on its own) and what made up the RSS peak.

    Attributes:
        rss_bytes: largest sum of VmRSS over the matching processes.
        pss_bytes: largest sum of Pss (sampled less often: reading it walks page tables).
        processes: how many processes matched at the RSS peak.
        by_kind: RSS bytes per kind of process (``classify``) at the RSS peak.
        samples: RSS samples taken.
    """

    rss_bytes: int = 0
    pss_bytes: int = 0
    processes: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    samples: int = 0


class TreeMemorySampler:
    """Samples the processes whose environment holds ``needle`` (see the module docstring).

    Args:
        needle: ``NAME=value`` to find in ``/proc/<pid>/environ``.
        interval: seconds between RSS samples.
        pss_every: take PSS every this many RSS samples.
    """

    def __init__(self, needle: str, *, interval: float = 0.25, pss_every: int = 4) -> None:
        self._needle = needle.encode()
        self._interval = interval
        self._pss_every = pss_every
        self._known: dict[int, bool] = {}  # pid -> matches (a process's environment is fixed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self.peak = MemoryPeak()

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        count = 0
        while not self._stop.is_set():
            pids = self._matching()
            rss = {pid: _status_kb(pid, "VmRSS") * _PAGE_KB for pid in pids}
            total = sum(rss.values())
            self.peak.samples += 1
            if total > self.peak.rss_bytes:
                self.peak.rss_bytes, self.peak.processes = total, sum(v > 0 for v in rss.values())
                kinds: dict[str, int] = {}
                for pid, value in rss.items():
                    kind = classify(_cmdline(pid))
                    kinds[kind] = kinds.get(kind, 0) + value
                self.peak.by_kind = kinds
            if count % self._pss_every == 0:
                pss = sum(_rollup_kb(pid, "Pss") * _PAGE_KB for pid in pids)
                self.peak.pss_bytes = max(self.peak.pss_bytes, pss)
            count += 1
            self._stop.wait(self._interval)

    def _matching(self) -> list[int]:
        live = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid not in self._known:
                try:
                    environ = (entry / "environ").read_bytes()
                except OSError:
                    continue
                self._known[pid] = self._needle in environ.split(b"\0")
            if self._known[pid]:
                live.append(pid)
        return live


def classify(cmdline: str) -> str:
    """A short kind for a simulation process, from its command line."""
    for marker, kind in (
        ("flower-superlink", "superlink"),
        ("flower-superexec", "superexec"),
        ("flwr-serverapp", "serverapp"),
        ("flwr-simulation", "simulation"),
        ("multiprocessing.forkserver", "local workers"),  # the local engine's, and its workers
        ("ClientAppActor", "ray actor"),
        ("raylet", "ray raylet"),
        ("gcs_server", "ray gcs"),
        ("ray::", "ray worker"),
        ("ray", "ray other"),
    ):
        if marker in cmdline:
            return kind
    return "other"


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _rollup_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0
