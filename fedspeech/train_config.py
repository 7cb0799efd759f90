"""Local training settings (the ``train`` section of the run config): one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from fedspeech.devices import DeviceError, check_device_name
from fedspeech.model_config import Trainable
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
        clipping: ``flat`` clips each utterance's whole gradient to ``max_grad_norm``;
            ``per-layer`` clips each trained tensor's part to ``max_grad_norm / sqrt(n)`` (n
            tensors train), so the whole stays within ``max_grad_norm``: same sensitivity, same
            noise, same epsilon (Opacus ``clipping="per_layer"``).
        ema_decay: DP-SGD returns an exponential moving average of the trained weights over the
            call's steps (decay per step; 0: the last step's weights). Averaging the iterates is
            post-processing: it costs no privacy.
        delta: DP delta (should be below 1 / number of examples).
        accountant: Opacus accountant, ``rdp`` or ``prv``.
        seed: dropout, SpecAugment and non-private shuffling.
        dp_seed: seeds who is sampled (the server's cohorts, Poisson or fixed-size, and the
            clients' Poisson batches) and DP noise. None (default) draws them from OS entropy
            (Flower's unseeded draw for fixed-size cohorts): whoever knows the seed can
            regenerate the noise, so fix it only in tests and benchmarks.
        spec_augment: mask training features with ``fedspeech_features.augment.SpecAugment``.
        tempo_augment: probability that a training utterance is slowed down (in the feature
            domain, ``fedspeech_features.augment.TempoStretch``) before SpecAugment; 0: off.
        tempo_max: the largest slow-down; each chosen utterance is stretched by a factor uniform
            in ``[1, tempo_max]``. ``max_frames_per_batch`` counts frames before stretching.
        grad_clip: global gradient-norm clip of non-private training (None: off).
        max_physical_batch_size: with DP, split large Poisson batches into chunks of at most this
            many utterances (Opacus ``BatchMemoryManager``); the privacy accounting is unchanged.
        max_frames_per_batch: without DP, cap utterances x longest-utterance frames per batch.
        freeze_layers: keep the front-end and this many of the lowest recurrent layers fixed
            (0: train everything; the model's ``num_layers``: only the output LayerNorm and head
            train). Under DP-SGD fewer trainable weights means less noise in total for the
            same clipping norm: the lever for fine-tuning a public model on little private data.
        trainable: which weights train (``fedspeech.model.trainable_names``): ``all``, ``head``
            (the output LayerNorm and Linear), ``norm-bias`` (every bias, and the head:
            BitFit) or ``adapters`` (the ``B`` factors of the low-rank adapters on the GRU input
            projections, ``adapter-rank`` in the model section, and the head: FFA-LoRA,
            ``fedspeech.adapters``); ``freeze_layers`` applies on top. The rest stay as the starting model
            has them, and a federated round sends and receives only the weights that train.
        device: where training and evaluation run (``fedspeech.devices``): ``auto`` (CUDA when
            available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. Every process of a run that
            trains or evaluates resolves it on its own machine (clients, the server's central
            evaluation); weights that leave a process are on the CPU.
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
    clipping: Literal["flat", "per-layer"] = "flat"
    ema_decay: float = 0.0
    delta: float = 1e-5
    accountant: AccountantName = "rdp"
    seed: int = 0
    dp_seed: int | None = None
    spec_augment: bool = False
    tempo_augment: float = 0.0
    tempo_max: float = 1.8
    grad_clip: float | None = 5.0
    max_physical_batch_size: int | None = None
    max_frames_per_batch: int | None = None
    freeze_layers: int = 0
    trainable: Trainable = "all"
    device: str = "auto"

    def __post_init__(self) -> None:
        # One message per key, under its run-config (kebab-case) name, with the value given.
        problems = [
            f"{_key(name)} must be >= 1, got {getattr(self, name)}"
            for name in ("epochs", "batch_size")
            if getattr(self, name) < 1
        ]
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight-decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in ("adam", "sgd"):
            problems.append(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.clipping not in ("flat", "per-layer"):
            problems.append(f"clipping must be 'flat' or 'per-layer', got {self.clipping!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.accountant not in ("rdp", "prv"):
            problems.append(f"accountant must be 'rdp' or 'prv', got {self.accountant!r}")
        if self.dp:
            if (self.noise_multiplier is None) == (self.target_epsilon is None):
                problems.append(
                    "with dp, set exactly one of noise-multiplier and target-epsilon "
                    f'(got {self.noise_multiplier!r} and {self.target_epsilon!r}; "" unsets one)'
                )
            if self.noise_multiplier is not None and self.noise_multiplier <= 0:
                problems.append(f"noise-multiplier must be > 0, got {self.noise_multiplier}")
            if self.target_epsilon is not None and self.target_epsilon <= 0:
                problems.append(f"target-epsilon must be > 0, got {self.target_epsilon}")
            if self.max_grad_norm <= 0:
                problems.append(f"max-grad-norm must be > 0, got {self.max_grad_norm}")
            if not 0 < self.delta < 1:
                problems.append(f"delta must be in (0, 1), got {self.delta}")
        if not 0.0 <= self.tempo_augment <= 1.0:
            problems.append(f"tempo-augment must be in [0, 1], got {self.tempo_augment}")
        if not 1.0 <= self.tempo_max <= 3.0:
            problems.append(f"tempo-max must be in [1, 3], got {self.tempo_max}")
        if self.freeze_layers < 0:
            problems.append(f"freeze-layers must be >= 0, got {self.freeze_layers}")
        if self.trainable not in get_args(Trainable):
            problems.append(
                f"trainable must be one of {get_args(Trainable)}, got {self.trainable!r}"
            )
        for name in ("max_physical_batch_size", "max_frames_per_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f'{_key(name)} must be >= 1 or "" (off), got {value}')
        try:
            check_device_name(self.device)  # the spelling; availability: resolve_device
        except DeviceError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))


def _key(field_name: str) -> str:
    """The run-config key of a field (``batch_size`` -> ``batch-size``)."""
    return field_name.replace("_", "-")
