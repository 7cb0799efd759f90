"""Benchmark: where the local engine's seconds go, step by step (fed_overhead.py's workload).

    python benchmarks/local_timeline.py [--clients 8] [--rounds 3] [--utterances 1200]
        [--new-store] [--keep DIR]

One ``fedspeech simulate --engine local`` run of ``benchmarks/fed_overhead.py``'s simulation (8
DP clients x 3 rounds by default). The server runs in this process, so each of its steps is timed
by a wrapper: pre-flight, opening the tracking run, round 0's evaluation, each round's exchange
with the clients and its bookkeeping, the final model; the workers' start-up is timed from the
pool's warm-up futures (``WorkerPool.warmed``). Times are seconds from the ``simulate`` call,
the first of this process (as for a user's ``fedspeech simulate``: nothing of the server or the
workers imported or started before). By default the MLflow store exists already (another process
creates its tables first), as for a user's second run; ``--new-store`` times the run that
creates it.

The overhead's floor at this size is the later of "server ready" and "workers ready" (round 1
cannot start before both), plus what each round and the end add: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import shutil
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

from benchmarks.fed_overhead import SETTINGS, create_store, warm_feature_cache
from fedspeech.app import local_engine
from fedspeech.app.simulate import simulate
from fedspeech.config import RunConfig

# (module, attribute path, label) of each timed server step
STEPS = (
    ("fedspeech.app.preflight", "check_run", "pre-flight"),
    ("fedspeech_server.tracking", "open_tracker", "open the tracking run (MLflow)"),
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


def one_run(args: argparse.Namespace, work: Path, overrides: dict[str, Any]) -> Timeline:
    """One local-engine simulation in ``work / 'run'`` (replaced), timed. Once per process: the
    server's modules bind the wrapped steps when ``instrumented`` first imports them."""
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
    return timeline


def main() -> None:
    """Prepare the data and the MLflow store, run once, print the timeline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--utterances", type=int, default=1200)
    parser.add_argument("--new-store", action="store_true", help="time the run creating MLflow's")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    args = parser.parse_args()
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
        if not args.new_store:
            create_store(overrides["tracking-uri"])
        timeline = one_run(args, work, overrides)
    store = "a new" if args.new_store else "an existing"
    print(f"local engine, {args.clients} DP clients x {args.rounds} rounds, {store} MLflow store")
    print(f"{'from':>7} {'to':>7} {'seconds':>8}  step")
    for start, end, label in sorted(timeline.events):
        print(f"{start:7.2f} {end:7.2f} {end - start:8.2f}  {label}")


if __name__ == "__main__":
    main()
