"""Pause detection's frame levels: numpy (what transcribe uses) vs librosa.

    python benchmarks/pause_levels.py [--minutes 10] [--repeats 7]

``fedspeech.transcribe.frame_levels`` computes the dBFS level of every 10 ms frame in numpy.
Issue 16 replaced it with ``librosa.feature.rms`` + ``librosa.amplitude_to_db`` (kept below as
``librosa_levels``); issue 20 went back, because importing librosa's feature module costs more
than all the frames of a run. One run times the import (in a fresh process), then both on the
same waveform, best of ``--repeats``; it reports the ratio and the largest difference (dB). Real
speech from ../shared/data/librispeech_samples when present (concatenated to ``--minutes``), else
noise.
"""

from __future__ import annotations

import argparse
import subprocess
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


def librosa_levels(wave: np.ndarray, frame: int) -> np.ndarray:
    """The librosa implementation (issue 16 to issue 20)."""
    import librosa

    n_frames = -(-len(wave) // frame)
    padded = np.zeros(n_frames * frame, dtype=np.float32)  # (F * frame,)
    padded[: len(wave)] = wave
    rms = librosa.feature.rms(y=padded, frame_length=frame, hop_length=frame, center=False)[0]
    return np.asarray(librosa.amplitude_to_db(rms, ref=1.0, amin=1e-10, top_db=None))


def librosa_import_seconds() -> float:
    """Seconds to import librosa's feature module in a fresh process that has numpy and torch."""
    code = (
        "import time, numpy, torch, librosa; t = time.perf_counter(); librosa.feature.rms; "
        "print(time.perf_counter() - t)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout)  # fmt: skip


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
    imported = librosa_import_seconds()
    ours = frame_levels(wave, FRAME)
    diff = float(np.abs(ours - librosa_levels(wave, FRAME)).max())
    ref = _best(frame_levels, wave, args.repeats)
    lib = _best(librosa_levels, wave, args.repeats)
    print(f"{args.minutes:g} min of {source}, {len(ours)} frames; best of {args.repeats}")
    print(f"numpy (used)      {ref * 1e3:8.1f} ms")
    print(f"librosa           {lib * 1e3:8.1f} ms   ratio {lib / ref:.2f}x")
    print(f"librosa's feature module import {imported * 1e3:.0f} ms (fresh process); "
          f"max difference {diff:.2e} dB")  # fmt: skip


if __name__ == "__main__":
    main()
