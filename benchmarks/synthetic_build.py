"""Benchmark: build the default synthetic corpus (1200 utterances) and report its speed.

Prints utterances per second, minutes of audio, the real-time factor (audio seconds made per wall
second), wall and CPU time, speakers and vocabulary, and the time of the no-op re-run the demo
does on every start (goal < 0.5 s: it reads the build's record and synthesizes nothing, which
tests/test_synthetic.py checks). Requirement: >= 1000 utterances in under 2 minutes on the 2-core
dev machine.

    python benchmarks/synthetic_build.py [--utterances 1200] [--workers N] [--augment]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install

from fedspeech_features.corpora.sentences import vocabulary
from fedspeech_features.corpora.synthetic import build_synthetic_corpus
from fedspeech_features.manifest import read_manifest

REQUIRED_UTTERANCES, REQUIRED_SECONDS = 1000, 120.0  # the product requirement for the demo


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run(out_dir: Path, utterances: int, workers: int | None, augment: bool) -> dict[str, float]:
    """Build once from scratch, then once more (the no-op path); return the measurements."""
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    manifest, report = build_synthetic_corpus(
        out_dir, num_utterances=utterances, workers=workers, augment=augment
    )
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    t1 = time.perf_counter()
    build_synthetic_corpus(out_dir, num_utterances=utterances, workers=workers, augment=augment)
    noop = time.perf_counter() - t1
    rows = read_manifest(manifest)
    audio_s = sum(r.duration_s for r in rows)
    return {
        "utterances": len(rows),
        "skipped": len(report.skipped),
        "wall_s": wall,
        "cpu_s": cpu,
        "noop_s": noop,
        "audio_min": audio_s / 60,
        "speakers": len({r.speaker for r in rows}),
        "vocabulary": len(vocabulary(r.transcript for r in rows)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=1200)
    parser.add_argument("--workers", type=int, default=None, help="default: automatic")
    parser.add_argument("--augment", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="fedspeech-synthetic-bench-") as tmp:
        m = run(Path(tmp), args.utterances, args.workers, args.augment)
    print(f"cpus available          {len(os.sched_getaffinity(0))}")
    print(f"utterances              {m['utterances']:.0f} (skipped {m['skipped']:.0f})")
    print(f"speakers                {m['speakers']:.0f}")
    print(f"vocabulary (words)      {m['vocabulary']:.0f}")
    print(f"audio                   {m['audio_min']:.1f} min")
    print(f"wall time               {m['wall_s']:.2f} s (cpu {m['cpu_s']:.2f} s)")
    print(f"utterances / s          {m['utterances'] / m['wall_s']:.1f}")
    print(f"real-time factor        {m['audio_min'] * 60 / m['wall_s']:.0f}x (audio s per wall s)")
    print(f"no-op re-run            {m['noop_s'] * 1000:.0f} ms "
          f"(ratio no-op / build {m['noop_s'] / m['wall_s']:.4f}; goal < 0.5 s)")  # fmt: skip
    pace = REQUIRED_SECONDS * m["utterances"] / REQUIRED_UTTERANCES
    print(f"requirement             {REQUIRED_UTTERANCES} utterances < {REQUIRED_SECONDS:.0f} s: "
          f"{'met' if m['wall_s'] < pace else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
