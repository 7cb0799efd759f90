"""Waveform augmentation for synthetic speech: additive noise, synthetic reverb and gain.

Everything is drawn from the ``numpy.random.Generator`` passed in, so an utterance's augmentation is
reproducible from its seed. Plain numpy (FFT convolution): importing scipy.signal in every worker
process would cost more than the convolutions themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NOISE_KINDS = ("white", "pink", "babble")
# Probabilities and ranges of augment_waveform. 5-25 dB SNR spans clean-ish to noisy-room speech.
NOISE_PROBABILITY, SNR_DB = 0.8, (5.0, 25.0)
# Living rooms and offices have RT60 of 0.2-0.7 s; a direct-to-reverberant ratio of 0-10 dB
# keeps speech intelligible.
REVERB_PROBABILITY, RT60_S, DRR_DB = 0.5, (0.2, 0.7), (0.0, 10.0)
GAIN_DB = (-9.0, 0.0)  # quieter recordings only: the caller limits peaks, never amplifies clipping
_BABBLE_TALKERS = 3
_EPS = 1e-12  # keeps power ratios finite for digital silence


def augment_waveform(
    wave: np.ndarray, rng: np.random.Generator, sample_rate: int, babble: Sequence[np.ndarray]
) -> np.ndarray:
    """Randomly reverberate, add noise (white, pink or babble) and change the gain.

    Args:
        wave: ``(N,)`` float waveform.
        rng: source of every random choice.
        sample_rate: rate of ``wave`` and ``babble`` in Hz.
        babble: speech clips (other talkers) mixed for babble noise; may be empty (no babble).

    Returns:
        ``(N,)`` float32 waveform (same length; peaks are not limited).
    """
    if rng.random() < REVERB_PROBABILITY:
        wave = reverberate(wave, rng, sample_rate)
    if rng.random() < NOISE_PROBABILITY:
        kinds = NOISE_KINDS if len(babble) else NOISE_KINDS[:2]
        kind = kinds[int(rng.integers(len(kinds)))]
        wave = add_noise(wave, make_noise(kind, wave.shape[0], rng, babble), rng.uniform(*SNR_DB))
    return (wave * 10 ** (rng.uniform(*GAIN_DB) / 20)).astype(np.float32)


def make_noise(
    kind: str, n: int, rng: np.random.Generator, babble: Sequence[np.ndarray] = ()
) -> np.ndarray:
    """``(n,)`` noise of one of NOISE_KINDS (unnormalised; add_noise sets the level)."""
    if kind == "white":
        return rng.standard_normal(n)
    if kind == "pink":  # power falls as 1/f: scale white noise's spectrum by 1/sqrt(f)
        spectrum = np.fft.rfft(rng.standard_normal(n))  # (n // 2 + 1,)
        return np.fft.irfft(spectrum / np.sqrt(np.maximum(np.arange(spectrum.size), 1)), n)
    if kind == "babble":  # a few other talkers, each looped from a random offset
        if not len(babble):
            raise ValueError("babble noise needs at least one speech clip")
        noise = np.zeros(n)
        for i in rng.integers(len(babble), size=_BABBLE_TALKERS):
            clip = babble[int(i)]
            looped = np.tile(clip, n // clip.size + 2)
            start = int(rng.integers(clip.size))
            noise += looped[start : start + n]
        return noise
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")


def add_noise(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``wave + noise`` with the noise scaled to ``snr_db`` below the signal's mean power."""
    ratio = np.mean(wave**2) / (np.mean(noise**2) + _EPS) / 10 ** (snr_db / 10)
    return wave + np.sqrt(ratio) * noise


def reverberate(wave: np.ndarray, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """Convolve with a synthetic room response (direct path + exponentially decaying noise).

    The output keeps ``wave``'s length and mean power.
    """
    rt60 = rng.uniform(*RT60_S)
    t = np.arange(int(rt60 * sample_rate)) / sample_rate  # (L,)
    tail = rng.standard_normal(t.size) * np.exp(-6.9 * t / rt60)  # e^-6.9 = -60 dB at rt60
    reverberant = 10 ** (-rng.uniform(*DRR_DB) / 10)  # reverberant energy / direct energy
    impulse = tail * np.sqrt(reverberant / (np.sum(tail**2) + _EPS))
    impulse[0] = 1.0  # the direct path
    size = 1 << int(np.ceil(np.log2(wave.size + impulse.size)))  # linear, not circular
    wet = np.fft.irfft(np.fft.rfft(wave, size) * np.fft.rfft(impulse, size), size)[: wave.size]
    return wet * np.sqrt(np.mean(wave**2) / (np.mean(wet**2) + _EPS))
