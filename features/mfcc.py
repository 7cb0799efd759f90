"""MFCC features with torchaudio: MFCC (+deltas) -> per-utterance CMVN -> frame stacking/subsampling."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that determines the feature frames a model sees (stored in config.json)."""

    sample_rate: int = 16_000
    n_mfcc: int = 40
    n_mels: int = 64
    win_ms: float = 25.0
    hop_ms: float = 10.0
    deltas: int = 0  # 0: none, 1: +delta, 2: +delta+delta-delta
    cmvn: bool = True  # per-utterance mean/variance normalisation
    stack: int = 3  # consecutive frames concatenated into one model frame
    subsample: int = 3  # keep every k-th stacked frame

    @property
    def frame_dim(self) -> int:
        """Width of one model frame: n_mfcc x (1 + deltas) x stack."""
        return self.n_mfcc * (1 + self.deltas) * self.stack

    @property
    def frame_shift_s(self) -> float:
        """Seconds between consecutive model frames (after subsampling)."""
        return self.hop_ms / 1000.0 * self.subsample


# TODO(helper A): FeatureExtractor, compute_mfcc, CMVN, stacking
