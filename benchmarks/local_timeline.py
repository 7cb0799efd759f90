"""Benchmark: where the local engine's seconds go, step by step (fed_overhead.py's workload).

    python benchmarks/local_timeline.py [--clients 8] [--rounds 3] [--utterances 1200]
        [--new-store | --hung-server | --no-tracking] [--keep DIR]

One ``fedspeech simulate --engine local`` run of ``benchmarks/fed_overhead.py``'s simulation (8
DP clients x 3 rounds by default). The server runs in this process, so each of its steps is timed
by a wrapper: pre-flight, opening the tracking run (and when the MLflow tracker's own thread has
opened the MLflow run), round 0's evaluation, each round's exchange with the clients and its
bookkeeping, the final model; the workers' start-up is timed from the pool's warm-up futures
(``WorkerPool.warmed``). Times are seconds from the ``simulate`` call, the first of this process
(as for a user's ``fedspeech simulate``: nothing of the server or the workers imported or started
before). By default the MLflow store exists already (another process creates its tables first),
as for a user's second run; ``--new-store`` times the run that creates it; ``--hung-server``
tracks to a server on 127.0.0.1 that accepts connections and never answers (each MLflow request
then waits for the tracker's 10 s timeout); ``--no-tracking`` records the run in its folder only
(``tracking-uri`` empty: no MLflow import at all), which gives the overhead without MLflow's.

The overhead's floor at this size is the later of "server ready" and "workers ready" (round 1
cannot start before both), plus what each round and the end add: docs/benchmarks.md.

Where ``/proc/stat`` exists, another process samples how busy the machine's cores are every 0.1 s
(the simulating process must stay single-threaded: ``fedspeech.app.zygote``), and the last lines
give the idle core-seconds before round 1, in each round and after the last. Even a schedule that
left no core idle would take the run's CPU-seconds / cores: that bound, over the run's ideal time
(as ``fed_overhead.py`` computes it), is the best overhead ratio this run's work allows here.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install

from benchmarks.fed_overhead import SETTINGS, create_store, ideal_seconds, warm_feature_cache
from fedspeech.app import local_engine
from fedspeech.app.simulate import simulate
from fedspeech.config import RunConfig
from fedspeech_server.mlflow_tracking import MlflowTracker  # imports no MLflow (its thread does)

# (module, attribute path, label) of each timed server step
STEPS = (
    ("fedspeech.app.preflight", "check_run", "pre-flight"),
    ("fedspeech_server.tracking", "open_tracker", "open the tracking run (MLflow: on a thread)"),
    ("fedspeech_server.run", "FederatedRun.evaluate_start", "round 0: evaluate the start model"),
    ("fedspeech.app.local_engine", "PoolGrid.send_and_receive", "round: clients train"),
    ("fedspeech_server.run", "FederatedRun.finish_round", "round: aggregate, evaluate, save"),
    ("fedspeech_server.run", "FederatedRun.finish", "final model, reports, plots, MLflow"),
    ("fedspeech.app.local_engine", "WorkerPool.close", "stop the workers"),
)


class Timeline:
    """Steps as (start, end, label), seconds from ``t0``."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.events: list[tuple[float, float, str]] = []

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def timed(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.events.append((start, self.now(), label))

        return wrapper


@contextlib.contextmanager
def instrumented(timeline: Timeline) -> Iterator[None]:
    """Wrap every step of ``STEPS`` and note each worker's warm-up (readiness) time."""
    with contextlib.ExitStack() as stack:
        for module_name, path, label in STEPS:
            module = sys.modules.get(module_name) or __import__(module_name, fromlist=["_"])
            owner: Any = module
            *parents, name = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            stack.enter_context(
                mock.patch.object(owner, name, timeline.timed(getattr(owner, name), label))
            )
        opening = MlflowTracker.__init__

        def open_and_watch(tracker: MlflowTracker, *args: Any, **kwargs: Any) -> None:
            opening(tracker, *args, **kwargs)
            began = timeline.now()

            def watch() -> None:  # run_id waits for the first attempt to reach MLflow
                _ = tracker.run_id
                timeline.events.append((began, timeline.now(), "MLflow run open (its thread)"))

            threading.Thread(target=watch, daemon=True).start()

        stack.enter_context(mock.patch.object(MlflowTracker, "__init__", open_and_watch))
        start = local_engine.WorkerPool.start

        def start_and_watch(pool: local_engine.WorkerPool) -> None:
            start(pool)
            timeline.events.append((0.0, timeline.now(), "worker pool started (background)"))

            def watch() -> None:  # the warm-up futures appear as the workers are created
                seen = 0
                while seen < pool.workers:
                    for future in pool.warmed[seen:]:
                        future.add_done_callback(_ready(timeline, seen))
                        seen += 1
                    time.sleep(0.01)

            threading.Thread(target=watch, daemon=True).start()

        stack.enter_context(mock.patch.object(local_engine.WorkerPool, "start", start_and_watch))
        yield


def _ready(timeline: Timeline, index: int) -> Callable[[Future[int]], None]:
    def note(_: Future[int]) -> None:
        at = timeline.now()
        timeline.events.append((at, at, f"worker {index} ready (imports done)"))

    return note


# Prints "<perf_counter> <jiffies> <idle jiffies>" of all cores every 0.1 s (perf_counter is the
# system-wide monotonic clock on Linux, so the times compare with this process's).
SAMPLER = """
import sys, time
while True:
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    print(time.perf_counter(), sum(fields), fields[3] + fields[4], flush=True)
    time.sleep(0.1)
"""


@contextlib.contextmanager
def cpu_sampled(out: Path) -> Iterator[Path | None]:
    """Sample the cores' busy time into ``out`` while the block runs (None without /proc)."""
    if not Path("/proc/stat").is_file():
        yield None
        return
    with out.open("w") as sink:
        sampler = subprocess.Popen([sys.executable, "-c", SAMPLER], stdout=sink)
        try:
            time.sleep(0.3)  # the sampler's first line before the clock starts
            yield out
        finally:
            sampler.terminate()
            sampler.wait()


# Accepts connections on a free port of 127.0.0.1 (printed first) and never answers.
HUNG_SERVER = """
import socket
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
held = []
while True:
    held.append(server.accept()[0])
"""


@contextlib.contextmanager
def hung_server() -> Iterator[str]:
    """The URL of a tracking server that never answers, in another process (this one must stay
    single-threaded for the zygote) while the block runs."""
    server = subprocess.Popen(
        [sys.executable, "-c", HUNG_SERVER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        yield f"http://127.0.0.1:{int(server.stdout.readline())}"
    finally:
        server.terminate()
        server.wait()


def idle_core_seconds(
    samples: Path, t0: float, bounds: list[tuple[str, float, float]]
) -> dict[str, float]:
    """Idle core-seconds of the machine in each (label, from, to) span, seconds from ``t0``."""
    rows = [tuple(map(float, line.split())) for line in samples.read_text().splitlines()]
    idle = dict.fromkeys((label for label, _, _ in bounds), 0.0)
    for (t_a, _, idle_a), (t_b, _, idle_b) in itertools.pairwise(rows):
        middle = (t_a + t_b) / 2 - t0
        for label, start, end in bounds:
            if start <= middle < end:
                idle[label] += (idle_b - idle_a) / os.sysconf("SC_CLK_TCK")
    return idle


def one_run(
    args: argparse.Namespace, work: Path, overrides: dict[str, Any]
) -> tuple[Timeline, list[dict[str, Any]]]:
    """One local-engine simulation in ``work / 'run'`` (replaced), timed; with its round history.
    Once per process: the server's modules bind the wrapped steps when ``instrumented`` first
    imports them."""
    shutil.rmtree(work / "run", ignore_errors=True)
    timeline = Timeline()
    with instrumented(timeline):
        timeline.t0 = time.perf_counter()
        outcome = simulate(
            overrides=overrides,
            num_supernodes=args.clients,
            out=work / "run",
            output=work / "run.log",
            engine="local",
        )
    if not outcome.finished:
        raise RuntimeError(f"the simulation did not finish; see {work / 'run.log'}")
    timeline.events.append((timeline.now(), timeline.now(), "simulate() returned"))
    return timeline, outcome.history


def main() -> None:
    """Prepare the data and the MLflow store, run once, print the timeline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--utterances", type=int, default=1200)
    parser.add_argument("--new-store", action="store_true", help="time the run creating MLflow's")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    parser.add_argument(
        "--hung-server",
        action="store_true",
        help="track to an MLflow URL on 127.0.0.1 that accepts connections and never answers",
    )
    parser.add_argument(
        "--no-tracking",
        action="store_true",
        help="no MLflow: the run is recorded in its folder only (tracking-uri empty)",
    )
    args = parser.parse_args()
    if sum((args.new_store, args.hung_server, args.no_tracking)) > 1:
        parser.error("choose at most one of --new-store, --hung-server, --no-tracking")
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="fedspeech-local-timeline-") as tmp:
        work = args.keep.resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        overrides = {
            **SETTINGS,
            **{"synthetic-utterances": args.utterances, "hidden-size": 64, "epochs": 1},
            **{"num-server-rounds": args.rounds, "min-clients": args.clients},
            "data-dir": str(work / "data"),
            "tracking-uri": f"sqlite:///{work / 'mlflow.db'}",
        }
        cfg = RunConfig.from_flat({**overrides, "num-partitions": args.clients})
        warm_feature_cache(cfg, work / "data", args.clients)
        if args.no_tracking:
            overrides["tracking-uri"] = ""
        elif not args.new_store and not args.hung_server:
            create_store(overrides["tracking-uri"])
        with contextlib.ExitStack() as stack:
            if args.hung_server:
                overrides["tracking-uri"] = stack.enter_context(hung_server())
            samples = stack.enter_context(cpu_sampled(work / "cpu.txt"))
            timeline, history = one_run(args, work, overrides)
        idle = idle_core_seconds(samples, timeline.t0, phases(timeline)) if samples else None
    if args.no_tracking:
        store = "no MLflow (the run folder only)"
    elif args.hung_server:
        store = "a hung MLflow server"
    else:
        store = f"{'a new' if args.new_store else 'an existing'} MLflow store"
    print(f"local engine, {args.clients} DP clients x {args.rounds} rounds, {store}")
    print(f"{'from':>7} {'to':>7} {'seconds':>8}  step")
    for start, end, label in sorted(timeline.events):
        print(f"{start:7.2f} {end:7.2f} {end - start:8.2f}  {label}")
    cores = len(os.sched_getaffinity(0))
    wall = max(end for _, end, _ in timeline.events)
    ideal = ideal_seconds(history, min(args.clients, cores))
    cpu_ideal = ideal_seconds(history, min(args.clients, cores), "client_cpu_seconds")
    print(f"ideal time {ideal:.2f} s: overhead ratio {wall / ideal:.2f}; from the clients' CPU "
          f"time {cpu_ideal:.2f} s: {wall / cpu_ideal:.2f}")  # fmt: skip
    if idle is not None:
        spans = ", ".join(f"{label} {seconds:.2f}" for label, seconds in idle.items())
        print(f"idle core-seconds ({cores} cores): {spans}; {sum(idle.values()):.2f} in all")
        packed = wall - sum(idle.values()) / cores
        print(f"with no core ever idle: {packed:.2f} s, overhead ratio {packed / ideal:.2f}")


def phases(timeline: Timeline) -> list[tuple[str, float, float]]:
    """(label, from, to) of the run's start (to round 1), each round (from its clients' start to
    the next round's, its bookkeeping included), and what follows the last round."""
    starts = sorted(start for start, _, label in timeline.events if label == "round: clients train")
    last = max(end for start, end, label in timeline.events if label.startswith("round: "))
    end = max(end for _, end, _ in timeline.events)
    bounds = [*starts, last]
    rounds = [(f"round {i + 1}", a, b) for i, (a, b) in enumerate(itertools.pairwise(bounds))]
    return [("before round 1", 0.0, starts[0]), *rounds, ("after", last, end)]


if __name__ == "__main__":
    main()
