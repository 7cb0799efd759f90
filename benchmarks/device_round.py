"""Benchmark: what a private cross-device round costs next to a non-private one.

    python benchmarks/device_round.py [--corpus MANIFEST] [--clients 100] [--cohort 10]
        [--rounds 5] [--engine local|flower] [--init-model @en-public-small] [--trainable all]
        [--per-message 6] [--skip-simulation] [--data-dir DIR] [--keep DIR] [--json FILE]

Two parts, one run, DP and non-DP side by side on the same cohort, model and data:

1. **Rounds.** Two ``fedspeech simulate`` runs of the cross-device shape
   (``experiments/sentences-device.toml``: ``--clients`` clients, ``--cohort`` sampled a round,
   8-utterance batches, 1 local epoch, the public model as the start), one with DP-SGD (each
   client's target epsilon 8 spread over 5 participations, as that recipe does) and one without.
   Per run: round 1 (the workers start and import torch/Opacus), the median of the later rounds
   ("steady"), and the clients' own seconds (summed over the cohort). Goal: steady DP round /
   non-DP round <= 1.5. Both runs set ``dp-seed``, so the server draws the same cohorts from the
   same node ids (``fedspeech_server.sampling.seeded_cohort``) and the DP clients' Poisson batches
   are the same in every run; the report checks the cohorts from each run's ``clients.tsv``. On
   the local engine (default) node ids are the partitions'; Flower's runtime draws them from
   ``os.urandom`` in every run (``--engine flower``), so its two runs train different cohorts.
2. **One message, phase by phase.** The ClientApp called in this process (no Flower between:
   ``--per-message`` messages for each flavour, the same partitions and global weights, after a
   warm-up message each), profiled with cProfile; the table gives seconds per message in each
   phase: reading the node's cached features, planning the noise (calibration and budget check),
   building the model and loading the weights, the training twin (``FastGRU``, both flavours)
   and Opacus's ``make_private`` (DP), the training steps, and exporting the weights. The first message of a
   process pays the imports (torch, Opacus): shown apart.

The corpus defaults to synthetic speech (``--utterances``, IID partitions); ``--corpus`` takes
a manifest (``experiments/recipes.py`` writes the speechocean762 folds, with ``--partition
speaker`` one client per speaker). Data preparation and feature extraction happen before the
clock starts.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import json
import pstats
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install

from benchmarks.workdirs import parse_round_args, work_folders
from fedspeech.app.simulate import ENGINES, simulate
from fedspeech.config import RunConfig
from fedspeech.fed_data import client_manifest, corpus_manifest, feature_cache_dir
from fedspeech.pipeline import load_examples

GOAL = 1.5

# experiments/sentences-device.toml's client side; DP as its fed-dp rows (epsilon 8 over 5 visits).
SETTINGS: dict[str, Any] = {
    **{"batch-size": 8, "epochs": 1, "lr": 0.003, "client-threads": 1, "server-threads": 2},
    **{"seed": 0, "holdout-speakers": 0, "eval-max-utterances": 48},
    "dp-seed": 0,  # the same cohorts in both runs; DP's Poisson batches the same in every run
}
DP: dict[str, Any] = {
    **{"dp": True, "noise-multiplier": "", "target-epsilon": 8.0},
    **{"planned-rounds": 5, "epsilon-budget": 8.0},
}
NO_DP: dict[str, Any] = {"dp": False}

# Phases of one ClientApp message: label -> (function, caller) pairs, as ``file.py:name``; a
# caller of None counts every call. The phases do not overlap.
PHASES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "read cached features": (("local_round.py:load_node_examples", None),),
    "plan noise (calibrate, budget)": (("local_round.py:_plan_noise", None),),
    "build model, load weights": (
        ("model.py:__init__", "local_round.py:run_round"),
        ("model.py:load_plain_state_dict", "local_round.py:run_round"),
    ),
    "training twin (FastGRU), make_private": (
        ("model.py:convert_model", None),
        ("privacy_engine.py:make_private", None),
    ),
    "training steps": (("dp_sgd.py:_private_epochs", None), ("train.py:run_plain_epoch", None)),
    "export weights": (
        ("model.py:plain_state_dict", "dp_sgd.py:train_private"),
        ("model.py:plain_state_dict", "train.py:_train_plain"),
    ),
}
# Not a phase: every BiGRUCTC construction, wherever it happens (inside the phases above).
BUILDS = (("model.py:__init__", None),)


def run_config(args: argparse.Namespace, data_dir: Path, dp: bool) -> dict[str, Any]:
    """The flat run config of one flavour."""
    flat = {
        **SETTINGS,
        **(DP if dp else NO_DP),
        "corpus": str(args.corpus) if args.corpus else "synthetic",
        "synthetic-utterances": args.utterances,
        "partition": args.partition,
        "num-partitions": args.clients,
        "clients-per-round": args.cohort,
        "min-clients": args.cohort,
        "num-server-rounds": args.rounds,
        "init-model": args.init_model,
        "trainable": args.trainable,
        "data-dir": str(data_dir),
    }
    if args.eval_manifest:
        flat["eval-manifest"] = str(args.eval_manifest)
    return flat


def prepare(args: argparse.Namespace, data_dir: Path) -> RunConfig:
    """Corpus, partitions and feature cache, before any clock starts."""
    cfg = RunConfig.from_flat(run_config(args, data_dir, dp=False))
    manifest = corpus_manifest(cfg, data_dir)
    client_manifest(cfg, data_dir, 0, args.clients)  # writes every partition
    load_examples(manifest, cfg.features, cache_root=feature_cache_dir(data_dir))
    return cfg


def simulate_rounds(
    args: argparse.Namespace, data_dir: Path, work: Path, dp: bool
) -> dict[str, Any]:
    """One simulation; its per-round figures."""
    name = "dp" if dp else "nodp"
    flat = run_config(args, data_dir, dp)
    flat["tracking-uri"] = f"sqlite:///{work / 'mlflow.db'}"
    start = time.perf_counter()
    outcome = simulate(
        overrides=flat,
        num_supernodes=args.clients,
        out=work / name,
        output=work / f"{name}.log",
        engine=args.engine,
    )
    wall = time.perf_counter() - start
    if not outcome.finished:
        raise RuntimeError(f"{name}: the simulation did not finish; see {work / name}.log")
    later = outcome.history[1:]
    return {
        "wall": wall,
        "round1": outcome.history[0]["round_seconds"],
        "rounds": [h["round_seconds"] for h in outcome.history],
        "steady_round": statistics.median(h["round_seconds"] for h in later),
        "steady_clients": statistics.median(h["client_seconds"] or 0.0 for h in later),
        "steady_eval": statistics.median(h["eval_seconds"] or 0.0 for h in later),
        "participation": participation(work / name / "report" / "clients.tsv"),
    }


def participation(clients_tsv: Path) -> dict[str, list[int]]:
    """Each client's rounds (ok, declined, failed or rejected: sampled) and last round sampled.

    Two runs that drew the same cohorts have the same; runs that did not almost never do.
    """
    rows = list(csv.DictReader(clients_tsv.open(encoding="utf-8"), delimiter="\t"))
    kinds = ("rounds_ok", "rounds_declined", "rounds_failed", "rounds_rejected")
    return {r["client"]: [sum(int(r[k]) for k in kinds), int(r["last_round"])] for r in rows}


def message_phases(
    args: argparse.Namespace, data_dir: Path, work: Path, dp: bool
) -> dict[str, Any]:
    """Seconds per ClientApp message, by phase (in this process; see the module docstring)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedspeech.pipeline import initial_weights
    from fedspeech_client.app import app

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        setattr(TaskIdentity, name, value)  # what Flower sets in a ClientApp process
    flat = run_config(args, data_dir, dp)
    out_dir = work / f"messages-{'dp' if dp else 'nodp'}"
    shutil.rmtree(out_dir, ignore_errors=True)  # fresh ledgers: no client may decline
    flat["out-dir"] = str(out_dir)
    cfg = RunConfig.from_flat(flat)
    weights = ArrayRecord(initial_weights(cfg, cfg.model.model_config(cfg.features.frame_dim, 29)))

    def call(partition: int) -> float:
        context = Context(
            run_id=1,
            node_id=partition + 1,
            node_config={"partition-id": partition, "num-partitions": args.clients},
            state=RecordDict(),
            run_config=flat,
        )
        content = RecordDict({"arrays": weights, "config": ConfigRecord({"server-round": 1})})
        message = Message(content, dst_node_id=partition + 1, message_type="train")
        start = time.perf_counter()
        reply = app(message, context)
        if reply.has_error():
            raise RuntimeError(f"partition {partition}: {reply.error.reason}")
        if "decline" in reply.content:
            raise RuntimeError(f"partition {partition} declined: {reply.content['decline']}")
        return time.perf_counter() - start

    first = call(0)
    profile = cProfile.Profile()
    total = 0.0
    for partition in range(1, args.per_message + 1):
        profile.enable()
        total += call(partition)
        profile.disable()
    n = args.per_message
    stats: dict[Any, Any] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    phases = {label: _cumulative(stats, pairs) / n for label, pairs in PHASES.items()}
    phases["other (message, ledger, metrics)"] = total / n - sum(phases.values())
    return {
        "first_message": first,
        "per_message": total / n,
        "phases": phases,
        "model_builds": _cumulative(stats, BUILDS) / n,
    }


def _cumulative(stats: dict[Any, Any], pairs: tuple[tuple[str, str | None], ...]) -> float:
    """Cumulative seconds of each ``(function, caller)`` pair (``file.py:name``), summed."""
    total = 0.0
    for function, caller in pairs:
        for key, (_, _, _, cumulative, callers) in stats.items():
            if not _matches(key, function):
                continue
            if caller is None:
                total += cumulative
            else:
                total += sum(c[3] for k, c in callers.items() if _matches(k, caller))
    return total


def _matches(key: tuple[str, int, str], name: str) -> bool:
    file, _, function = name.partition(":")
    return key[2] == function and key[0].endswith("/" + file)


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Print both parts side by side."""
    nodp, dp = results["nodp"], results["dp"]
    print(
        f"setup: {args.clients} clients, {args.cohort} a round, {args.rounds} rounds, "
        f"init {args.init_model}, trainable {args.trainable}, batch 8, 1 epoch; "
        f"DP: target epsilon 8 over 5 participations"
    )
    if "sim" in nodp:
        rows: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
            ("round 1 s", lambda r: r["sim"]["round1"]),
            ("steady round s (median, rounds 2..)", lambda r: r["sim"]["steady_round"]),
            ("  clients' own s, summed", lambda r: r["sim"]["steady_clients"]),
            ("  central evaluation s", lambda r: r["sim"]["steady_eval"]),
            ("wall s", lambda r: r["sim"]["wall"]),
        ]
        print(f"{'':<42}{'non-DP':>10}{'DP':>10}{'DP/non-DP':>11}")
        for label, cell in rows:
            a, b = cell(nodp), cell(dp)
            print(f"{label:<42}{a:>10.2f}{b:>10.2f}{b / a if a else float('nan'):>11.2f}")
        ratio = dp["sim"]["steady_round"] / nodp["sim"]["steady_round"]
        same = dp["sim"]["participation"] == nodp["sim"]["participation"]
        print(f"the same cohorts in both runs: {'yes' if same else 'NO'} (engine {args.engine})")
        print(f"steady DP round / non-DP round: {ratio:.2f} (goal <= {GOAL})")
    if "messages" in nodp:
        print(f"\none ClientApp message, seconds (mean of {args.per_message}, in this process)")
        print(f"{'':<42}{'non-DP':>10}{'DP':>10}")
        for label in nodp["messages"]["phases"]:
            a, b = nodp["messages"]["phases"][label], dp["messages"]["phases"][label]
            print(f"{label:<42}{a:>10.3f}{b:>10.3f}")
        a, b = nodp["messages"]["model_builds"], dp["messages"]["model_builds"]
        print(f"{'(all BiGRUCTC constructions, in the above)':<42}{a:>10.3f}{b:>10.3f}")
        a, b = nodp["messages"]["per_message"], dp["messages"]["per_message"]
        print(f"{'whole message':<42}{a:>10.3f}{b:>10.3f}  ratio {b / a:.2f}")
        a, b = nodp["messages"]["first_message"], dp["messages"]["first_message"]
        print(f"{'first message of the process (imports)':<42}{a:>10.3f}{b:>10.3f}")


def main() -> None:
    """Parse the arguments, run both parts for both flavours, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="a manifest (default: synthetic speech)")
    parser.add_argument("--eval-manifest", type=Path, help="server evaluation set")
    parser.add_argument("--utterances", type=int, default=1700, help="synthetic corpus size")
    parser.add_argument("--partition", default="iid", choices=["iid", "speaker"])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--cohort", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engine", default="local", choices=ENGINES)
    parser.add_argument("--init-model", default="@en-public-small")
    parser.add_argument("--trainable", default="all")
    parser.add_argument("--per-message", type=int, default=6, help="profiled messages a flavour")
    parser.add_argument("--skip-simulation", action="store_true", help="only the per-message part")
    parser.add_argument("--skip-messages", action="store_true", help="only the simulations")
    args = parse_round_args(parser)
    with work_folders(args, "fedspeech-device-round-") as (work, data_dir):
        start = time.perf_counter()
        prepare(args, data_dir)
        print(f"prepared corpus, partitions and features in {time.perf_counter() - start:.0f} s")
        results: dict[str, Any] = {"nodp": {}, "dp": {}}
        if not args.skip_simulation:
            for name in ("nodp", "dp"):
                results[name]["sim"] = simulate_rounds(args, data_dir, work, dp=name == "dp")
                print(f"{name}: rounds {results[name]['sim']['rounds']}", flush=True)
        if not args.skip_messages:
            for name in ("nodp", "dp"):
                results[name]["messages"] = message_phases(args, data_dir, work, dp=name == "dp")
        report(results, args)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
