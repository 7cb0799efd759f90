"""Manifest -> examples: features and labels line up, bad rows are skipped and reported, not raised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from fedspeech_features.cache import FeatureCache
from fedspeech_features.dataset import extract_manifest
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.manifest import Utterance, read_manifest
from fedspeech_features.mfcc import FeatureExtractor
from fedspeech_features.text import CharTokenizer


def _wav(path: Path, seconds: float, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(int(16_000 * seconds))).astype(np.float32), 16_000)
    return path


def _utt(path: Path, transcript: str, seconds: float = 1.0) -> Utterance:
    return Utterance(path=path, transcript=transcript, speaker="spk", duration_s=seconds)


def test_bad_items_are_skipped_and_counted_good_ones_kept(tmp_path: Path) -> None:
    # Prepare
    good_a = _wav(tmp_path / "good_a.wav", 1.0, seed=1)
    good_b = _wav(tmp_path / "good_b.wav", 0.8, seed=2)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    short = _wav(tmp_path / "short.wav", 0.1)  # 11 MFCC frames -> 4 model frames
    utterances = [
        _utt(good_a, "Hello, World!"),
        _utt(corrupt, "hello"),
        _utt(_wav(tmp_path / "kanji.wav", 1.0), "日本語"),
        _utt(_wav(tmp_path / "empty.wav", 1.0), "  "),
        _utt(short, "a sentence far too long for a tenth of a second", 0.1),
        _utt(tmp_path / "missing.wav", "hello"),
        _utt(good_b, "it's 3 o'clock"),
    ]
    ext = FeatureExtractor(FeatureConfig())
    tok = CharTokenizer()

    # Execute
    examples, report = extract_manifest(utterances, ext, None, tok)

    # Assert
    assert [e.path for e in examples] == [good_a, good_b]
    assert report.kept == 2 and len(report.skipped) == 5
    reasons = {s.item: s.reason for s in report.skipped}  # the report names each file
    assert set(reasons) == {
        str(tmp_path / n)
        for n in ("corrupt.wav", "kanji.wav", "empty.wav", "short.wav", "missing.wav")
    }
    assert "cannot decode" in reasons[str(corrupt)]
    assert "cannot map" in reasons[str(tmp_path / "kanji.wav")]
    assert "empty transcript" in reasons[str(tmp_path / "empty.wav")]
    assert "CTC-infeasible" in reasons[str(short)]
    assert "not found" in reasons[str(tmp_path / "missing.wav")]
    assert examples[0].transcript == "hello world"
    assert tok.decode(examples[1].labels.tolist()) == "it's three o'clock"


def test_examples_line_up_with_extractor_and_tokenizer(tmp_path: Path) -> None:
    # Prepare
    cfg = FeatureConfig(deltas=1, stack=2, subsample=2)
    ext = FeatureExtractor(cfg)
    audio = _wav(tmp_path / "x.wav", 0.6)

    # Execute
    (example,), report = extract_manifest([_utt(audio, "Yes", 0.6)], ext, None, CharTokenizer())

    # Assert
    assert report.skipped == []
    assert example.feats.shape == (ext.num_frames(9600), cfg.frame_dim)
    assert example.feats.dtype == torch.float32
    assert example.labels.dtype == torch.int64
    assert example.labels.tolist() == CharTokenizer().encode("yes")
    assert (example.utt_id, example.speaker, example.duration_s) == ("x", "spk", 0.6)
    torch.testing.assert_close(example.feats, ext.from_file(audio))


def test_real_corpus_second_pass_comes_from_cache(shared_data: Path, tmp_path: Path) -> None:
    # Prepare
    utterances = read_manifest(shared_data / "fsdd" / "manifest.tsv")[:20]
    ext = FeatureExtractor(FeatureConfig())
    cache = FeatureCache(tmp_path / "cache", ext.cfg)
    tok = CharTokenizer()

    # Execute
    first, report1 = extract_manifest(utterances, ext, cache, tok)
    misses_after_first = cache.misses
    second, report2 = extract_manifest(utterances, ext, cache, tok)

    # Assert
    assert report1.kept == report2.kept == 20
    assert misses_after_first == 20 and cache.misses == 20 and cache.hits == 20
    for a, b, utt in zip(first, second, utterances, strict=True):
        assert torch.equal(a.feats, b.feats)
        assert tok.decode(a.labels.tolist()) == utt.transcript
        assert len(a.labels) <= a.feats.shape[0]
