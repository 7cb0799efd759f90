"""What determines the feature frames a model sees, without torch (``fedspeech.config`` reads it;
``fedspeech_features.mfcc`` computes the frames)."""

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

    def __post_init__(self) -> None:
        problems = []
        if self.sample_rate <= 0:
            problems.append(f"sample_rate must be > 0, got {self.sample_rate}")
        if self.n_mfcc < 1:
            problems.append(f"n_mfcc must be >= 1, got {self.n_mfcc}")
        if self.n_mels < self.n_mfcc:
            problems.append(f"n_mfcc ({self.n_mfcc}) cannot exceed n_mels ({self.n_mels})")
        if self.hop_ms <= 0 or self.win_ms <= 0:
            problems.append(f"win_ms and hop_ms must be > 0, got {self.win_ms}, {self.hop_ms}")
        elif self.sample_rate > 0 and (self.hop_length < 1 or self.win_length < 2):
            problems.append(
                f"win_ms={self.win_ms}/hop_ms={self.hop_ms} give {self.win_length}/"
                f"{self.hop_length} samples at {self.sample_rate} Hz"
            )
        if self.deltas not in (0, 1, 2):
            problems.append(f"deltas must be 0, 1 or 2, got {self.deltas}")
        if self.stack < 1:
            problems.append(f"stack must be >= 1, got {self.stack}")
        if self.subsample < 1:
            problems.append(f"subsample must be >= 1, got {self.subsample}")
        if problems:
            raise ValueError("invalid FeatureConfig: " + "; ".join(problems))

    @property
    def frame_dim(self) -> int:
        """Width of one model frame: n_mfcc x (1 + deltas) x stack."""
        return self.n_mfcc * (1 + self.deltas) * self.stack

    @property
    def time_block(self) -> int:
        """Hop frames under one model frame when the stacked frames tile time exactly
        (``stack == subsample``; ``TempoStretch`` then interpolates those frames), else 1."""
        return self.stack if self.stack == self.subsample else 1

    @property
    def frame_shift_s(self) -> float:
        """Seconds between consecutive model frames (after subsampling)."""
        return self.hop_ms / 1000.0 * self.subsample

    @property
    def win_length(self) -> int:
        """Analysis window in samples (400 at 16 kHz / 25 ms)."""
        return round(self.sample_rate * self.win_ms / 1000.0)

    @property
    def hop_length(self) -> int:
        """Hop between MFCC frames in samples (160 at 16 kHz / 10 ms)."""
        return round(self.sample_rate * self.hop_ms / 1000.0)

    @property
    def n_fft(self) -> int:
        """FFT size: the window length rounded up to a power of two (400 -> 512).

        As in Kaldi and most ASR front ends: a power-of-two FFT is the fast path of pocketfft, and
        the finer bin spacing (31 Hz instead of 40 Hz at 16 kHz) resolves the narrow low mel bands.
        """
        return 1 << max(self.win_length - 1, 1).bit_length()
