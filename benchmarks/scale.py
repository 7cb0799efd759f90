"""Benchmark: does a round cost the same with 10, 100 or 1000 virtual clients at a fixed cohort?

    python benchmarks/scale.py [--populations 10 100 1000] [--cohort 10] [--rounds 6]
        [--per-client 2] [--hidden-size 16] [--secure-aggregation] [--engine flower|local]
        [--data-dir DIR] [--keep DIR] [--json FILE]

One ``fedspeech simulate`` per population N, one after the other in this run, each with N
simulated SuperNodes (one IID partition of ``--per-client`` synthetic utterances each) of which
``clients-per-round = --cohort`` are sampled every round. Every population trains the same
amount per round (same cohort, same utterances per client, same tiny model, 1 local epoch,
non-private), so any difference is the framework's and this code's cost of a larger population.
The central evaluation set is fixed (8 utterances, ``eval-manifest``).

Per population it prints: startup (launch -> round 1 begins; the ServerApp starts its first round
while Ray still starts, so compare "launch -> round 1 end"), round 1 (Ray's actors warm up), the
mean of the later rounds ("steady round": Flower polls for messages and replies every 0.1 s, so
single rounds jump by 0.1 s and a median of a few flips), the clients' own seconds per round, and the
peak memory of the whole process tree (SuperLink, SuperExec, the simulation process with the
ServerApp, Ray's GCS, raylet, agents and ClientApp actors: ``benchmarks/procmem.py``), as the sum
of RSS and of PSS. Goal: the steady round time and the peak RSS within 1.2x of each other across
populations, peak RSS < 4 GB.

The corpus (``max(N) x per-client + 8`` synthetic utterances, or ``--distinct`` + 8 repeated
across the clients) is built once, each population uses its first ``N x per-client``
utterances, and the features are extracted before the clock starts (``--data-dir`` keeps both
for the next run). With ``--secure-aggregation`` every round runs
SecAgg+ (``secure-aggregation = true``).

``--engine`` picks the simulation engine (default ``flower``, what the figures in
docs/benchmarks.md were measured on; ``local``: ``fedspeech.app.local_engine``). The local
engine's processes (this one, its forkserver and workers) start no session of their own, so the
benchmark runs itself again with ``FEDSPEECH_SCALE_TAG`` in its environment and samples every
process that carries it; the sampler's thread makes the engine start a fresh forkserver instead
of forking this process (``fedspeech.app.zygote``), which costs its workers their start-up
imports once, in round 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install

from benchmarks.procmem import TreeMemorySampler
from benchmarks.workdirs import parse_round_args, work_folders
from fedspeech.app.simulate import simulate
from fedspeech.config import RunConfig
from fedspeech.fed_data import client_manifest, corpus_manifest, feature_cache_dir
from fedspeech.pipeline import load_examples
from fedspeech_features.manifest import read_manifest, write_manifest

GOAL_RATIO, GOAL_RSS_BYTES = 1.2, 4 * 1024**3
EVAL_UTTERANCES = 8
TAG = "FEDSPEECH_SCALE_TAG"  # marks the processes of a local-engine run (see the docstring)

# Tiny per-client work: what is measured is the federation, not the training.
SETTINGS: dict[str, Any] = {
    **{"num-layers": 1, "dropout": 0.0, "epochs": 1, "lr": 0.003, "dp": False},
    **{"n-mfcc": 13, "n-mels": 40, "partition": "iid", "holdout-speakers": 0},
    **{"round-retries": 0, "min-successful-clients": 1},
}


def prepare(args: argparse.Namespace, data_dir: Path) -> tuple[Path, Path, dict[int, Path]]:
    """Build the corpus, the fixed eval set and one corpus manifest per population; warm caches.

    Returns:
        The corpus folder, the eval manifest and ``{population: manifest}``.
    """
    needed = max(args.populations) * args.per_client
    distinct = min(args.distinct, needed) if args.distinct else needed
    cfg = RunConfig.from_flat({**SETTINGS, "synthetic-utterances": distinct + EVAL_UTTERANCES})
    corpus = corpus_manifest(cfg, data_dir)
    rows = read_manifest(corpus)
    eval_manifest = corpus.parent / "scale-eval.tsv"
    write_manifest(eval_manifest, rows[-EVAL_UTTERANCES:])
    manifests = {}
    for n in args.populations:
        manifest = corpus.parent / f"scale-n{n}x{args.per_client}-d{distinct}.tsv"
        write_manifest(manifest, [rows[i % distinct] for i in range(n * args.per_client)])
        manifests[n] = manifest
        population_cfg = RunConfig.from_flat(_overrides(args, n, manifest, eval_manifest, data_dir))
        client_manifest(population_cfg, data_dir, 0, n)  # writes all N partitions (not timed)
        load_examples(manifest, population_cfg.features, cache_root=feature_cache_dir(data_dir))
    load_examples(eval_manifest, cfg.features, cache_root=feature_cache_dir(data_dir))
    return corpus.parent, eval_manifest, manifests


def _overrides(
    args: argparse.Namespace, n: int, manifest: Path, eval_manifest: Path, data_dir: Path
) -> dict[str, Any]:
    return {
        **SETTINGS,
        "corpus": str(manifest),
        "eval-manifest": str(eval_manifest),
        "num-partitions": n,
        "clients-per-round": min(args.cohort, n),
        "min-clients": min(args.cohort, n),
        "num-server-rounds": args.rounds,
        "hidden-size": args.hidden_size,
        "batch-size": args.per_client,
        "data-dir": str(data_dir),
        "secure-aggregation": args.secure_aggregation,
    }


def run_population(
    args: argparse.Namespace,
    n: int,
    manifest: Path,
    eval_manifest: Path,
    data_dir: Path,
    work: Path,
) -> dict[str, Any]:
    """One simulation of ``n`` clients; returns its measurements."""
    run_dir = work / f"run-n{n}"
    overrides = _overrides(args, n, manifest, eval_manifest, data_dir)
    overrides["tracking-uri"] = f"sqlite:///{work / 'mlflow.db'}"
    log_file = work / f"flwr-n{n}.log"
    launched = time.time()
    start = time.perf_counter()
    flower = f"FLWR_HOME={run_dir / '.flwr'}"
    needle = flower if args.engine == "flower" else f"{TAG}={os.environ[TAG]}"
    with TreeMemorySampler(needle) as sampler:
        outcome = simulate(
            overrides=overrides, num_supernodes=n, out=run_dir, output=log_file, engine=args.engine
        )
    wall = time.perf_counter() - start
    if not outcome.finished:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"N={n}: simulation did not finish (exit {outcome.returncode}):\n{tail}")
    history = outcome.history
    later = history[1:] or history
    return {
        "population": n,
        "cohort": min(args.cohort, n),
        "wall": wall,
        "startup": (run_dir / "eval_manifest.tsv").stat().st_mtime - launched,
        "round1": history[0]["round_seconds"],
        "steady_round": statistics.mean(h["round_seconds"] for h in later),
        "steady_train": statistics.mean(h["train_seconds"] for h in later),
        "client_seconds": statistics.mean(h["client_seconds"] or 0.0 for h in later),
        "clients_ok": [h["clients_ok"] for h in history],
        "peak_rss": sampler.peak.rss_bytes,
        "peak_pss": sampler.peak.pss_bytes,
        "processes": sampler.peak.processes,
        "rss_by_kind": sampler.peak.by_kind,
        "rounds": history,
    }


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> bool:
    """Print the populations side by side; return whether the goals are met."""
    gib = 1024**3
    rows = [
        ("clients per round", lambda r: f"{r['cohort']}"),
        ("startup s", lambda r: f"{r['startup']:.1f}"),
        ("round 1 s", lambda r: f"{r['round1']:.2f}"),
        ("launch->round 1 end", lambda r: f"{r['startup'] + r['round1']:.1f}"),
        ("steady round s", lambda r: f"{r['steady_round']:.2f}"),
        ("  train phase s", lambda r: f"{r['steady_train']:.2f}"),
        ("  clients' own s", lambda r: f"{r['client_seconds']:.2f}"),
        ("peak RSS GiB", lambda r: f"{r['peak_rss'] / gib:.2f}"),
        ("peak PSS GiB", lambda r: f"{r['peak_pss'] / gib:.2f}"),
        ("processes", lambda r: f"{r['processes']}"),
        ("wall s", lambda r: f"{r['wall']:.1f}"),
    ]
    mode = "SecAgg+" if args.secure_aggregation else "plain FedAvg"
    print(
        f"setup: {args.engine} engine, {args.rounds} rounds, {args.per_client} utterances per "
        f"client, BiGRU 1x{args.hidden_size}, 1 epoch, non-private, {mode}; steady = mean of "
        f"rounds 2..{args.rounds}"
    )
    print(f"{'population':<20}" + "".join(f"{r['population']:>12}" for r in results))
    for label, cell in rows:
        print(f"{label:<20}" + "".join(f"{cell(r):>12}" for r in results))
    kinds = sorted({k for r in results for k in r["rss_by_kind"]})
    for kind in kinds:
        print(
            f"  RSS {kind:<15}"
            + "".join(f"{r['rss_by_kind'].get(kind, 0) / gib:>12.2f}" for r in results)
        )
    time_ratio = _ratio([r["steady_round"] for r in results])
    rss_ratio = _ratio([r["peak_rss"] for r in results])
    worst_rss = max(r["peak_rss"] for r in results)
    met = time_ratio <= GOAL_RATIO and rss_ratio <= GOAL_RATIO and worst_rss < GOAL_RSS_BYTES
    print(f"steady round time max/min  {time_ratio:.2f}  (goal <= {GOAL_RATIO})")
    print(f"peak RSS max/min           {rss_ratio:.2f}  (goal <= {GOAL_RATIO})")
    print(f"largest peak RSS           {worst_rss / gib:.2f} GiB  (goal < 4 GiB)")
    print(f"goals {'met' if met else 'NOT met'}")
    return met


def _ratio(values: list[float]) -> float:
    return max(values) / min(values) if min(values) > 0 else float("inf")


def main() -> None:
    """Parse the arguments, run every population, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--cohort", type=int, default=10, help="clients sampled per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-client", type=int, default=2, help="utterances per client")
    parser.add_argument("--hidden-size", type=int, default=16)
    parser.add_argument(
        "--distinct",
        type=int,
        default=0,
        help="synthesize only this many utterances and repeat them across the clients "
        "(0: every client its own; 10,000 clients x 2 would take ~20 min to synthesize)",
    )
    parser.add_argument("--secure-aggregation", action="store_true", help="rounds through SecAgg+")
    parser.add_argument("--engine", choices=("flower", "local"), default="flower")
    args = parse_round_args(parser)
    if args.engine == "local" and TAG not in os.environ:  # tag every process of the run
        env = {**os.environ, TAG: uuid.uuid4().hex}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    with work_folders(args, "fedspeech-scale-") as (work, data_dir):
        start = time.perf_counter()
        _, eval_manifest, manifests = prepare(args, data_dir)
        print(f"prepared corpus, partitions and features in {time.perf_counter() - start:.0f} s")
        results = []
        for n in args.populations:
            results.append(run_population(args, n, manifests[n], eval_manifest, data_dir, work))
            print(
                f"N={n}: steady round {results[-1]['steady_round']:.2f} s, "
                f"peak RSS {results[-1]['peak_rss'] / 1024**3:.2f} GiB",
                flush=True,
            )
        report(results, args)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
