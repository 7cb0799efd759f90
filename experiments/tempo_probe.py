"""Probe (not a product feature yet): does slowed-down training speech help the public model?

Runs ``fedspeech pretrain`` with one extra training-time augmentation patched into its epoch loader:
with probability ``P`` an utterance's features are slowed down by a factor uniform in
``[LOW, HIGH]`` (linear interpolation of the 10 ms MFCC frames, i.e. a tempo change without a
pitch change), before SpecAugment. The speechocean762 speakers that the public model gets most
wrong read very slowly, with long hesitations; this asks whether training on slower speech helps.

    python experiments/tempo_probe.py P LOW HIGH pretrain --train ... --dev ... --run-dir DIR ...

Measured 2026-12-05 (docs/results.md, "The public starting model"): ``0.6 1.0 1.8`` with the
recipe's manifests and run config for 5 epochs: ocean-dev CER 64.9% (the shipped model: 66.7%).
Assumes ``stack == subsample`` (3 and 3 by default), so that the stacked frames unstack into the
original frame sequence. Not resumable to the bit (the patch draws from its own generator).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import fedspeech_client.epochs as epochs

STACK = 3  # FeatureConfig.stack of the recipe's features


class Tempo:
    """Slow ``(T, D)`` stacked features down by a random factor, then apply ``inner``."""

    def __init__(self, inner: Any, seed: int, p: float, low: float, high: float) -> None:
        self.inner, self.p, self.low, self.high = inner, p, low, high
        self.generator = torch.Generator().manual_seed(seed + 7)

    def __call__(self, x: Tensor) -> Tensor:
        if torch.rand(1, generator=self.generator).item() < self.p:
            factor = self.low + (self.high - self.low) * torch.rand(1, generator=self.generator)
            t, d = x.shape
            frames = x.reshape(t * STACK, d // STACK).T[None]  # (1, d / STACK, T * STACK)
            n = max(STACK, round(t * STACK * float(factor)) // STACK * STACK)
            slow = F.interpolate(frames, size=n, mode="linear", align_corners=True)[0].T
            x = slow.reshape(n // STACK, d)  # (T', D), T' >= T
        return self.inner(x) if self.inner is not None else x


def main(argv: list[str]) -> int:
    p, low, high = (float(a) for a in argv[:3])
    original = epochs._loader

    def loader(examples: Any, cfg: Any, seed: int) -> Any:
        data = original(examples, cfg, seed)
        dataset: Any = data.dataset  # a FeatureDataset
        dataset.augment = Tempo(dataset.augment, seed, p, low, high)
        return data

    epochs._loader = loader
    from fedspeech.app.cli import main as cli

    return cli(argv[3:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
