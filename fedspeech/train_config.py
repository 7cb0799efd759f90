"""Local training settings (the ``train`` section of the run config): one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedspeech.privacy_ledger import AccountantName


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings.

    Attributes:
        epochs: local passes over the data per call.
        batch_size: batch size; with DP the *expected* Poisson batch size (Opacus uses sample rate
            ``1 / ceil(N / batch_size)``).
        lr: learning rate.
        optimizer: ``adam`` or ``sgd`` (momentum 0.9).
        weight_decay: L2 penalty of the optimizer.
        dp: train with DP-SGD (else the non-private baseline).
        noise_multiplier: DP noise std / clipping norm; exactly one of this and ``target_epsilon``.
        target_epsilon: calibrate the noise so the planned steps spend at most this epsilon.
        max_grad_norm: DP per-sample clipping norm.
        delta: DP delta (should be below 1 / number of examples).
        accountant: Opacus accountant, ``rdp`` or ``prv``.
        seed: dropout, SpecAugment and non-private shuffling.
        dp_seed: seeds Poisson sampling and DP noise. None (default) draws them from OS entropy:
            whoever knows the seed can regenerate the noise, so fix it only in tests.
        spec_augment: mask training features with ``features.augment.SpecAugment``.
        grad_clip: global gradient-norm clip of non-private training (None: off).
        max_physical_batch_size: with DP, split large Poisson batches into chunks of at most this
            many utterances (Opacus ``BatchMemoryManager``); the privacy accounting is unchanged.
        max_frames_per_batch: without DP, cap utterances x longest-utterance frames per batch.
        freeze_layers: keep the front-end and this many of the lowest recurrent layers fixed
            (0: train everything; the model's ``num_layers``: only the output LayerNorm and head
            train). Under DP-SGD fewer trainable weights means less noise in total for the
            same clipping norm: the lever for fine-tuning a public model on little private data.
    """

    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = 0.0
    dp: bool = True
    noise_multiplier: float | None = 1.0
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    accountant: AccountantName = "rdp"
    seed: int = 0
    dp_seed: int | None = None
    spec_augment: bool = False
    grad_clip: float | None = 5.0
    max_physical_batch_size: int | None = None
    max_frames_per_batch: int | None = None
    freeze_layers: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.accountant not in ("rdp", "prv"):
            raise ValueError(f"accountant must be 'rdp' or 'prv', got {self.accountant!r}")
        if self.dp:
            if (self.noise_multiplier is None) == (self.target_epsilon is None):
                raise ValueError("with dp, set exactly one of noise_multiplier and target_epsilon")
            if self.noise_multiplier is not None and self.noise_multiplier <= 0:
                raise ValueError("noise_multiplier must be > 0")
            if self.target_epsilon is not None and self.target_epsilon <= 0:
                raise ValueError("target_epsilon must be > 0")
            if self.max_grad_norm <= 0 or not 0 < self.delta < 1:
                raise ValueError("max_grad_norm must be > 0 and delta in (0, 1)")
        if self.freeze_layers < 0:
            raise ValueError(f"freeze_layers must be >= 0, got {self.freeze_layers}")
        for name in ("max_physical_batch_size", "max_frames_per_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None")
