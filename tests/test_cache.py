"""Feature cache: hits skip extraction, keys follow audio content and config, damage is repaired."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fedspeech_features.cache import FeatureCache, default_cache_root
from fedspeech_features.errors import AudioError
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.mfcc import FeatureExtractor

CFG = FeatureConfig()


class CountingCompute:
    """A compute function that records its calls and returns distinct, valid features."""

    def __init__(self, cfg: FeatureConfig = CFG) -> None:
        self.calls: list[Path] = []
        self.cfg = cfg

    def __call__(self, path: Path) -> torch.Tensor:
        self.calls.append(path)
        return torch.full((7, self.cfg.frame_dim), float(len(self.calls)))


def _wav(path: Path, seed: int = 0, seconds: float = 0.5) -> Path:
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(int(16_000 * seconds))).astype(np.float32), 16_000)
    return path


def test_second_call_is_a_hit_and_skips_compute(tmp_path: Path) -> None:
    # Prepare
    cache = FeatureCache(tmp_path / "cache", CFG)
    audio = _wav(tmp_path / "a.wav")
    compute = CountingCompute()

    # Execute
    first = cache.get_or_compute(audio, compute)
    second = cache.get_or_compute(audio, compute)

    # Assert
    assert len(compute.calls) == 1
    assert torch.equal(first, second)
    assert (cache.hits, cache.misses) == (1, 1)
    assert list((tmp_path / "cache").rglob("*.safetensors")) == [cache.entry_path(audio)]
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # atomic write left no temp file


def test_a_new_cache_object_reads_what_another_wrote(tmp_path: Path) -> None:
    audio = _wav(tmp_path / "a.wav")
    ext = FeatureExtractor(CFG)
    written = FeatureCache(tmp_path / "c", CFG).get_or_compute(audio, ext.from_file)
    compute = CountingCompute()
    reread = FeatureCache(tmp_path / "c", CFG).get_or_compute(audio, compute)
    assert compute.calls == []
    torch.testing.assert_close(reread, written, rtol=0, atol=0)


def test_renamed_or_copied_file_hits_edited_file_misses(tmp_path: Path) -> None:
    # Prepare
    cache = FeatureCache(tmp_path / "cache", CFG)
    audio = _wav(tmp_path / "a.wav", seed=1)
    compute = CountingCompute()
    cache.get_or_compute(audio, compute)

    # Execute: same bytes under other names, then different bytes under the old name
    copy = tmp_path / "sub" / "copy.wav"
    copy.parent.mkdir()
    shutil.copyfile(audio, copy)
    moved = audio.rename(tmp_path / "renamed.wav")
    cache.get_or_compute(copy, compute)
    cache.get_or_compute(moved, compute)
    edited = _wav(tmp_path / "a.wav", seed=2)
    cache.get_or_compute(edited, compute)

    # Assert
    assert len(compute.calls) == 2
    assert compute.calls[1] == edited
    assert cache.entry_path(copy) == cache.entry_path(moved) != cache.entry_path(edited)


def test_config_change_changes_the_key(tmp_path: Path) -> None:
    audio = _wav(tmp_path / "a.wav")
    other_cfg = FeatureConfig(stack=1)
    a = FeatureCache(tmp_path / "cache", CFG)
    b = FeatureCache(tmp_path / "cache", other_cfg)
    compute_b = CountingCompute(other_cfg)
    a.get_or_compute(audio, CountingCompute())
    b.get_or_compute(audio, compute_b)
    assert len(compute_b.calls) == 1  # a's entry was not reused for another config
    assert a.entry_path(audio) != b.entry_path(audio)
    assert a.entry_path(audio) == FeatureCache(tmp_path / "cache", FeatureConfig()).entry_path(
        audio
    )


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b"not a safetensors file"),
        lambda p: p.write_bytes(p.read_bytes()[:-40]),  # truncated
        "wrong-shape",
    ],
    ids=["garbage", "truncated", "wrong-shape"],
)
def test_damaged_entry_is_recomputed_with_a_warning(
    tmp_path: Path, damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    cache = FeatureCache(tmp_path / "cache", CFG)
    audio = _wav(tmp_path / "a.wav")
    compute = CountingCompute()
    cache.get_or_compute(audio, compute)
    entry = cache.entry_path(audio)
    if damage == "wrong-shape":  # a valid file holding features of another width
        other = FeatureCache(tmp_path / "other", FeatureConfig(stack=1))
        other.get_or_compute(audio, CountingCompute(FeatureConfig(stack=1)))
        shutil.copyfile(other.entry_path(audio), entry)
    else:
        damage(entry)  # type: ignore[operator]

    # Execute
    with caplog.at_level(logging.WARNING):
        feats = cache.get_or_compute(audio, compute)

    # Assert
    assert len(compute.calls) == 2
    assert feats.shape == (7, CFG.frame_dim) and float(feats[0, 0]) == 2.0
    assert cache.corrupt == 1
    assert "damaged entry" in caplog.text and "a.wav" in caplog.text
    assert torch.equal(cache.get_or_compute(audio, compute), feats)  # repaired on disk
    assert len(compute.calls) == 2


def test_missing_audio_raises_audio_error_naming_it(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache", CFG)
    with pytest.raises(AudioError, match=r"nope\.wav"):
        cache.get_or_compute(tmp_path / "nope.wav", CountingCompute())


def test_default_root_is_beside_the_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "corpus" / "manifest.tsv"
    assert default_cache_root(manifest) == tmp_path.resolve() / "corpus/.fedspeech-cache/features"
    assert FeatureCache.for_manifest(manifest, CFG).root == default_cache_root(manifest)
