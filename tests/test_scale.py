"""Large populations (issue 8 part 3): nothing a client or a round does may grow with them.

The measurement itself is ``benchmarks/scale.py`` (not a test); these check the pieces it relies
on: a fixed cohort (``clients-per-round``) whatever the population, O(1) work for a client to find
its partition among 1000, and the process-tree memory sampler.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from benchmarks.procmem import TreeMemorySampler
from fedspeech.app.simulate import simulate
from fedspeech.config import ConfigError, FedConfig, RunConfig
from fedspeech.fed_data import client_manifest
from fedspeech_features.manifest import Utterance, write_manifest
from fedspeech_server.strategy import make_strategy


class _Nodes(Grid):
    """A grid that only knows which nodes are connected (enough for sampling)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> Iterable[int]:
        return range(1000, 1000 + self.n)

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Any:
        raise NotImplementedError


@pytest.mark.usefixtures("flower_server_identity")
@pytest.mark.parametrize("population", [10, 100, 1000])
def test_clients_per_round_fixes_the_cohort_whatever_the_population(population: int) -> None:
    strategy = make_strategy(FedConfig(clients_per_round=10, fraction_train=0.5))
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Nodes(population)))
    nodes = {m.metadata.dst_node_id for m in messages}
    assert len(messages) == len(nodes) == 10
    # without it, the cohort is a share of the population
    share = make_strategy(FedConfig(fraction_train=0.1, min_clients=2))
    assert len(
        list(share.configure_train(1, ArrayRecord(), ConfigRecord(), _Nodes(population)))
    ) == (max(2, population // 10))


def test_clients_per_round_cannot_exceed_the_simulated_clients() -> None:
    with pytest.raises(ConfigError, match="clients-per-round 20 exceeds the 10"):
        simulate(overrides={"clients-per-round": 20}, num_supernodes=10)
    with pytest.raises(ConfigError, match="clients-per-round"):
        RunConfig.from_flat({"clients-per-round": -1})


def test_a_client_finds_its_partition_among_1000_without_touching_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: 3000 utterances (the split reads no audio) in 1000 IID partitions
    rows = [Utterance(tmp_path / f"{i}.wav", "hi", f"spk{i % 50}", 1.0) for i in range(3000)]
    write_manifest(tmp_path / "corpus.tsv", rows)
    flat = {"corpus": str(tmp_path / "corpus.tsv"), "partition": "iid", "holdout-speakers": 0}
    cfg = RunConfig.from_flat(flat)
    data = tmp_path / "data"
    first = client_manifest(cfg, data, 0, 1000)  # the first caller writes all 1000
    # Execute: every other partition's manifest disappears; a later client finds its own,
    # counting the file-system lookups it makes (its time: benchmarks/fast_paths.py)
    for manifest in first.parent.parent.glob("client_*/manifest.tsv"):
        if manifest.parent.name != "client_7":
            manifest.unlink()
    with _counting_lookups(monkeypatch) as lookups:
        mine = client_manifest(cfg, data, 7, 1000)
    # Assert: its manifest, found without checking (or rewriting) the other 999
    assert mine.parent.name == "client_7" and mine.is_file()
    assert not (first.parent.parent / "client_3" / "manifest.tsv").exists()
    assert 0 < sum(lookups.values()) < 50, lookups  # a few, not one per partition


@contextlib.contextmanager
def _counting_lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts of the ``os`` calls that look at files or folders, while the block runs."""
    counts: dict[str, int] = {}

    def counted(name: str) -> Callable[..., Any]:
        real = getattr(os, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)

        return call

    with monkeypatch.context() as patch:
        for name in ("stat", "lstat", "scandir", "listdir", "access"):
            patch.setattr(os, name, counted(name))
        yield counts


def test_the_memory_sampler_sums_the_tagged_processes_only() -> None:
    # Prepare: two tagged processes holding ~60 MB each, one untagged holding ~60 MB
    tag = f"FEDSPEECH_SCALE_TEST={uuid.uuid4().hex}"
    hold = "import sys,time; b=bytearray(60*2**20); b[::4096]=b'x'*len(b[::4096]); time.sleep(30)"
    env = {**os.environ, tag.split("=")[0]: tag.split("=")[1]}
    procs = [subprocess.Popen([sys.executable, "-c", hold], env=env) for _ in range(2)]
    procs.append(subprocess.Popen([sys.executable, "-c", hold]))
    try:
        time.sleep(1.5)  # allocated
        # Execute
        with TreeMemorySampler(tag, interval=0.1, pss_every=1) as sampler:
            time.sleep(0.5)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    # Assert: two processes of > 60 MB each, the untagged one not counted
    assert sampler.peak.processes == 2
    assert 2 * 60 * 2**20 < sampler.peak.rss_bytes < 2 * 200 * 2**20
    assert 2 * 60 * 2**20 < sampler.peak.pss_bytes <= sampler.peak.rss_bytes
