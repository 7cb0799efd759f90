"""How many padded frames a client's epoch computes: DP-SGD's Poisson batches against the
length-bucketed batches of non-private training, on the same utterances.

    python benchmarks/batch_padding.py [--manifest M] [--batch 8] [--epochs 50] [--seed 0]
        [--step-utterances 3.3]

Every utterance of a batch is computed to the batch's longest (FastGRU, the projections and the
per-sample gradients all run over the padded ``(B, T)``), so an epoch costs about its padded
frames. Per speaker of the manifest (one client per speaker, as ``--partition speaker``), it
draws ``--epochs`` epochs with each sampler as the clients use them:

    non-dp  ``fedspeech_client.batching.LengthBucketSampler`` (shuffled pools sorted by length)
    dp      Opacus's ``UniformWithReplacementSampler`` at ``fedspeech_client.dp_sgd``'s rate,
            ``1 / ceil(N / batch)``, ``ceil(N / batch)`` draws an epoch (Poisson: each utterance
            in each draw with that probability, independently)

and prints the padded frames over the frames of the utterances themselves, summed over all
clients and epochs, for each, and their ratio. Then the same with a step's cost modelled as
``T_max x (c + B)``: every time step has a fixed cost ``c`` (``--step-utterances``, in
utterances: 3.3 from DP steps of 8, 4 and 2 utterances timed on this machine, docs/benchmarks.md),
for the batches as drawn and for each Poisson batch split at its cheapest point, if anywhere,
into two length-sorted physical batches (Opacus's virtual steps: the same noised sum).

Durations stand for frame counts (the manifest's ``duration_s`` in milliseconds; frames are
proportional). The default manifest is speechocean762's training speakers in ``../shared/data``
(the cross-device benchmark's corpus).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install

from fedspeech_client.batching import LengthBucketSampler
from fedspeech_features.manifest import read_manifest

DEFAULT = Path(__file__).resolve().parents[2] / "shared/data/speechocean762_train/manifest.tsv"


def padded(batches: list[list[int]], lengths: list[int]) -> int:
    """Frames computed: each batch's size times its longest utterance."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches if b)


def modelled(batch: list[int], lengths: list[int], fixed: float) -> float:
    """A step's modelled cost: its longest utterance x (fixed + its size)."""
    return max(lengths[i] for i in batch) * (fixed + len(batch)) if batch else 0.0


def best_split(batch: list[int], lengths: list[int], fixed: float) -> float:
    """The cheapest of the batch whole and every split of it, sorted by length, in two."""
    ranked = sorted(batch, key=lambda i: lengths[i])
    whole = modelled(batch, lengths, fixed)
    return min(
        [whole]
        + [
            modelled(ranked[:k], lengths, fixed) + modelled(ranked[k:], lengths, fixed)
            for k in range(1, len(ranked))
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, default=DEFAULT)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-utterances", type=float, default=3.3)
    args = parser.parse_args()
    if not args.manifest.is_file():
        sys.exit(f"no manifest at {args.manifest} (give one with --manifest)")
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    by_speaker: dict[str, list[int]] = defaultdict(list)  # speaker -> milliseconds
    for utt in read_manifest(args.manifest):
        by_speaker[utt.speaker].append(round(utt.duration_s * 1000))
    used = bucketed = poisson = 0
    cost = {"non-dp": 0.0, "dp": 0.0, "dp split": 0.0}
    fixed = args.step_utterances
    for speaker in sorted(by_speaker):
        lengths = by_speaker[speaker]
        steps = math.ceil(len(lengths) / args.batch)
        gen = torch.Generator().manual_seed(args.seed)
        buckets = LengthBucketSampler(lengths, args.batch, generator=gen)
        draws = UniformWithReplacementSampler(
            num_samples=len(lengths), sample_rate=1.0 / steps, generator=gen, steps=steps
        )
        for _ in range(args.epochs):
            plain, private = list(buckets), list(draws)
            used += sum(lengths)
            bucketed += padded(plain, lengths)
            poisson += padded(private, lengths)
            cost["non-dp"] += sum(modelled(b, lengths, fixed) for b in plain)
            cost["dp"] += sum(modelled(b, lengths, fixed) for b in private)
            cost["dp split"] += sum(best_split(b, lengths, fixed) for b in private)
    print(
        f"{args.manifest}: {len(by_speaker)} clients (speakers), batch {args.batch}, "
        f"{args.epochs} epochs each"
    )
    print("| sampler | padded frames / utterance frames |\n|---|---:|")
    print(f"| non-dp (length buckets) | {bucketed / used:.3f} |")
    print(f"| dp (Poisson) | {poisson / used:.3f} |")
    print(f"dp / non-dp padded frames: {poisson / bucketed:.3f}")
    print(
        f"modelled cost (T_max x ({fixed:g} + B)) / non-dp: dp {cost['dp'] / cost['non-dp']:.3f}, "
        f"dp split at the cheapest point {cost['dp split'] / cost['non-dp']:.3f}"
    )


if __name__ == "__main__":
    main()
