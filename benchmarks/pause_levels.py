"""Pause detection's frame levels: librosa (what transcribe uses) vs the numpy code it replaced.

    python benchmarks/pause_levels.py [--minutes 10] [--repeats 7]

``fedspeech.transcribe.frame_levels`` computes the dBFS level of every 10 ms frame with
``librosa.feature.rms`` + ``librosa.amplitude_to_db``; until issue 16 it was hand-written numpy
(kept below as ``numpy_levels``). One run times both on the same waveform, alternating, best of
``--repeats``; it reports the ratio and the largest difference (dB). Real speech from
../shared/data/librispeech_samples when present (concatenated to ``--minutes``), else noise.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install

from fedspeech.transcribe import frame_levels
from fedspeech_features.audio import load_audio

RATE = 16_000
FRAME = 160  # 10 ms, transcribe's _LEVEL_FRAME_S


def numpy_levels(wave: np.ndarray, frame: int) -> np.ndarray:
    """The replaced implementation (fedspeech 0.1 ``plan_chunks``)."""
    n_frames = -(-len(wave) // frame)
    padded = np.zeros(n_frames * frame, dtype=np.float32)
    padded[: len(wave)] = wave
    rms = np.sqrt(np.mean(padded.reshape(n_frames, frame) ** 2, axis=1))  # (F,)
    return 20.0 * np.log10(np.maximum(rms, 1e-10))


def _speech(minutes: float) -> tuple[np.ndarray, str]:
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "librispeech_samples"
    files = sorted(folder.rglob("*.flac")) + sorted(folder.rglob("*.wav"))
    if not files:
        rng = np.random.default_rng(0)
        return (0.1 * rng.standard_normal(int(minutes * 60 * RATE))).astype(np.float32), "noise"
    waves = [load_audio(f, RATE) for f in files]
    joined = np.concatenate(waves)
    reps = -(-int(minutes * 60 * RATE) // len(joined))
    return np.tile(joined, reps)[: int(minutes * 60 * RATE)].astype(np.float32), "librispeech"


def _best(fn: Callable[[np.ndarray, int], np.ndarray], wave: np.ndarray, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(wave, FRAME)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    wave, source = _speech(args.minutes)
    start = time.perf_counter()
    ours = frame_levels(wave, FRAME)  # first call: includes librosa's import
    first = time.perf_counter() - start
    diff = float(np.abs(ours - numpy_levels(wave, FRAME)).max())
    lib = _best(frame_levels, wave, args.repeats)
    ref = _best(numpy_levels, wave, args.repeats)
    print(f"{args.minutes:g} min of {source}, {len(ours)} frames; best of {args.repeats}")
    print(f"numpy (replaced)  {ref * 1e3:8.1f} ms")
    print(f"librosa (used)    {lib * 1e3:8.1f} ms   ratio {lib / ref:.2f}x")
    print(f"first call incl. librosa import {first * 1e3:.0f} ms; max difference {diff:.2e} dB")


if __name__ == "__main__":
    main()
