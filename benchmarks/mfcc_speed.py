"""MFCC extraction speed, ours (torchaudio/torch) vs librosa, as multiples of real time on one run.

    python benchmarks/mfcc_speed.py [--threads 1] [--seconds 120]

Reads real speech from ../shared/data (or $FEDSPEECH_SHARED_DATA): LibriSpeech sentences (long
utterances) and FSDD digits (short ones, where per-call overhead shows). Without the data it
synthesizes noisy tones of the same lengths and says so. Audio decoding is not timed except in its
own row. Each figure is the best of ``--repeats`` passes.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import librosa
import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install

from fedspeech_features.audio import load_audio
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.mfcc import FeatureExtractor

# Goal from the design: feature extraction must not be a client's bottleneck.
TARGET_X_REALTIME = 1000.0
SETS = {"sentences": "librispeech_samples", "digits": "fsdd"}
# Lengths of the synthetic stand-ins when the shared data is absent (seconds).
SYNTHETIC_SECONDS = {"sentences": (2.0, 15.0), "digits": (0.3, 0.9)}


def _shared_data() -> Path:
    override = os.environ.get("FEDSPEECH_SHARED_DATA")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "data"


def _load_real(name: str, seconds: float) -> tuple[list[Path], float]:
    """Paths of the first utterances of a shared set adding up to ``seconds`` of audio."""
    manifest = _shared_data() / SETS[name] / "manifest.tsv"
    paths, total = [], 0.0
    with manifest.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if total >= seconds:
                break
            paths.append(manifest.parent / row["path"])
            total += float(row["duration_s"])
    return paths, total


def _synthesize(name: str, seconds: float, sr: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    lo, hi = SYNTHETIC_SECONDS[name]
    waves, total = [], 0.0
    while total < seconds:
        n = int(rng.uniform(lo, hi) * sr)
        t = np.arange(n) / sr
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t)
        waves.append((tone + 0.05 * rng.standard_normal(n)).astype(np.float32))
        total += n / sr
    return waves


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocator, FFT plans, librosa's filter cache
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _bench_set(
    name: str, ext: FeatureExtractor, seconds: float, repeats: int, real: bool
) -> tuple[int, float, dict[str, float]]:
    """Time every path on one set: (utterances, audio seconds, {path: seconds})."""
    cfg, sr = ext.cfg, ext.cfg.sample_rate
    if real:
        paths, _ = _load_real(name, seconds)
        waves = [load_audio(p, sr) for p in paths]
    else:
        paths, waves = [], _synthesize(name, seconds, sr)
    tensors = [torch.from_numpy(w) for w in waves]

    def librosa_mfcc(w: np.ndarray) -> np.ndarray:
        return librosa.feature.mfcc(
            y=w,
            sr=sr,
            n_mfcc=cfg.n_mfcc,
            n_mels=cfg.n_mels,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            pad_mode="reflect",
        )

    runs: dict[str, Callable[[], object]] = {
        "ours: full pipeline, one by one": lambda: [ext(t) for t in tensors],
        "ours: full pipeline, batch()": lambda: ext.batch(tensors),
        "ours: raw MFCC only, one by one": lambda: [ext.mfcc(t) for t in tensors],
        "librosa.feature.mfcc, one by one": lambda: [librosa_mfcc(w) for w in waves],
    }
    if paths:
        runs["(load_audio: decode + resample)"] = lambda: [load_audio(p, sr) for p in paths]
    timings = {label: _best_of(fn, repeats) for label, fn in runs.items()}
    return len(waves), sum(len(w) for w in waves) / sr, timings


def main(argv: list[str] | None = None) -> int:
    """Print the speed table; exit status 0 (the verdict line says whether the goal was met)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    parser.add_argument("--seconds", type=float, default=120.0, help="audio per set")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    ext = FeatureExtractor(FeatureConfig())
    real = (_shared_data() / SETS["sentences"] / "manifest.tsv").is_file()
    print(
        f"MFCC speed, {args.threads} thread(s), torch {torch.__version__}, "
        f"librosa {librosa.version.version}; {ext.cfg}"
    )
    if not real:
        print("NOTE: ../shared/data not found: timing synthetic noisy tones, not speech.")
    header = f"{'set':10} {'path':36} {'utts':>5} {'audio s':>8} {'proc s':>8} {'x realtime':>11}"
    print(header)
    print("-" * len(header))
    ok = True
    with threadpool_limits(limits=args.threads):
        for name in SETS:
            n_utts, audio_s, timings = _bench_set(name, ext, args.seconds, args.repeats, real)
            speed = {label: audio_s / secs for label, secs in timings.items()}
            for label, secs in timings.items():
                print(
                    f"{name:10} {label:36} {n_utts:5d} {audio_s:8.1f} {secs:8.3f} "
                    f"{speed[label]:10.0f}x"
                )
            lib = speed["librosa.feature.mfcc, one by one"]
            raw = speed["ours: raw MFCC only, one by one"]
            one = speed["ours: full pipeline, one by one"]
            batch = speed["ours: full pipeline, batch()"]
            print(
                f"{name:10} ratio ours/librosa: raw MFCC {raw / lib:.2f}x, full pipeline "
                f"one by one {one / lib:.2f}x, batch() {batch / lib:.2f}x"
            )
            ok = ok and min(one, batch) >= TARGET_X_REALTIME
    verdict = "reached" if ok else "NOT reached"
    print(f"target >= {TARGET_X_REALTIME:.0f}x real time per core for our full pipeline: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
