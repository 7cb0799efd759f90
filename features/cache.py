"""On-disk feature cache: each utterance is extracted once per feature config, not once per round.

An entry is keyed by the SHA-256 of the audio file's bytes (so renaming or copying a file keeps the
entry, editing it does not), a hash of the :class:`FeatureConfig` and :data:`CACHE_VERSION`. Entries
are safetensors files (never pickle) written atomically; a damaged one is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from fedspeech_features.errors import AudioError
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.files import atomic_write

# Bump when the feature code changes the numbers it produces: old entries are then never read.
CACHE_VERSION = 1
CACHE_DIRNAME = ".fedspeech-cache"
_TENSOR_NAME = "feats"

log = logging.getLogger(__name__)


def default_cache_root(manifest: str | Path) -> Path:
    """``<manifest folder>/.fedspeech-cache/features``: the cache travels with the data."""
    return Path(manifest).resolve().parent / CACHE_DIRNAME / "features"


def config_digest(cfg: FeatureConfig) -> str:
    """SHA-256 of the feature config (sorted JSON of its fields) and the cache format version."""
    payload = json.dumps({"version": CACHE_VERSION, "config": asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def content_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes. Raises AudioError naming the file when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as exc:
        raise AudioError(f"{path}: cannot read file ({exc.strerror or exc})") from exc


class FeatureCache:
    """Feature tensors on disk: ``root/v<version>-<config hash>/<aa>/<content hash>.safetensors``.

    Safe to share between processes: entries are written to a temporary file and renamed into
    place, so a reader sees a whole entry or none.

    Attributes:
        hits: lookups answered from disk.
        misses: lookups that had to compute (including damaged entries).
        corrupt: damaged entries found (and replaced).
    """

    def __init__(self, root: str | Path, cfg: FeatureConfig) -> None:
        self.cfg = cfg
        self.root = Path(root)
        self.dir = self.root / f"v{CACHE_VERSION}-{config_digest(cfg)[:16]}"
        self.hits = 0
        self.misses = 0
        self.corrupt = 0

    @classmethod
    def for_manifest(cls, manifest: str | Path, cfg: FeatureConfig) -> FeatureCache:
        """A cache in the default place for a manifest's data (see :func:`default_cache_root`)."""
        return cls(default_cache_root(manifest), cfg)

    def entry_path(self, path: str | Path) -> Path:
        """Where the features of the audio file ``path`` are (or would be) stored."""
        digest = content_digest(path)
        return self.dir / digest[:2] / f"{digest}.safetensors"

    def get_or_compute(self, path: str | Path, compute: Callable[[Path], Tensor]) -> Tensor:
        """Cached features of ``path``, or ``compute(path)`` stored for next time.

        Raises:
            AudioError: the file cannot be read (and whatever ``compute`` raises).
        """
        path = Path(path)
        entry = self.entry_path(path)
        feats = self._load(entry, path)
        if feats is not None:
            self.hits += 1
            return feats
        self.misses += 1
        feats = compute(path)
        try:
            self._store(entry, feats, path)
        except OSError as exc:  # a full or read-only disk costs speed, not correctness
            log.warning("feature cache: cannot write %s (%s)", entry, exc)
        return feats

    def _load(self, entry: Path, source: Path) -> Tensor | None:
        if not entry.is_file():
            return None
        try:
            feats = load_file(entry)[_TENSOR_NAME]
            if feats.dim() != 2 or feats.shape[1] != self.cfg.frame_dim:
                raise ValueError(f"shape {tuple(feats.shape)}, expected (T, {self.cfg.frame_dim})")
            if feats.dtype != torch.float32 or not bool(torch.isfinite(feats).all()):
                raise ValueError(f"dtype {feats.dtype} or non-finite values")
        except Exception as exc:  # safetensors raises SafetensorError, OSError, KeyError...
            self.corrupt += 1
            log.warning(
                "feature cache: damaged entry %s for %s (%s); recomputing", entry, source, exc
            )
            return None
        return feats

    def _store(self, entry: Path, feats: Tensor, source: Path) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        meta = {"source": str(source), "cache_version": str(CACHE_VERSION)}
        meta["config"] = json.dumps(asdict(self.cfg), sort_keys=True)
        data = save({_TENSOR_NAME: feats.detach().cpu().contiguous()}, metadata=meta)
        # Owner-only: the features are derived from the node's private audio. Not durable: an
        # entry lost to a crash is recomputed, and an fsync per utterance would cost more.
        atomic_write(entry, data, mode=0o600, durable=False)
