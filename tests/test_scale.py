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
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
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


class _Shuffled(_Nodes):
    """The same nodes, listed in another order (Flower's SuperLink returns a set)."""

    def get_node_ids(self) -> Iterable[int]:
        return sorted(super().get_node_ids(), key=lambda n: (n * 7919) % 101)


def _cohorts(strategy: Any, grid: Grid, rounds: int) -> list[set[int]]:
    return [
        {
            m.metadata.dst_node_id
            for m in strategy.configure_train(r, ArrayRecord(), ConfigRecord(), grid)
        }
        for r in range(1, rounds + 1)
    ]


@pytest.mark.usefixtures("flower_server_identity")
@pytest.mark.parametrize("strategy_name", ["fedavg", "fedprox"])
def test_a_seeded_fixed_size_draw_repeats_its_cohorts_in_any_node_order(strategy_name: str) -> None:
    cfg = FedConfig(strategy=strategy_name, clients_per_round=10)
    first = _cohorts(make_strategy(cfg, cohort_seed=3), _Nodes(100), 4)
    again = _cohorts(make_strategy(cfg, cohort_seed=3), _Shuffled(100), 4)
    assert first == again
    assert all(len(c) == 10 and c <= set(range(1000, 1100)) for c in first)
    assert len({frozenset(c) for c in first}) == 4  # each round draws anew
    other = _cohorts(make_strategy(cfg, cohort_seed=4), _Nodes(100), 4)
    assert other != first
    # fraction-train sizes the draw as Flower does; the strategy keeps its own settings
    share = make_strategy(FedConfig(fraction_train=0.25, min_clients=2), cohort_seed=0)
    assert [len(c) for c in _cohorts(share, _Nodes(40), 2)] == [10, 10]
    assert (share.fraction_train, share.min_train_nodes, share.min_available_nodes) == (0.25, 2, 2)


@pytest.mark.usefixtures("flower_server_identity")
def test_without_a_seed_the_fixed_size_draw_is_flowers_own() -> None:
    cfg = FedConfig(clients_per_round=10)
    draws = {frozenset(c) for _ in range(3) for c in _cohorts(make_strategy(cfg), _Nodes(100), 1)}
    assert len(draws) > 1  # Python's unseeded random: 3 equal draws of 10 in 100 ~ 1e-26


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


# ------------------------------------------------- Flower's engine: polling by message (vce_poll)


def _link_state(nodes: int) -> tuple[Any, list[int], Any]:
    """A real in-memory link state set up as Flower's simulation does: run, ``nodes`` nodes,
    and an in-memory grid that pushes messages into it."""
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.simulation.run_simulation import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    run = Run.create_empty(run_id=1)
    run.primary_task_id, run.federation_id = 1, NOOP_FEDERATION_ID
    state.run_ids[1] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=1)
    node_ids = list(vce_api._register_nodes(nodes, factory))
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, node_ids, grid


def _drain(loop: Callable[..., None], state: Any, nodes: dict[int, int]) -> list[Message]:
    """What ``loop`` (an ``add_messages_to_queue``) hands to the actors in 3 of its passes."""
    import threading
    from queue import Queue

    queue: Queue[Message] = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=loop, args=(state, queue, nodes, stop))
    thread.start()
    time.sleep(0.25)  # the loops pass every 0.1 s
    stop.set()
    thread.join()
    return [queue.get() for _ in range(queue.qsize())]


def test_polling_by_message_delivers_what_flowers_loop_delivers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.supercore.task_identity import TaskIdentity

    from fedspeech_client.vce_poll import patch_simulation_engine, pending_nodes, polled_by_message

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):  # the SuperLink's
        monkeypatch.setattr(TaskIdentity, name, value)
    original = getattr(vce_api.add_messages_to_queue, "__wrapped__", vce_api.add_messages_to_queue)
    delivered = {}
    for name, loop in (("flower", original), ("ours", polled_by_message)):
        # Prepare: 200 nodes, messages for 5 of them (two for one node)
        state, ids, grid = _link_state(200)
        targets = [ids[3], ids[50], ids[50], ids[120], ids[199]]
        messages = [
            Message(
                RecordDict({"c": ConfigRecord({"i": i})}), dst_node_id=dst, message_type="train"
            )
            for i, dst in enumerate(targets)
        ]
        assert len(list(grid.push_messages(messages))) == 5
        assert pending_nodes(state, ids) == [ids[3], ids[50], ids[120], ids[199]]
        # Execute
        got = _drain(loop, state, {node: i for i, node in enumerate(ids)})
        # Assert: every message handed over once, none left undelivered
        assert sorted(int(str(m.content["c"]["i"])) for m in got) == [0, 1, 2, 3, 4]
        assert pending_nodes(state, ids) == []
        delivered[name] = sorted(
            (ids.index(m.metadata.dst_node_id), m.content["c"]["i"]) for m in got
        )
    assert delivered["flower"] == delivered["ours"]  # node (by position) and message alike
    # ... and the patch goes into Flower's engine once, wrapping its loop
    monkeypatch.setattr(vce_api, "add_messages_to_queue", original)
    assert patch_simulation_engine() is True
    assert vce_api.add_messages_to_queue.__wrapped__ is original  # type: ignore[attr-defined]
    assert patch_simulation_engine() is False  # already in place
