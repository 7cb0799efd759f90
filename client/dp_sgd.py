"""DP-SGD local training with Opacus: Poisson sampling, per-sample clipping, noise, accounting.

Runs on the Opacus twin of the model (``DPGRU``); empty Poisson batches are noise-only steps, which
the accountant records like any other step.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fedspeech.fast_gru_grad_sampler import fresh_grad_samples_taken, per_sample_grads_only
from fedspeech.model import convert_model, plain_state_dict, set_trainable
from fedspeech.privacy_ledger import PrivacyLedger, calibrate_noise_multiplier, epsilon_of
from fedspeech_client.batching import FeatureDataset, as_ctc_batch, collate_ctc, ctc_loss
from fedspeech_client.train_config import TrainConfig, TrainResult, make_metrics, make_optimizer

log = logging.getLogger(__name__)


def train_private(
    model: nn.Module,
    dataset: FeatureDataset,
    cfg: TrainConfig,
    *,
    prior_state: PrivacyLedger | None,
    planned_steps: int | None,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """DP-SGD on the Opacus twin of ``model``; see ``fedspeech_client.train.train_local`` for the contract.

    The Poisson sampling rate is Opacus's ``1 / ceil(N / batch_size)``, one epoch is
    ``ceil(N / batch_size)`` steps, and the accountant starts from ``prior_state``'s history
    (whichever accountant recorded it: a ledger is accountant-agnostic), at the smaller of its
    delta and ``cfg.delta``.
    """
    start = time.perf_counter()
    prior = (prior_state or PrivacyLedger(cfg.delta)).at_delta(cfg.delta)
    sampling = torch.Generator()
    noise_gen = torch.Generator(device=device)
    if cfg.dp_seed is None:
        sampling.seed()  # OS entropy
        noise_gen.seed()
    else:
        sampling.manual_seed(cfg.dp_seed)
        noise_gen.manual_seed(cfg.dp_seed + 1)
    # Opacus derives the Poisson rate from this loader: q = 1 / len(loader) = 1 / ceil(N / B).
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, collate_fn=collate_ctc, generator=sampling
    )
    steps_per_epoch = len(loader)
    sample_rate = 1.0 / steps_per_epoch
    noise = cfg.noise_multiplier or _calibrate(
        cfg, prior, planned_steps, sample_rate, steps_per_epoch
    )
    if cfg.delta * len(dataset) >= 1:
        log.warning("delta %.2g >= 1/N for N=%d examples: weak guarantee", cfg.delta, len(dataset))

    net = convert_model(model, dp=True).to(device).train()
    # Fixed weights get no gradient, so no clipping share and no noise.
    trainable = set_trainable(net, cfg.trainable, cfg.freeze_layers)
    with warnings.catch_warnings():
        # torchcsprng is not installable here; noise comes from torch's PRNG (see dp_seed).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=cfg.accountant)
    engine.accountant.history = list(prior.history)  # Opacus appends this call's steps
    gsm, optimizer, dp_loader = engine.make_private(
        module=net,
        # FedProx's pull is hooked on this inner optimizer: after the private step, no privacy cost
        optimizer=make_optimizer(trainable, cfg, proximal_mu=proximal_mu),
        data_loader=loader,
        noise_multiplier=noise,
        max_grad_norm=_clipping_norms(cfg, len(trainable)),
        clipping="per_layer" if cfg.clipping == "per-layer" else "flat",
        poisson_sampling=True,
        loss_reduction="mean",  # matches ctc_loss's mean over utterances
        noise_generator=noise_gen,
    )
    assert isinstance(optimizer, DPOptimizer)
    per_sample_grads_only(gsm)  # the optimizer uses the per-sample gradients only
    with warnings.catch_warnings(), fresh_grad_samples_taken():
        # Opacus's hooks on the first layer fire although the features need no gradient: harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss, skipped = _private_epochs(gsm, optimizer, dp_loader, engine, cfg, device, prior.delta)

    history = tuple((float(s), float(q), int(n)) for s, q, n in engine.accountant.history)
    state = PrivacyLedger(prior.delta, history)
    steps = state.num_steps - prior.num_steps
    return TrainResult(
        state_dict=plain_state_dict(gsm),
        metrics=make_metrics(loss, len(dataset), steps, skipped, start),
        epsilon=state.epsilon(cfg.accountant),
        noise_multiplier=noise,
        sample_rate=sample_rate,
        privacy_state=state,
    )


def _clipping_norms(cfg: TrainConfig, num_tensors: int) -> float | list[float]:
    """``max-grad-norm``, or with per-layer clipping one equal share per trained tensor whose L2
    sum is ``max-grad-norm`` (Opacus noises with that sum: the sensitivity is unchanged)."""
    if cfg.clipping == "flat":
        return cfg.max_grad_norm
    return [cfg.max_grad_norm / math.sqrt(num_tensors)] * num_tensors


def _private_epochs(
    gsm: nn.Module,
    optimizer: DPOptimizer,
    loader: DataLoader[tuple[Tensor, Tensor]],
    engine: PrivacyEngine,
    cfg: TrainConfig,
    device: torch.device,
    delta: float,
) -> tuple[float, int]:
    """Run the DP-SGD epochs; returns (last epoch's mean loss, number of empty batches).

    With ``cfg.ema_decay`` the trained weights end as the moving average of every step's.
    """
    loss, skipped = math.nan, 0
    params = [p for p in optimizer.params if p.requires_grad]
    average = [p.detach().clone() for p in params] if cfg.ema_decay else []
    for epoch in range(cfg.epochs):
        total, count = 0.0, 0
        for raw in _physical_batches(loader, optimizer, cfg.max_physical_batch_size):
            optimizer.zero_grad()
            batch = as_ctc_batch(raw)
            if batch is None:
                # An empty Poisson draw is still a step of the mechanism: release pure noise.
                _set_empty_grad_samples(optimizer)
                skipped += 1
            else:
                batch = batch.to(device)
                batch_loss = ctc_loss(gsm(batch.feats, batch.feat_lens), batch)
                batch_loss.backward()
                total += batch_loss.item() * batch.size
                count += batch.size
            optimizer.step()
            if average and not optimizer._is_last_step_skipped:  # a logical step was taken
                with torch.no_grad():
                    torch._foreach_lerp_(average, params, 1.0 - cfg.ema_decay)
        loss = total / count if count else math.nan
        eps = epsilon_of(engine.accountant.history, delta, cfg.accountant)
        log.info("epoch %d/%d: loss %.4f, epsilon %.3f", epoch + 1, cfg.epochs, loss, eps)
    if average:
        with torch.no_grad():
            torch._foreach_copy_(params, average)
    return loss, skipped


def _calibrate(
    cfg: TrainConfig,
    prior: PrivacyLedger,
    planned_steps: int | None,
    sample_rate: float,
    steps_per_epoch: int,
) -> float:
    assert cfg.target_epsilon is not None
    this_call = cfg.epochs * steps_per_epoch
    planned = prior.num_steps + this_call if planned_steps is None else planned_steps
    if planned < prior.num_steps + this_call:
        raise ValueError(
            f"planned_steps={planned} < {prior.num_steps} recorded + {this_call} of this call"
        )
    noise = calibrate_noise_multiplier(
        target_epsilon=cfg.target_epsilon,
        sample_rate=sample_rate,
        steps=planned - prior.num_steps,
        prior=prior,
        accountant=cfg.accountant,
    )
    log.info(
        "noise multiplier %.4f for epsilon %.3g over %d steps", noise, cfg.target_epsilon, planned
    )
    return noise


def _physical_batches(
    loader: DataLoader[tuple[Tensor, Tensor]], optimizer: DPOptimizer, max_size: int | None
) -> Iterable[object]:
    """The loader's batches, split by Opacus's BatchMemoryManager when ``max_size`` is set."""
    if max_size is None:
        yield from loader
        return
    with BatchMemoryManager(
        data_loader=loader, max_physical_batch_size=max_size, optimizer=optimizer
    ) as split:
        yield from split


def _set_empty_grad_samples(optimizer: DPOptimizer) -> None:
    """Per-sample gradients of an empty batch: the DP optimizer then clips nothing, adds noise."""
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # (0, *P)
