"""Head-only DP rounds: the fixed layers' outputs kept between rounds, against running them every round.

    python benchmarks/head_rounds.py [--utterances 150] [--rounds 3] [--repeats 3] [--threads 1]

One node as the demo's clients are (``fedspeech/presets/demo.toml``): en-public-small (3x256
BiGRU, 120-dim frames) with every recurrent layer fixed (``freeze-layers = 3``), DP-SGD on the
output LayerNorm + Linear (batch 32, one epoch a round, noise multiplier 1.0 so that no noise
calibration is timed), ``--utterances`` utterances of 60-150 frames (the demo's average is 107).
Two ways, interleaved in one process (kept, every-round, kept, ...), each ``--rounds`` rounds of
``train_local`` on the same examples, each round starting from the last one's weights:

    kept         ``fedspeech_client.frozen_trunk``: each utterance's trunk output computed in the
                 first round and kept (its memory is printed)
    every-round  the whole model every round, as before 2026-12-06

Prints each way's median seconds per round (first and later rounds) and the ratios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install

from fedspeech.modeldir import load_model_dir
from fedspeech_client import train
from fedspeech_client.frozen_trunk import TrunkMemo
from fedspeech_client.train import TrainConfig, train_local


@dataclass(frozen=True)
class _Utt:
    feats: torch.Tensor  # (T, 120)
    labels: torch.Tensor  # (L,)


def _examples(n: int) -> list[_Utt]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        frames = int(torch.randint(60, 151, (1,), generator=g))
        out.append(
            _Utt(torch.randn(frames, 120, generator=g), torch.randint(1, 29, (frames // 4,)))
        )
    return out


def _rounds(
    way: str, start: torch.nn.Module, examples: list[_Utt], rounds: int, *, quiet: bool = False
) -> list[float]:
    """Seconds of each round from ``start``'s weights; a fresh memo for every run of ``kept``."""
    model = copy.deepcopy(start)
    memo = TrunkMemo()
    train.TRUNKS = memo
    train.trains_head_only = _HEAD_ONLY if way == "kept" else (lambda *_: False)
    seconds = []
    for r in range(rounds):
        cfg = TrainConfig(
            batch_size=32, lr=0.01, freeze_layers=3, noise_multiplier=1.0, seed=r, dp_seed=r
        )
        began = time.perf_counter()
        result = train_local(model, examples, cfg)
        seconds.append(time.perf_counter() - began)
        model.load_state_dict(result.state_dict)
    if way == "kept" and not quiet:
        print(
            f"  kept: {memo.nbytes / 2**20:.1f} MiB of trunk outputs for {len(examples)} utterances"
        )
    return seconds


_HEAD_ONLY = train.trains_head_only


def main() -> None:
    """Run both ways ``--repeats`` times, interleaved, and print the medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model_dir("@en-public-small").model
    examples = _examples(args.utterances)
    times: dict[str, list[list[float]]] = {"kept": [], "every-round": []}
    for way in times:  # warm-up, not timed: the process's first Opacus run, the caches
        _rounds(way, model, examples[:32], 1, quiet=True)
    for _ in range(args.repeats):
        for way in times:
            times[way].append(_rounds(way, model, examples, args.rounds))
            print(f"  {way}: " + ", ".join(f"{s:.2f}" for s in times[way][-1]) + " s", flush=True)
    first = {w: statistics.median(r[0] for r in runs) for w, runs in times.items()}
    later = {w: statistics.median(s for r in runs for s in r[1:]) for w, runs in times.items()}
    total = {w: statistics.median(sum(r) for r in runs) for w, runs in times.items()}
    print(f"{'way':<12} {'round 1 s':>10} {'later rounds s':>15} {'all rounds s':>13}")
    for way in times:
        print(f"{way:<12} {first[way]:>10.2f} {later[way]:>15.2f} {total[way]:>13.2f}")
    print(
        f"kept / every-round: round 1 {first['kept'] / first['every-round']:.2f}, later rounds "
        f"{later['kept'] / later['every-round']:.2f}, all {total['kept'] / total['every-round']:.2f}"
    )


if __name__ == "__main__":
    main()
