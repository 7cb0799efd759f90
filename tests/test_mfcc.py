"""MFCC front end: librosa agreement, frame arithmetic, CMVN, deltas, stacking, batching, SpecAugment."""

from __future__ import annotations

import csv
from pathlib import Path

import librosa
import numpy as np
import pytest
import torch
import torchaudio.functional as AF
from hypothesis import given, settings
from hypothesis import strategies as st

from fedspeech_features.audio import load_audio
from fedspeech_features.augment import SpecAugment, TempoStretch, compose
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.mfcc import FeatureExtractor, cmvn, stack_frames

# Measured on 60 utterances of the four shared sets: max |ours - librosa| = 4.9e-4 on MFCCs whose
# largest magnitude is ~400-500 (c0), i.e. 1e-6 of the range: float32 rounding only. The bounds
# below leave 10x headroom and still fail on any real mismatch (htk vs slaney mel, constant vs
# reflect padding, a 400- vs 512-point FFT, batch-wide top_db all differ by > 1).
LIBROSA_MAX_ABS_DIFF = 5e-3
LIBROSA_MAX_REL_DIFF = 1e-5  # max |diff| / max |librosa MFCC|


def _real_waves(shared: Path, per_set: int = 4) -> list[np.ndarray]:
    waves = []
    for name in ("librispeech_samples", "fsdd", "speechocean762_train", "ljspeech_mini"):
        manifest = shared / name / "manifest.tsv"
        with manifest.open(encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))[:per_set]
        waves += [load_audio(manifest.parent / r["path"]) for r in rows]
    return waves


def _tone(seconds: float, freq: float = 440.0, sr: int = 16_000) -> torch.Tensor:
    t = torch.arange(int(seconds * sr)) / sr
    gen = torch.Generator().manual_seed(int(seconds * 1000))
    return 0.5 * torch.sin(2 * torch.pi * freq * t) + 0.05 * torch.randn(t.shape, generator=gen)


def test_raw_mfcc_matches_librosa_on_real_speech(shared_data: Path) -> None:
    # Prepare
    cfg = FeatureConfig()
    ext = FeatureExtractor(cfg)
    waves = _real_waves(shared_data)
    assert len(waves) == 16

    for wave in waves:
        # Execute
        ours = ext.mfcc(wave).numpy()  # (T, n_mfcc)
        ref = librosa.feature.mfcc(
            y=wave,
            sr=cfg.sample_rate,
            n_mfcc=cfg.n_mfcc,
            n_mels=cfg.n_mels,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            pad_mode="reflect",
        ).T  # (T, n_mfcc)

        # Assert
        assert ours.shape == ref.shape
        diff = float(np.abs(ours - ref).max())
        assert diff <= LIBROSA_MAX_ABS_DIFF
        assert diff / float(np.abs(ref).max()) <= LIBROSA_MAX_REL_DIFF


def test_n_fft_is_window_rounded_up_to_power_of_two() -> None:
    assert FeatureConfig().n_fft == 512  # 25 ms at 16 kHz = 400 samples
    assert FeatureConfig(sample_rate=8000).n_fft == 256  # 200 samples
    assert FeatureConfig(win_ms=32.0).n_fft == 512  # exactly 512 stays 512


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stack": 0},
        {"subsample": 0},
        {"deltas": 3},
        {"n_mfcc": 80, "n_mels": 64},
        {"hop_ms": 0.0},
        {"sample_rate": 0},
    ],
)
def test_feature_config_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="invalid FeatureConfig"):
        FeatureConfig(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    num_samples=st.integers(min_value=300, max_value=9000),
    stack=st.integers(1, 4),
    subsample=st.integers(1, 4),
    deltas=st.integers(0, 2),
)
def test_num_frames_matches_output(
    num_samples: int, stack: int, subsample: int, deltas: int
) -> None:
    cfg = FeatureConfig(stack=stack, subsample=subsample, deltas=deltas)
    ext = FeatureExtractor(cfg)
    feats = ext(torch.randn(num_samples))
    mfcc_frames = 1 + num_samples // 160  # librosa's centered framing at a 160-sample hop
    assert ext.num_frames(num_samples) == -(-mfcc_frames // subsample)
    assert feats.shape == (ext.num_frames(num_samples), cfg.frame_dim)
    assert feats.dtype == torch.float32
    assert ext.mfcc(torch.randn(num_samples)).shape == (mfcc_frames, cfg.n_mfcc)


def test_cmvn_gives_zero_mean_unit_variance_per_dim() -> None:
    # Prepare: raw MFCCs have large, dimension-dependent offsets
    ext = FeatureExtractor(FeatureConfig(stack=1, subsample=1, cmvn=True))
    raw = ext.mfcc(_tone(1.0))  # (T, 40)
    assert raw.mean(dim=0).abs().max() > 1.0

    # Execute
    feats = ext(_tone(1.0))  # (T, 40)

    # Assert
    torch.testing.assert_close(feats.mean(dim=0), torch.zeros(40), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.var(dim=0, unbiased=False), torch.ones(40), atol=1e-4, rtol=0)


def test_cmvn_ignores_padding_and_constant_dims_stay_finite() -> None:
    x = torch.tensor([[[1.0, 5.0], [3.0, 5.0], [99.0, 99.0]]])  # (1, 3, 2), frame 2 is padding
    out = cmvn(x, torch.tensor([2]))
    torch.testing.assert_close(out[0, :2], torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    assert out[0, 2].abs().sum() == 0


def test_deltas_are_appended_after_the_coefficients() -> None:
    # Prepare
    base = FeatureConfig(stack=1, subsample=1, cmvn=False, deltas=0)
    with_dd = FeatureConfig(stack=1, subsample=1, cmvn=False, deltas=2)
    wave = _tone(0.7)

    # Execute
    raw = FeatureExtractor(base)(wave)  # (T, 40)
    full = FeatureExtractor(with_dd)(wave)  # (T, 120)

    # Assert
    assert full.shape == (raw.shape[0], 120)
    torch.testing.assert_close(full[:, :40], raw)
    delta = AF.compute_deltas(raw.T, win_length=5).T  # (T, 40)
    torch.testing.assert_close(full[:, 40:80], delta)
    torch.testing.assert_close(full[:, 80:], AF.compute_deltas(delta.T, win_length=5).T)


def test_stack_frames_on_known_input() -> None:
    # Prepare: frame t of utterance b holds 10 * b + t; utterance 1 is 5 frames, 2 padding
    x = (torch.arange(7.0)[None, :, None] + torch.tensor([0.0, 10.0])[:, None, None]).clone()
    lengths = torch.tensor([7, 5])

    # Execute
    out, out_len = stack_frames(x, lengths, stack=3, subsample=2)

    # Assert
    assert out_len.tolist() == [4, 3]
    assert out[0].tolist() == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 6, 6]]
    assert out[1].tolist() == [[10, 11, 12], [12, 13, 14], [14, 14, 14], [0, 0, 0]]


def test_batch_equals_one_by_one_on_real_speech(shared_data: Path) -> None:
    # Prepare: every stage that has edges or statistics is switched on
    ext = FeatureExtractor(FeatureConfig(deltas=2, cmvn=True, stack=3, subsample=3))
    waves = _real_waves(shared_data, per_set=3)
    lengths = {len(w) for w in waves}
    assert len(lengths) == len(waves)  # different lengths, so padding is exercised

    # Execute
    single = [ext(w) for w in waves]
    batched = ext.batch(waves)
    padded, out_len = ext.batch_padded(waves)

    # Assert
    for one, b, row, n in zip(single, batched, padded, out_len.tolist(), strict=True):
        assert b.shape == one.shape == (n, ext.cfg.frame_dim)
        torch.testing.assert_close(b, one, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(row[:n], one, atol=1e-4, rtol=1e-4)
        assert row[n:].abs().sum() == 0


def test_top_db_floor_is_per_utterance_in_a_batch() -> None:
    # Prepare: a quiet clip with digital silence, batched with a loud one. A batch-wide top_db
    # ceiling (torchaudio.transforms.MFCC on a 2-D batch) would lift the quiet clip's silence floor.
    cfg = FeatureConfig(cmvn=False, stack=1, subsample=1)
    ext = FeatureExtractor(cfg)
    quiet = torch.cat([1e-3 * _tone(0.5), torch.zeros(8000)])
    loud = _tone(1.5)

    # Execute
    alone = ext(quiet)  # (T, 40)
    together = ext.batch([quiet, loud])[0]  # (T, 40)

    # Assert
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    # c0 of a frame at a constant level v dB is sqrt(n_mels) * v (orthonormal DCT). The silent
    # frames sit at the -100 dB amin floor of their own clip; a ceiling shared with the loud clip
    # (peak ~ +14 dB) would lift them to ~ -66 dB.
    floor_db = float(together[-1, 0]) / np.sqrt(cfg.n_mels)
    assert floor_db == pytest.approx(-100.0, abs=0.01)


def test_from_file_equals_call_on_loaded_audio(shared_data: Path) -> None:
    path = shared_data / "fsdd" / "recordings" / "0_george_0.wav"
    ext = FeatureExtractor(FeatureConfig())
    torch.testing.assert_close(ext.from_file(path), ext(load_audio(path)))


# ---------------------------------------------------------------------------- SpecAugment
def _feats() -> torch.Tensor:
    return torch.randn(200, 120, generator=torch.Generator().manual_seed(0)) + 5.0  # no zeros


def test_specaugment_masks_in_train_mode() -> None:
    aug = SpecAugment(freq_masks=2, freq_width=10, time_masks=2, time_width=30, seed=1).train()
    x = _feats()
    out = aug(x)
    masked = out == 0.0
    assert out.shape == x.shape
    assert masked.any()
    assert torch.equal(out[~masked], x[~masked])  # everything else untouched
    assert masked.all(dim=1).any() or masked.all(dim=0).any()  # whole frames or whole columns


def test_specaugment_is_identity_in_eval_mode() -> None:
    aug = SpecAugment(seed=1).eval()
    x = _feats()
    assert aug(x) is x


def test_specaugment_is_deterministic_with_seed() -> None:
    x = _feats()
    a = SpecAugment(seed=7).train()(x)
    b = SpecAugment(seed=7).train()(x)
    c = SpecAugment(seed=8).train()(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    aug = SpecAugment().train()
    assert torch.equal(aug(x, generator=g1), aug(x, generator=g2))


def test_specaugment_time_masks_respect_length_fraction() -> None:
    # Prepare: no frequency masks, one wide time mask capped at 10% of each utterance
    aug = SpecAugment(freq_masks=0, time_masks=1, time_width=1000, max_time_fraction=0.1).train()
    x = torch.ones(64, 100, 8)  # (B, T, D)
    lengths = torch.full((64,), 50)

    # Execute
    out = aug(x, lengths, generator=torch.Generator().manual_seed(0))

    # Assert
    masked_frames = (out == 0).all(dim=2)  # (B, T)
    assert masked_frames.sum(dim=1).max() <= 5  # 10% of 50 frames
    assert masked_frames.sum(dim=1).max() >= 1
    assert not masked_frames[:, 50:].any()  # never in padding


def test_specaugment_feature_block_masks_same_coefficients_in_every_block() -> None:
    aug = SpecAugment(freq_masks=1, freq_width=6, time_masks=0, feature_block=40, seed=0).train()
    out = aug(torch.ones(30, 120))  # 3 stacked frames of 40 coefficients
    cols = (out == 0).all(dim=0).reshape(3, 40)
    assert cols.any()
    assert torch.equal(cols[0], cols[1]) and torch.equal(cols[1], cols[2])


# ---------------------------------------------------------------------------- TempoStretch
def test_tempo_stretch_slows_the_frames_under_stacked_model_frames() -> None:
    # Prepare: 10 ms frames that ramp linearly (value = frame index), stacked 3 by 3 as the
    # default features are (stack == subsample == 3): model frame t holds frames 3t..3t+2.
    frames = torch.arange(60, dtype=torch.float32)[:, None].repeat(1, 4)  # (60, 4)
    stacked = frames.reshape(20, 12)  # (20, 12)
    assert FeatureConfig().time_block == 3 and FeatureConfig(subsample=2).time_block == 1
    tempo = TempoStretch(p=1.0, max_factor=2.0, block=3, seed=0)
    # Execute
    outs = [tempo(stacked) for _ in range(20)]
    # Assert: every output is the ramp, slowed by the factor its length implies, from the first
    # frame to the last (linear interpolation of the frames, not of the stacked vectors)
    assert {o.shape[1] for o in outs} == {12} and all(20 <= o.shape[0] <= 40 for o in outs)
    assert len({o.shape[0] for o in outs}) > 5  # factors are drawn, not fixed
    for out in outs:
        under = out.reshape(-1, 4)[:, 0]  # (3 T',)
        expected = torch.linspace(0, 59, len(under))
        torch.testing.assert_close(under, expected)


def test_tempo_stretch_probability_and_seed() -> None:
    x = _feats()  # (200, 120)
    never = TempoStretch(p=0.0, max_factor=1.8, block=3, seed=0)
    assert all(never(x) is x for _ in range(10))
    half = TempoStretch(p=0.5, max_factor=1.8, block=3, seed=4)
    seen = [half(x).shape[0] for _ in range(200)]
    assert 60 < sum(n > 200 for n in seen) < 140  # about half are slowed
    again = TempoStretch(p=0.5, max_factor=1.8, block=3, seed=4)
    assert [again(x).shape[0] for _ in range(200)] == seen
    other = TempoStretch(p=0.5, max_factor=1.8, block=3, seed=5)
    assert [other(x).shape[0] for _ in range(200)] != seen
    assert max(seen) <= 360  # never beyond max_factor


@pytest.mark.parametrize(
    "kwargs",
    [
        {"p": 1.5, "max_factor": 1.8},
        {"p": 0.5, "max_factor": 0.9},
        {"p": 0.5, "max_factor": 1.5, "block": 0},
    ],
)
def test_tempo_stretch_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        TempoStretch(**kwargs)  # type: ignore[arg-type]


def test_compose_applies_in_order_and_skips_none() -> None:
    x = torch.ones(5, 2)
    assert compose(None, None) is None
    double = lambda t: t * 2  # noqa: E731
    assert compose(None, double) is double
    chained = compose(double, lambda t: t + 1)
    assert chained is not None and torch.equal(chained(x), torch.full((5, 2), 3.0))
