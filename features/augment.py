"""Training-time augmentation: SpecAugment (random frequency and time masks on features,
identity in eval), tempo slow-down of the features (``TempoStretch``) and speed perturbation of
the audio (``SpeedPerturbed``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import soxr
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedspeech_features.audio import MIN_DURATION_S, load_audio
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.mfcc import FeatureExtractor


class SpecAugment(nn.Module):
    """Frequency and time masking (Park et al., 2019) on ``(T, D)`` or ``(B, T, D)`` features.

    Masked values are set to ``mask_value`` (0 = the mean after CMVN). Masks are drawn
    independently for every utterance; a time mask never exceeds ``max_time_fraction`` of that
    utterance's own length, and stays within its valid frames when ``lengths`` is given.

    The masking functions of torchaudio draw from the global RNG; these draw from a
    ``torch.Generator`` (``seed`` or the ``generator`` argument), so a run is reproducible without
    touching global state.

    Args:
        freq_masks: number of frequency masks per utterance.
        freq_width: largest frequency-mask width (coefficients); widths are uniform in 0..max.
        time_masks: number of time masks per utterance.
        time_width: largest time-mask width in frames.
        max_time_fraction: a time mask covers at most this fraction of the utterance.
        feature_block: when frames are stacked (and/or carry deltas), the width of one block
            (``n_mfcc``): the same coefficients are then masked in every block. ``None`` masks
            a contiguous band of the whole frame.
        mask_value: value written into masked cells.
        seed: seeds this module's own generator; ``None`` uses torch's global RNG.

    >>> aug = SpecAugment(freq_masks=1, freq_width=8, time_masks=2, time_width=10, seed=0)
    >>> aug.train()(torch.randn(100, 40)).shape
    torch.Size([100, 40])
    """

    def __init__(
        self,
        *,
        freq_masks: int = 2,
        freq_width: int = 8,
        time_masks: int = 2,
        time_width: int = 20,
        max_time_fraction: float = 0.2,
        feature_block: int | None = None,
        mask_value: float = 0.0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if min(freq_masks, freq_width, time_masks, time_width) < 0:
            raise ValueError("mask counts and widths must be >= 0")
        if not 0.0 <= max_time_fraction <= 1.0:
            raise ValueError(f"max_time_fraction must be in [0, 1], got {max_time_fraction}")
        if feature_block is not None and feature_block < 1:
            raise ValueError(f"feature_block must be >= 1, got {feature_block}")
        self.freq_masks = freq_masks
        self.freq_width = freq_width
        self.time_masks = time_masks
        self.time_width = time_width
        self.max_time_fraction = max_time_fraction
        self.feature_block = feature_block
        self.mask_value = mask_value
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)

    def forward(
        self,
        feats: Tensor,
        lengths: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Masked copy of ``feats`` in training mode; ``feats`` itself in eval mode.

        Args:
            feats: ``(T, D)`` or ``(B, T, D)`` features.
            lengths: ``(B,)`` valid frames per utterance of a padded batch (default: all ``T``).
            generator: overrides this module's generator for this call.
        """
        if not self.training or (self.freq_masks == 0 and self.time_masks == 0):
            return feats
        single = feats.dim() == 2
        x = feats[None] if single else feats  # (B, T, D)
        if x.dim() != 3:
            raise ValueError(f"expected (T, D) or (B, T, D) features, got {tuple(feats.shape)}")
        b, t, d = x.shape
        gen = generator if generator is not None else self.generator
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long)
        lengths = lengths.to(torch.long).cpu()

        band = self.feature_block or d  # masks are drawn within one band of this width
        f_idx = torch.arange(d) % band  # (D,) coefficient index within its block
        f_mask = self._spans(b, self.freq_masks, torch.full((b,), self.freq_width), band, gen)
        f_hit = _covered(f_mask, f_idx)  # (B, D)

        t_max = torch.minimum(
            torch.full((b,), self.time_width),
            (lengths.to(torch.float32) * self.max_time_fraction).floor().to(torch.long),
        )  # (B,) widest time mask per utterance
        t_mask = self._spans(b, self.time_masks, t_max, lengths, gen)
        t_hit = _covered(t_mask, torch.arange(t))  # (B, T)

        hit = t_hit[:, :, None] | f_hit[:, None, :]  # (B, T, D)
        out = x.masked_fill(hit.to(x.device), self.mask_value)  # (B, T, D)
        return out[0] if single else out

    @staticmethod
    def _spans(
        b: int,
        count: int,
        max_width: Tensor,
        extent: Tensor | int,
        gen: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        """``count`` random spans per row: widths uniform in ``0..max_width``, inside ``extent``."""
        u = torch.rand(2, b, count, generator=gen)  # (2, B, count)
        width = (u[0] * (max_width[:, None] + 1)).floor().to(torch.long)  # (B, count)
        ext = torch.as_tensor(extent).expand(b)[:, None]  # (B, 1)
        width = torch.minimum(width, ext)
        start = (u[1] * (ext - width + 1)).floor().to(torch.long)  # (B, count)
        return start, start + width


def _covered(spans: tuple[Tensor, Tensor], positions: Tensor) -> Tensor:
    """``(B, P)``: whether each position lies in any ``[start, stop)`` span of its row."""
    start, stop = spans  # (B, count) each
    pos = positions[None, None, :]  # (1, 1, P)
    return ((pos >= start[:, :, None]) & (pos < stop[:, :, None])).any(dim=1)  # (B, P)


class TempoStretch:
    """Slow some utterances down in the feature domain: a tempo change without a pitch change.

    With probability ``p`` an utterance's ``(T, D)`` features are stretched in time by a factor
    uniform in ``[1, max_factor]``: the 10 ms frames under the stacked model frames are linearly
    interpolated (``block`` frames per model frame, ``FeatureConfig.time_block``; the model
    frames themselves when ``D`` is not a multiple of it), so a 1.5x stretch of 90 frames gives
    135. Speakers who read slowly, with long pauses, are the ones a model trained on fluent public
    speech gets most wrong (docs/results.md: on the speechocean762 dev speakers this took the
    public model's greedy CER from 66.7% to 61.7%). Draws come from this object's own
    generator (``seed``), so a run is reproducible without touching global state.

    >>> tempo = TempoStretch(p=1.0, max_factor=1.5, block=3, seed=0)
    >>> out = tempo(torch.randn(30, 120))
    >>> out.shape[1], 30 <= out.shape[0] <= 45
    (120, True)
    """

    def __init__(self, *, p: float, max_factor: float, block: int = 1, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"tempo probability must be in [0, 1], got {p}")
        if not 1.0 <= max_factor <= 3.0:
            raise ValueError(f"tempo max factor must be in [1, 3], got {max_factor}")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.p, self.max_factor, self.block = p, max_factor, block
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, feats: Tensor) -> Tensor:
        """``feats`` ``(T, D)`` -> ``(T', D)`` with ``T <= T' <= ceil(T * max_factor)``."""
        u = torch.rand(2, generator=self.generator)  # always two draws: one per utterance
        if u[0].item() >= self.p:
            return feats
        factor = 1.0 + (self.max_factor - 1.0) * u[1].item()
        t, d = feats.shape
        k = self.block if d % self.block == 0 else 1
        frames = feats.reshape(t * k, d // k).T[None]  # (1, D / k, T * k): the frames under
        n = max(1, round(t * factor)) * k  # a whole number of model frames
        slow = F.interpolate(frames, size=n, mode="linear", align_corners=True)  # (1, D / k, n)
        return slow[0].T.reshape(n // k, d)  # (T', D)


def compose(*augments: Callable[[Tensor], Tensor] | None) -> Callable[[Tensor], Tensor] | None:
    """One ``(T, D) -> (T', D)`` transform applying ``augments`` in order (None ones skipped)."""
    chain = [a for a in augments if a is not None]
    if not chain:
        return None
    if len(chain) == 1:
        return chain[0]

    def applied(feats: Tensor) -> Tensor:
        for augment in chain:
            feats = augment(feats)
        return feats

    return applied


class SpeedPerturbed(FeatureExtractor):
    """A feature extractor that first changes the speed of the audio by ``factor`` (Ko et al.,
    2015; Kaldi's ``sox speed``): tempo and pitch together, ``factor`` > 1 is faster and shorter.

    The waveform is resampled from ``sample_rate`` to ``sample_rate / factor`` with soxr and
    then read as if it were still at ``sample_rate``. A fixed factor per extractor keeps the
    features cacheable (``fedspeech.pipeline.load_examples(speed=...)``); training draws one of
    the factors per utterance and epoch (``fedspeech_client.epochs.train_epochs``).

    >>> import numpy as np
    >>> from fedspeech_features.feature_config import FeatureConfig
    >>> slow, fast = SpeedPerturbed(FeatureConfig(), 0.9), SpeedPerturbed(FeatureConfig(), 1.1)
    >>> wave = np.zeros(16_000, dtype=np.float32)
    >>> len(slow.perturb(wave)), len(fast.perturb(wave))
    (17778, 14545)
    """

    def __init__(self, cfg: FeatureConfig, factor: float) -> None:
        if not 0.5 <= factor <= 2.0:
            raise ValueError(f"speed factor {factor} outside [0.5, 2]")
        super().__init__(cfg)
        self.factor = factor

    def perturb(self, wave: np.ndarray) -> np.ndarray:
        """``wave`` ``(N,)`` played ``factor`` times faster: ``(round(N / factor),)`` float32."""
        rate = self.cfg.sample_rate
        return soxr.resample(wave, rate, rate / self.factor, quality="HQ").astype(np.float32)

    def from_file(self, path: str | Path) -> Tensor:
        """Model frames of the speed-changed audio file (``AudioError`` names a bad file)."""
        shortest = max(MIN_DURATION_S, (self.cfg.n_fft // 2 + 1) / self.cfg.sample_rate)
        wave = load_audio(path, self.cfg.sample_rate, min_duration_s=shortest)  # (N,)
        return self(self.perturb(wave))  # (T', D)
