"""Local training of the acoustic model: Opacus DP-SGD (Poisson sampling, clipping, noise) or plain.

``train_local`` is the (model, examples) -> (weights, metrics, epsilon) stage every client runs; it
imports no Flower. The privacy ledger (``PrivacyLedger``) goes in and comes out so that a client's
epsilon composes across rounds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedspeech.devices import resolve_device
from fedspeech.model import convert_model, plain_state_dict, set_trainable, unwrap
from fedspeech.privacy_ledger import PrivacyLedger
from fedspeech_client.batching import (
    Augment,
    FeatureDataset,
    LabelledFeatures,
    LengthBucketSampler,
    as_ctc_batch,
    collate_ctc,
    ctc_loss,
)
from fedspeech_client.frozen_trunk import MEMO as TRUNKS
from fedspeech_client.frozen_trunk import fits, head_model, trains_head_only
from fedspeech_client.train_config import (
    TrainConfig,
    TrainResult,
    make_metrics,
    make_optimizer,
    training_augment,
)

__all__ = ["TrainConfig", "TrainResult", "ctc_loss", "train_local"]

log = logging.getLogger(__name__)


def train_local(
    model: nn.Module,
    examples: Sequence[LabelledFeatures],
    cfg: TrainConfig,
    *,
    privacy_state: PrivacyLedger | None = None,
    planned_steps: int | None = None,
    augment: Augment | None = None,
    device: torch.device | None = None,
    proximal_mu: float = 0.0,
    frame_block: int = 1,
) -> TrainResult:
    """Train a copy of ``model`` on ``examples`` for ``cfg.epochs`` epochs (``model`` is untouched).

    Args:
        model: a ``BiGRUCTC`` of either flavour; DP training runs on its Opacus twin.
        examples: utterances (``fedspeech_features.dataset.Example`` or anything with feats/labels).
        cfg: training settings.
        privacy_state: this client's privacy ledger from earlier calls (None: fresh).
        planned_steps: DP steps this client plans in total, earlier calls included; the noise for
            ``cfg.target_epsilon`` is calibrated so that all of them spend at most the target.
            Default: the recorded steps plus this call's.
        augment: ``(T, D) -> (T', D)`` training-feature transform; default: what ``cfg`` asks
            for (``tempo_augment``, ``spec_augment``), seeded by ``cfg.seed``.
        device: where to train (default: ``cfg.device`` resolved on this machine, ``auto``: CUDA
            when available, else CPU). The returned weights are CPU tensors either way.
        proximal_mu: FedProx's proximal weight: after every optimizer step the weights are pulled
            back towards ``model``'s (the round's global weights) by ``lr * proximal_mu`` of the
            gap, outside DP clipping and noise (see ``fedspeech_client.proximal``). 0: plain training.
        frame_block: hop frames per model frame (``FeatureConfig.time_block``), for
            ``cfg.tempo_augment``.

    Returns:
        Weights, metrics and, with DP, the privacy spent.

    Raises:
        ValueError: no examples, or ``planned_steps`` smaller than the steps this call needs.
        DeviceError: ``cfg.device`` names a device this machine does not have.
        PrivacyBudgetError: ``cfg.target_epsilon`` cannot be met with the recorded history.
    """
    if not examples:
        raise ValueError("no training examples")
    device = device or resolve_device(cfg.device)
    if augment is None:
        augment = training_augment(cfg, cfg.seed, frame_block)
    if augment is None and trains_head_only(model, cfg) and fits(model, examples):
        # The fixed layers map each utterance the same way every round: computed once, kept.
        examples = TRUNKS.outputs(model, examples, device)
        model = head_model(model)
    dataset = FeatureDataset(examples, augment)
    # Dropout draws from torch's global RNG: seed it inside a fork so the caller's state is kept.
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)
        if cfg.dp:
            # Lazy: Opacus's import (~1.3 s) is for private training only
            from fedspeech_client.dp_sgd import train_private

            return train_private(
                model,
                dataset,
                cfg,
                prior_state=privacy_state,
                planned_steps=planned_steps,
                device=device,
                proximal_mu=proximal_mu,
            )
        return _train_plain(model, dataset, cfg, device, proximal_mu)


def _train_plain(
    model: nn.Module,
    dataset: FeatureDataset,
    cfg: TrainConfig,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> TrainResult:
    start = time.perf_counter()
    # FastGRU's backward (one product over time, tests/test_fast_gru.py: same gradients as
    # nn.GRU) is ~3x faster here than the fused kernel's on packed batches (docs/dp_gru.md);
    # other cells keep the fused nn.LSTM / nn.RNN. The weights come back under nn.GRU's names.
    fast = unwrap(model).cfg.cell == "gru"
    net = convert_model(model, dp=fast).to(device).train()
    trainable = set_trainable(net, cfg.trainable, cfg.freeze_layers)
    sampler = LengthBucketSampler(
        dataset.lengths(),
        cfg.batch_size,
        generator=torch.Generator().manual_seed(cfg.seed),
        max_frames=cfg.max_frames_per_batch,
    )
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_ctc)
    optimizer = make_optimizer(trainable, cfg, proximal_mu=proximal_mu)
    loss, steps, skipped = math.nan, 0, 0
    for epoch in range(cfg.epochs):
        loss, epoch_steps, epoch_skipped = run_plain_epoch(
            net, loader, optimizer, trainable, cfg.grad_clip, device
        )
        steps, skipped = steps + epoch_steps, skipped + epoch_skipped
        log.info("epoch %d/%d: loss %.4f, %d steps", epoch + 1, cfg.epochs, loss, steps)
    metrics = make_metrics(loss, len(dataset), steps, skipped, start)
    return TrainResult(state_dict=plain_state_dict(net), metrics=metrics)


_PROGRESS_REPORTS = 10  # progress lines per epoch of run_plain_epoch


def run_plain_epoch(
    net: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    trainable: Sequence[nn.Parameter],
    grad_clip: float | None,
    device: torch.device,
    *,
    progress: str | None = None,
) -> tuple[float, int, int]:
    """One non-private pass over ``loader``: ``(mean per-utterance loss, steps, skipped batches)``.

    A batch whose loss is not finite (an utterance CTC cannot align) is skipped, not stepped.
    ``progress``, e.g. ``"epoch 2/14"``: log that label with the batch count and running loss
    after every tenth of the batches (a long epoch shows that it moves).
    """
    total, count, steps, skipped = 0.0, 0, 0, 0
    batches = len(loader)
    every = max(1, math.ceil(batches / _PROGRESS_REPORTS))
    for done, raw in enumerate(loader, start=1):
        if progress and done > 1 and (done - 1) % every == 0:
            log.info(
                "%s: batch %d/%d, loss %.4f", progress, done - 1, batches, total / max(count, 1)
            )
        batch = as_ctc_batch(raw)
        assert batch is not None  # the bucket sampler never yields an empty batch
        batch = batch.to(device)
        optimizer.zero_grad()
        batch_loss = ctc_loss(net(batch.feats, batch.feat_lens), batch)
        if not torch.isfinite(batch_loss):
            skipped += 1
            continue
        batch_loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        steps += 1
        total += batch_loss.item() * batch.size
        count += batch.size
    return (total / count if count else math.nan), steps, skipped
