"""Non-private training epoch by epoch, that can stop after any epoch and resume exactly there.

What a long pre-training needs (``fedspeech pretrain``): every epoch is a deterministic function
of (weights, optimizer state, epoch number): the batch order, dropout, SpecAugment and tempo
draw from generators seeded by ``seed`` and the epoch, and the learning rate follows a schedule of
the epoch alone. So the state after epoch k (``EpochState``: weights, optimizer moments, losses so far) is
all a resumed run needs to continue exactly as the uninterrupted one would have
(``tests/test_pretrain.py`` compares the two). ``save_epoch_state``/``load_epoch_state`` keep it
as safetensors + JSON (no pickle), written whole or not at all.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader

from fedspeech.devices import resolve_device
from fedspeech.model import BiGRUCTC, convert_model, plain_state_dict, set_trainable
from fedspeech_client.batching import (
    FeatureDataset,
    LabelledFeatures,
    LengthBucketSampler,
    collate_ctc,
)
from fedspeech_client.train import run_plain_epoch
from fedspeech_client.train_config import TrainConfig, make_optimizer, training_augment
from fedspeech_features.files import atomic_directory, atomic_write

log = logging.getLogger(__name__)

_WEIGHTS = "weights.safetensors"
_MOMENTS = "optimizer.safetensors"
_STATE = "state.json"
_EPOCH_SEED_STRIDE = 1_000_003  # epoch e draws from seed + e * stride: no two epochs share a seed


@dataclass(frozen=True)
class EpochState:
    """Where a training stands after ``epochs_done`` epochs.

    Attributes:
        epochs_done: finished epochs.
        weights: the model's plain (``nn.GRU``-named) weights.
        optimizer: the optimizer's ``state_dict()`` (moments and step counts).
        history: one record per finished epoch (loss, steps, lr, and what the caller added).
    """

    epochs_done: int
    weights: dict[str, Tensor]
    optimizer: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def cosine_lr(
    base_lr: float, epoch: int, epochs: int, *, warmup: int = 1, floor: float = 0.05
) -> float:
    """The learning rate of ``epoch`` (0-based): a linear ramp over ``warmup`` epochs, then a
    cosine from ``base_lr`` down to ``floor * base_lr`` at the last epoch.

    >>> [round(cosine_lr(1e-3, e, 5) * 1e3, 4) for e in range(5)]
    [0.5, 1.0, 0.7625, 0.2875, 0.05]
    """
    if epoch < warmup:
        return base_lr * (epoch + 1) / (warmup + 1)
    progress = min(1.0, (epoch - warmup) / max(1, epochs - 1 - warmup))
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_epochs(
    model: BiGRUCTC,
    examples: Sequence[LabelledFeatures],
    cfg: TrainConfig,
    epochs: int,
    *,
    resume: EpochState | None = None,
    device: torch.device | None = None,
    variants: Sequence[Sequence[LabelledFeatures]] = (),
    frame_block: int = 1,
) -> Iterator[EpochState]:
    """Train ``model`` (non-private) up to ``epochs`` epochs; yield the state after each one.

    ``resume`` continues from a saved state (its weights replace ``model``'s). The caller saves,
    evaluates or stops between epochs; what it adds to the last history record is kept.
    ``device``: where to train (default: ``cfg.device`` resolved here); the yielded weights are
    CPU tensors and ``save_epoch_state`` writes the optimizer state from the CPU, so a state saved
    on a GPU resumes on a CPU and vice versa (the optimizer moves it to its parameters' device).
    ``variants[i]``, if given, are other versions of ``examples[i]`` (speed-perturbed copies):
    every epoch trains on one of ``(examples[i], *variants[i])`` per utterance, drawn uniformly
    from the epoch's seed, so an epoch costs the same as one without them. ``frame_block``: hop
    frames per model frame (``FeatureConfig.time_block``), for ``cfg.tempo_augment``.

    Raises:
        ValueError: no examples, DP settings (this path is non-private), or ``resume`` already
            past ``epochs``.
        DeviceError: ``cfg.device`` names a device this machine does not have.
    """
    if not examples:
        raise ValueError("no training examples")
    if cfg.dp:
        raise ValueError("train_epochs is the non-private path: set dp = false")
    if variants and len(variants) != len(examples):
        raise ValueError(f"{len(variants)} variant lists for {len(examples)} examples")
    device = device or resolve_device(cfg.device)
    if resume is not None:
        if resume.epochs_done > epochs:
            raise ValueError(f"the saved training has {resume.epochs_done} epochs, > {epochs}")
        model.load_state_dict(resume.weights)
    net = convert_model(model, dp=model.cfg.cell == "gru").to(device).train()  # FastGRU
    trainable = set_trainable(net, cfg.trainable, cfg.freeze_layers)
    optimizer = make_optimizer(trainable, cfg)
    history: list[dict[str, Any]] = []
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        history = [dict(h) for h in resume.history]
    for epoch in range(len(history), epochs):
        lr = cosine_lr(cfg.lr, epoch, epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        seed = cfg.seed + epoch * _EPOCH_SEED_STRIDE
        began = time.perf_counter()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # dropout
            chosen = _choose_variants(examples, variants, seed)
            loss, steps, skipped = run_plain_epoch(
                net,
                _loader(chosen, cfg, seed, frame_block),
                optimizer,
                trainable,
                cfg.grad_clip,
                device,
                progress=f"epoch {epoch + 1}/{epochs}",
            )
        seconds = round(time.perf_counter() - began, 1)
        history.append(
            {"epoch": epoch + 1, "loss": loss, "steps": steps, "skipped": skipped, "lr": lr,
             "seconds": seconds}
        )  # fmt: skip
        log.info("epoch %d/%d: loss %.4f, %d steps, lr %.2e", epoch + 1, epochs, loss, steps, lr)
        state = EpochState(epoch + 1, plain_state_dict(net), optimizer.state_dict(), history)
        yield state
        history = state.history  # the caller may have added to the last record


def _choose_variants(
    examples: Sequence[LabelledFeatures],
    variants: Sequence[Sequence[LabelledFeatures]],
    seed: int,
) -> Sequence[LabelledFeatures]:
    """One version of every example for the epoch seeded ``seed`` (the examples if no variants)."""
    if not variants:
        return examples
    generator = torch.Generator().manual_seed(seed ^ 0x5EED)
    draws = torch.rand(len(examples), generator=generator).tolist()
    return [
        (ex, *others)[int(u * (len(others) + 1))]
        for ex, others, u in zip(examples, variants, draws, strict=True)
    ]


def _loader(
    examples: Sequence[LabelledFeatures], cfg: TrainConfig, seed: int, block: int
) -> DataLoader[Any]:
    dataset = FeatureDataset(examples, training_augment(cfg, seed, block))
    sampler = LengthBucketSampler(
        dataset.lengths(),
        cfg.batch_size,
        generator=torch.Generator().manual_seed(seed),
        max_frames=cfg.max_frames_per_batch,
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_ctc)


def save_epoch_state(folder: Path, state: EpochState) -> Path:
    """Write ``state`` to ``folder`` (replaced whole: a crash leaves the previous one)."""
    tensors, meta = _flatten_optimizer(state.optimizer)
    with atomic_directory(folder) as tmp:
        save_file({k: v.contiguous() for k, v in state.weights.items()}, str(tmp / _WEIGHTS))
        save_file(tensors, str(tmp / _MOMENTS))
        record = {"epochs_done": state.epochs_done, "optimizer": meta, "history": state.history}
        atomic_write(tmp / _STATE, json.dumps(record, indent=2) + "\n")
    return folder


def load_epoch_state(folder: Path) -> EpochState | None:
    """The state ``save_epoch_state`` wrote in ``folder``; None if there is none."""
    if not (folder / _STATE).is_file():
        return None
    record = json.loads((folder / _STATE).read_text(encoding="utf-8"))
    optimizer = _unflatten_optimizer(load_file(str(folder / _MOMENTS)), record["optimizer"])
    return EpochState(
        int(record["epochs_done"]), load_file(str(folder / _WEIGHTS)), optimizer, record["history"]
    )


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer ``state_dict`` as safetensors tensors + JSON (its non-tensor entries)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}
