"""Benchmark: paths that must stay quick, each timed beside its reference in one run.

    python benchmarks/fast_paths.py [--partitions 10 100 1000] [--repeats 50]

The tests check what these paths do (tests/test_scale.py counts a partition lookup's file-system
calls, tests/test_modeldir.py makes building the model fail, tests/test_tracking.py checks what an
outage buffers); how long they take is measured here, because the machines are shared and noisy:

* **partition lookup**: a client finding its manifest in a finished split of N partitions
  (``fedspeech.fed_data.client_manifest``, what every client does every round), per call, after
  the split was written once; ratio largest / smallest N (O(1) in N: about 1).
* **model-dir refusal**: ``load_model_dir`` on a config of 16 layers of BiGRU-8192 (19 billion
  parameters, counted on a meta-device model and refused before anything is allocated) beside
  loading a tiny valid model directory; ratio refusal / load.
* **tracker outage**: the MLflow tracker calls of a short run (start, params, 2 rounds, artifacts,
  finish) with the tracking server down (``http://`` on a closed loopback port: every record is
  buffered to the run folder) beside the same calls on a local sqlite store; ratio outage /
  sqlite (MLflow's own HTTP retries would hold each call for minutes; ours must not).

Former test bounds, printed as goals: lookup < 10 ms a call at N = 1000, refusal < 2 s, the whole
outage < 15 s.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install

import torch

from fedspeech.config import RunConfig
from fedspeech.fed_data import client_manifest
from fedspeech.model import BiGRUCTC
from fedspeech.model_config import ModelConfig
from fedspeech.modeldir import ModelDirError, load_model_dir, save_model_dir
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.manifest import Utterance, write_manifest
from fedspeech_features.text import CharTokenizer

LOOKUP_GOAL_S, REFUSAL_GOAL_S, OUTAGE_GOAL_S = 0.010, 2.0, 15.0


def _best_of(repeats: int, call: Callable[[], object]) -> float:
    """Median seconds of ``repeats`` calls (after one warm-up call)."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def partition_lookup(root: Path, populations: list[int], repeats: int) -> dict[int, float]:
    """Seconds per ``client_manifest`` call in a finished split, per population."""
    rows = [Utterance(root / f"{i}.wav", "hi", f"spk{i % 50}", 1.0) for i in range(3000)]
    write_manifest(root / "corpus.tsv", rows)
    cfg = RunConfig.from_flat(
        {"corpus": str(root / "corpus.tsv"), "partition": "iid", "holdout-speakers": 0}
    )
    print(f"\npartition lookup ({len(rows)} utterances, median of {repeats} calls)")
    print(f"{'partitions':>10} {'write once s':>13} {'lookup ms':>10}")
    per_call = {}
    for n in populations:
        data = root / f"data-{n}"
        start = time.perf_counter()
        client_manifest(cfg, data, 0, n)  # the first caller writes all n
        written = time.perf_counter() - start
        per_call[n] = _best_of(repeats, functools.partial(client_manifest, cfg, data, n // 2, n))
        print(f"{n:>10} {written:13.3f} {per_call[n] * 1000:10.3f}")
    lo, hi = min(populations), max(populations)
    print(f"ratio lookup N={hi} / N={lo}: {per_call[hi] / per_call[lo]:.2f}")
    return per_call


def model_dir_refusal(root: Path, repeats: int) -> tuple[float, float]:
    """Seconds to refuse an absurd model directory, and to load a tiny valid one."""
    torch.manual_seed(0)
    features = FeatureConfig()
    model = BiGRUCTC(ModelConfig(input_dim=features.frame_dim, hidden_size=8, num_layers=1))
    good = save_model_dir(root / "good", model, None, features, CharTokenizer(), {})
    absurd = save_model_dir(root / "absurd", model, None, features, CharTokenizer(), {})
    config = json.loads((absurd / "config.json").read_text())
    config["model"].update(hidden_size=8192, num_layers=16)
    (absurd / "config.json").write_text(json.dumps(config))

    def refuse() -> None:
        try:
            load_model_dir(absurd)
        except ModelDirError:
            return
        raise AssertionError("an absurd model directory was loaded")

    load = _best_of(repeats, lambda: load_model_dir(good))
    refusal = _best_of(repeats, refuse)
    print(f"\nmodel directory (median of {repeats})")
    print(f"load a tiny valid one       {load * 1000:8.2f} ms")
    print(f"refuse 16 x BiGRU-8192      {refusal * 1000:8.2f} ms")
    print(f"ratio refusal / load: {refusal / load:.2f}")
    return refusal, load


def tracker_calls(uri: str, run_folder: Path, model_dir: Path, report: Path) -> dict[str, float]:
    """Seconds of each tracker call of a short run against ``uri``."""
    from fedspeech_server.mlflow_tracking import MlflowTracker

    times: dict[str, float] = {}

    def timed(name: str, call: Callable[[], object]) -> object:
        start = time.perf_counter()
        result = call()
        times[name] = time.perf_counter() - start
        return result

    tracker = timed(
        "start", lambda: MlflowTracker(uri, "bench", "r", run_folder, retry_interval_s=0)
    )
    assert isinstance(tracker, MlflowTracker)
    timed("log_params", lambda: tracker.log_params({"num-rounds": 2}))
    for rnd in (1, 2):
        timed(f"log_round {rnd}", functools.partial(tracker.log_round, rnd, {"wer": 1.0 / rnd}))
    timed("log_artifacts", lambda: tracker.log_artifacts(report))
    timed("finish", lambda: tracker.finish(model_dir))
    return times


def tracker_outage(root: Path) -> tuple[float, float]:
    """Total seconds of the tracker calls with MLflow down, and on a sqlite store."""
    features = FeatureConfig()
    torch.manual_seed(0)
    model = BiGRUCTC(ModelConfig(input_dim=features.frame_dim, hidden_size=8, num_layers=1))
    saved = save_model_dir(root / "model", model, None, features, CharTokenizer(), {})
    report = root / "report"
    report.mkdir()
    (report / "clients.tsv").write_text("client\tepsilon\n0\t1.9\n", encoding="utf-8")
    with socket.socket() as sock:  # a port nobody listens on: connection refused at once
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    down = tracker_calls(f"http://127.0.0.1:{port}", root / "run-down", saved, report)
    sqlite = tracker_calls(f"sqlite:///{root / 'mlflow.db'}", root / "run-up", saved, report)
    print("\ntracker calls of a 2-round run (seconds)")
    print(f"{'call':14} {'MLflow down':>12} {'sqlite':>8}")
    for name in down:
        print(f"{name:14} {down[name]:12.3f} {sqlite[name]:8.3f}")
    total_down, total_up = sum(down.values()), sum(sqlite.values())
    print(f"{'total':14} {total_down:12.3f} {total_up:8.3f}")
    print(f"ratio outage / sqlite: {total_down / total_up:.2f}")
    return total_down, total_up


def main(argv: list[str] | None = None) -> int:
    """Print the three tables and whether the former test bounds hold."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--partitions", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=50, help="calls per timed lookup / load")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fedspeech-fast-paths-") as tmp:
        root = Path(tmp)
        (root / "split").mkdir()
        (root / "models").mkdir()
        (root / "tracking").mkdir()
        lookup = partition_lookup(root / "split", args.partitions, args.repeats)
        refusal, _ = model_dir_refusal(root / "models", min(args.repeats, 10))
        outage, _ = tracker_outage(root / "tracking")
    largest = max(args.partitions)
    print("\ngoals (the former test bounds):")
    for label, value, goal in (
        (f"lookup at N={largest} < {LOOKUP_GOAL_S * 1000:.0f} ms", lookup[largest], LOOKUP_GOAL_S),
        (f"refusal < {REFUSAL_GOAL_S:.0f} s", refusal, REFUSAL_GOAL_S),
        (f"whole outage < {OUTAGE_GOAL_S:.0f} s", outage, OUTAGE_GOAL_S),
    ):
        print(f"  {label:28} {'met' if value < goal else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
