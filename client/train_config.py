"""Local training results and the optimizer and augmentation factories (settings:
``fedspeech.train_config``)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import fedspeech.metric_keys as mk
from fedspeech.privacy_ledger import PrivacyLedger
from fedspeech.train_config import TrainConfig
from fedspeech_client.batching import Augment
from fedspeech_client.proximal import add_proximal_step


@dataclass(frozen=True)
class TrainResult:
    """What a local training call produces.

    Attributes:
        state_dict: trained weights under the plain fused-RNN names, detached CPU tensors.
        metrics: under the reply's names (``fedspeech.metric_keys``): ``train-loss`` (mean
            per-utterance CTC loss of the last epoch, per label), ``num-examples``, ``num-steps``
            (optimizer steps, DP: accountant steps), ``skipped-batches`` (DP: empty Poisson
            batches, stepped with noise only; non-DP: batches with a non-finite loss, not
            stepped), ``seconds``.
        epsilon: total epsilon of this client so far (restored history included) at
            ``cfg.delta``; None without DP.
        noise_multiplier: the noise used (given or calibrated); None without DP.
        sample_rate: Poisson sampling rate used; None without DP.
        privacy_state: the privacy ledger to pass into the next call; None without DP.
    """

    state_dict: dict[str, Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    epsilon: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    privacy_state: PrivacyLedger | None = None


def make_optimizer(
    params: Iterable[nn.Parameter], cfg: TrainConfig, *, proximal_mu: float = 0.0
) -> torch.optim.Optimizer:
    """The torch optimizer ``cfg.optimizer`` names (SGD with momentum 0.9).

    Args:
        params: the parameters to train; their current values are FedProx's anchor.
        cfg: training settings.
        proximal_mu: FedProx's proximal weight: after each step the parameters are pulled back
            towards their current values (``fedspeech_client.proximal``); 0: plain optimizer.
    """
    optimizer: torch.optim.Optimizer
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    add_proximal_step(optimizer, proximal_mu)
    return optimizer


def make_metrics(loss: float, n: int, steps: int, skipped: int, start: float) -> dict[str, float]:
    """The metrics dict of ``TrainResult``, keyed as a client's reply (``fedspeech.metric_keys``)."""
    return {
        mk.TRAIN_LOSS: loss,
        mk.NUM_EXAMPLES: float(n),
        mk.NUM_STEPS: float(steps),
        mk.SKIPPED_BATCHES: float(skipped),
        mk.SECONDS: time.perf_counter() - start,
    }


_TEMPO_SEED_OFFSET = 0x7E3  # the tempo draws do not share SpecAugment's generator seed


def training_augment(cfg: TrainConfig, seed: int, block: int = 1) -> Augment | None:
    """The ``(T, D) -> (T', D)`` training-feature transform ``cfg`` asks for (None: none).

    ``cfg.tempo_augment`` > 0: ``TempoStretch`` (``block``: hop frames per model frame,
    ``FeatureConfig.time_block``), then with ``cfg.spec_augment`` ``SpecAugment``; both draw from
    generators seeded by ``seed``.
    """
    from fedspeech_features.augment import SpecAugment, TempoStretch, compose  # lazy: training only

    tempo = None
    if cfg.tempo_augment > 0:
        tempo = TempoStretch(
            p=cfg.tempo_augment,
            max_factor=cfg.tempo_max,
            block=block,
            seed=seed + _TEMPO_SEED_OFFSET,
        )
    return compose(tempo, SpecAugment(seed=seed).train() if cfg.spec_augment else None)
