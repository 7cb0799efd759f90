"""Glue between stages: a manifest on disk -> training examples, with a printable summary."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fedspeech.config import ConfigError, RunConfig
from fedspeech.model import BiGRUCTC, plain_state_dict, with_fresh_adapters
from fedspeech.model_config import ModelConfig
from fedspeech.modeldir import load_model_dir
from fedspeech_features.augment import SpeedPerturbed
from fedspeech_features.cache import FeatureCache, default_cache_root
from fedspeech_features.dataset import Example, extract_manifest
from fedspeech_features.errors import SkipReport
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.manifest import read_manifest
from fedspeech_features.mfcc import FeatureExtractor
from fedspeech_features.text import CharTokenizer

log = logging.getLogger("fedspeech")


@dataclass(frozen=True)
class FeatureSummary:
    """What one feature pass over a manifest produced."""

    manifest: Path
    examples: int
    skipped: int
    audio_minutes: float
    frames: int
    frame_dim: int
    seconds: float
    cache_hits: int
    cache_misses: int

    def __str__(self) -> str:
        speed = self.audio_minutes * 60 / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"{self.manifest}: {self.examples} examples ({self.skipped} skipped), "
            f"{self.audio_minutes:.1f} min of audio -> {self.frames} frames x {self.frame_dim}, "
            f"{self.seconds:.1f} s ({speed:.0f}x real time), "
            f"cache {self.cache_hits} hits / {self.cache_misses} misses"
        )


def load_examples(
    manifest: str | Path,
    cfg: FeatureConfig,
    *,
    cache_root: str | Path | None = None,
    tokenizer: CharTokenizer | None = None,
    speed: float = 1.0,
) -> tuple[list[Example], SkipReport, FeatureSummary]:
    """Read a manifest and extract (cached) features and labels of every usable utterance.

    Args:
        manifest: a manifest.tsv.
        cfg: feature settings.
        cache_root: feature cache folder; default ``.fedspeech-cache/`` beside the manifest.
        tokenizer: transcript -> ids; default the character tokenizer.
        speed: speed-perturbation factor of the audio (``SpeedPerturbed``); its features are
            cached in a ``speed-<factor>`` folder of their own.
    """
    manifest = Path(manifest)
    start = time.perf_counter()
    utterances = read_manifest(manifest)
    root = Path(cache_root) if cache_root is not None else default_cache_root(manifest)
    extractor = FeatureExtractor(cfg)
    if speed != 1.0:
        root, extractor = root / f"speed-{speed:g}", SpeedPerturbed(cfg, speed)
    cache = FeatureCache(root, cfg)
    examples, report = extract_manifest(utterances, extractor, cache, tokenizer or CharTokenizer())
    summary = FeatureSummary(
        manifest=manifest,
        examples=len(examples),
        skipped=len(report.skipped),
        audio_minutes=sum(e.duration_s for e in examples) / 60,
        frames=sum(int(e.feats.shape[0]) for e in examples),
        frame_dim=cfg.frame_dim,
        seconds=time.perf_counter() - start,
        cache_hits=cache.hits,
        cache_misses=cache.misses,
    )
    return examples, report, summary


def initial_weights(cfg: RunConfig, model_config: ModelConfig) -> dict[str, Tensor]:
    """``init-model``'s weights, else a fresh model seeded with ``seed``.

    Raises:
        ConfigError: ``init-model`` does not have the run config's model shape and features.
    """
    if cfg.fed.init_model:
        loaded = load_model_dir(cfg.fed.init_model)
        # A model without adapters starts an adapter run (they begin as a no-op).
        fresh = model_config.adapter_rank and not loaded.model_config.adapter_rank
        wanted = dataclasses.replace(model_config, adapter_rank=0) if fresh else model_config
        if loaded.model_config != wanted or loaded.feature_config != cfg.features:
            raise ConfigError(
                f"init-model {cfg.fed.init_model}: model {loaded.model_config} / features "
                f"{loaded.feature_config} differ from the run config's {model_config} / "
                f"{cfg.features}"
            )
        log.info("starting from %s", cfg.fed.init_model)
        return with_fresh_adapters(plain_state_dict(loaded.model), model_config)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        return plain_state_dict(BiGRUCTC(model_config))
