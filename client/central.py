"""Centralized training: one "client" holding all the data, the reference federated runs compare with.

Same features, model and ``train_local`` code (DP included) as a federated client; the result is a
model directory that ``fedspeech transcribe`` and ``fedspeech evaluate`` read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import fedspeech.metric_keys as mk
from fedspeech import __version__
from fedspeech.config import RunConfig
from fedspeech.devices import resolve_device
from fedspeech.model import BiGRUCTC, count_parameters, set_trainable, without_adapters
from fedspeech.modeldir import save_model_dir
from fedspeech.pipeline import initial_weights, load_examples
from fedspeech_client.train import train_local
from fedspeech_client.train_config import TrainResult
from fedspeech_features.errors import FedspeechDataError
from fedspeech_features.text import CharTokenizer

log = logging.getLogger("fedspeech")


@dataclass(frozen=True)
class CentralResult:
    """A finished central training run."""

    model_dir: Path
    train: TrainResult
    examples: int
    skipped: int


def train_central(
    manifest: str | Path, cfg: RunConfig, out_dir: str | Path, *, cache_root: Path | None = None
) -> CentralResult:
    """Train a fresh model on every usable utterance of ``manifest``; save it to ``out_dir``.

    Raises:
        FedspeechDataError: the manifest has no usable utterance.
        DeviceError: the run config's ``device`` is not on this machine (before any data is read).
    """
    device = resolve_device(cfg.train.device)
    manifest = Path(manifest)
    examples, report, summary = load_examples(manifest, cfg.features, cache_root=cache_root)
    log.info("%s", summary)
    if not examples:
        raise FedspeechDataError(
            f"{manifest}: no usable utterances ({len(report.skipped)} skipped)"
        )
    tokenizer = CharTokenizer()
    model_cfg = cfg.model.model_config(cfg.features.frame_dim, tokenizer.vocab_size)
    torch.manual_seed(cfg.train.seed)  # weight init, dropout
    model = BiGRUCTC(model_cfg)
    model.load_state_dict(initial_weights(cfg, model_cfg))  # ``init-model`` or fresh
    trained = set_trainable(model, cfg.train.trainable, cfg.train.freeze_layers)
    log.info(
        "training %s of %s parameters on %d utterances for %d epochs (%s) on %s",
        f"{sum(p.numel() for p in trained):,}",
        f"{count_parameters(model, trainable_only=False):,}",
        len(examples),
        cfg.train.epochs,
        "DP-SGD" if cfg.train.dp else "non-private",
        device,
    )
    result = train_local(
        model, examples, cfg.train, device=device, frame_block=cfg.features.time_block
    )
    provenance: dict[str, Any] = {
        "mode": "central",
        "init_model": cfg.fed.init_model or None,
        "data": str(manifest.resolve()),
        "utterances": len(examples),
        "skipped": len(report.skipped),
        "speakers": len({e.speaker for e in examples}),
        "audio_minutes": round(summary.audio_minutes, 2),
        "epochs": cfg.train.epochs,
        "steps": int(result.metrics[mk.NUM_STEPS]),
        "train_loss": result.metrics[mk.TRAIN_LOSS],
        "dp": cfg.train.dp,
        "epsilon": result.epsilon,
        "delta": cfg.train.delta if cfg.train.dp else None,
        "noise_multiplier": result.noise_multiplier,
        "max_grad_norm": cfg.train.max_grad_norm if cfg.train.dp else None,
        "sample_rate": result.sample_rate,
        "accountant": cfg.train.accountant if cfg.train.dp else None,
        "run_config": cfg.to_flat(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "fedspeech_version": __version__,
    }
    weights, model_cfg = without_adapters(result.state_dict, model_cfg)
    model_dir = save_model_dir(out_dir, weights, model_cfg, cfg.features, tokenizer, provenance)
    return CentralResult(model_dir, result, len(examples), len(report.skipped))
