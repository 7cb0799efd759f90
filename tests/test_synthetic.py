"""The built-in synthetic corpus: espeak-ng voices, sentences, reproducible builds, the no-op re-run."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedspeech_features.corpora import synthetic
from fedspeech_features.corpora.augment import add_noise, augment_waveform, make_noise, reverberate
from fedspeech_features.corpora.sentences import DIGIT_WORDS, generate_sentences, vocabulary
from fedspeech_features.corpora.synthetic import (
    MIN_VOICES,
    build_synthetic_corpus,
    choose_voices,
    speaker_id,
)
from fedspeech_features.manifest import read_manifest
from fedspeech_features.text import normalize_transcript
from fedspeech_features.tts import Espeak, TtsError, Voice

SMALL = 24  # utterances of the small test builds: 2 per speaker with 12 voices


def _tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def espeak() -> Iterator[Espeak]:
    with Espeak() as tts:
        yield tts


@pytest.fixture(scope="module")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "corpus"
    build_synthetic_corpus(out, num_utterances=SMALL, seed=0, num_voices=MIN_VOICES)
    return out


# ---------------------------------------------------------------------------- tts


def test_same_text_and_voice_give_identical_samples_whatever_came_before(espeak: Espeak) -> None:
    # Prepare: klatt variants and 'whisper' use espeak's random noise; flutter state carries over
    text = "set a timer for twenty minutes"
    for voice in (Voice("en-us", "klatt3", 160, 55), Voice("en", "m3"), Voice("en", "whisper")):
        # Execute
        first, rate = espeak.synthesize(text, voice)
        espeak.synthesize("something else entirely", Voice("en-gb-x-rp", "f2"))
        with Espeak() as other:  # a second instance in the same process
            again, _ = other.synthesize(text, voice)
        # Assert
        assert rate == 22050
        assert first.dtype == np.int16 and first.size > rate // 2
        np.testing.assert_array_equal(first, again)


def test_unknown_voices_and_bad_parameters_raise_clear_errors(espeak: Espeak) -> None:
    with pytest.raises(TtsError, match="unknown espeak-ng voice 'xx-nowhere'"):
        espeak.synthesize("hello", Voice("xx-nowhere"))
    with pytest.raises(TtsError, match="variant 'f99'"):  # espeak itself would ignore it silently
        espeak.synthesize("hello", Voice("en-us", "f99"))
    with pytest.raises(TtsError, match="rate 20"):
        Voice("en-us", rate=20)
    with pytest.raises(TtsError, match="empty text"):
        espeak.synthesize("  ", Voice())
    with pytest.raises(TtsError, match="not an espeak-ng-data folder"):
        Espeak(data_path=Path(__file__).parent).open()
    with pytest.raises(TtsError, match="not open"):
        Espeak().synthesize("hello", Voice())


def test_at_least_twelve_voices_sound_different(espeak: Espeak) -> None:
    # Prepare
    voices = choose_voices(16, seed=0)
    # Execute
    waves = [espeak.synthesize("the quick brown fox jumps over the lazy dog", v)[0] for v in voices]
    # Assert: distinct speaker ids, waveforms, lengths and spectra
    assert len({speaker_id(v) for v in voices}) == 16
    assert len({(v.name, v.variant) for v in voices}) == 16
    assert len({hashlib.sha256(w.tobytes()).hexdigest() for w in waves}) == 16
    assert len({w.size for w in waves}) >= MIN_VOICES
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in waves) < 32767  # no clipping
    centroids = [_spectral_centroid(w) for w in waves]
    assert max(centroids) > 1.3 * min(centroids)  # not one voice at different speeds


def _spectral_centroid(wave: np.ndarray) -> float:
    power = np.abs(np.fft.rfft(wave.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(wave.size, 1 / 22050)
    return float((power * freqs).sum() / power.sum())


def test_voice_choice_depends_on_the_seed_only() -> None:
    assert choose_voices(16, seed=3) == choose_voices(16, seed=3)
    assert choose_voices(16, seed=3) != choose_voices(16, seed=4)
    assert len({v.variant for v in choose_voices(16, seed=3)}) == 16  # variants used round-robin
    assert speaker_id(Voice("en-us", "f3", 160, 55)) == "syn-en-us-f3-r160-p55"


# ---------------------------------------------------------------------------- sentences


def test_sentences_are_normalised_varied_and_reproducible() -> None:
    # Execute
    sentences = generate_sentences(1200, seed=0)
    # Assert
    assert len(vocabulary(sentences)) >= 500
    assert all(normalize_transcript(s) == s for s in sentences)
    assert sentences == generate_sentences(1200, seed=0)
    assert sentences != generate_sentences(1200, seed=1)
    assert len(set(sentences)) > 1100
    text = " ".join(sentences)
    for phrase in ("set a timer", "o'clock", " of ", "percent", "degrees", "my name is"):
        assert phrase in text, phrase
    assert not any(ch.isdigit() for ch in text)  # numbers spelled out


# ---------------------------------------------------------------------------- corpus builds


def test_build_writes_a_readable_16khz_manifest(small_build: Path) -> None:
    # Execute
    rows = read_manifest(small_build / "manifest.tsv")
    # Assert
    assert len(rows) == SMALL
    speakers = {speaker_id(v) for v in choose_voices(MIN_VOICES, seed=0)}
    assert {r.speaker for r in rows} == speakers
    for row in rows:
        assert normalize_transcript(row.transcript) == row.transcript
        assert row.path.parent.name == row.speaker
        info = sf.info(str(row.path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert abs(info.frames / 16000 - row.duration_s) < 1e-3
        assert 0.5 < row.duration_s < 12


def test_same_seed_rebuilds_byte_for_byte_and_another_seed_differs(
    small_build: Path, tmp_path: Path
) -> None:
    # Execute
    build_synthetic_corpus(tmp_path / "same", num_utterances=SMALL, seed=0, num_voices=MIN_VOICES)
    build_synthetic_corpus(tmp_path / "other", num_utterances=SMALL, seed=1, num_voices=MIN_VOICES)
    # Assert
    reference = _tree_digest(small_build)
    assert _tree_digest(tmp_path / "same") == reference
    other = _tree_digest(tmp_path / "other")
    assert other["manifest.tsv"] != reference["manifest.tsv"]
    wavs = {k: v for k, v in reference.items() if k.endswith(".wav")}
    assert not {v for k, v in other.items() if k.endswith(".wav")} & set(wavs.values())


def test_worker_processes_do_not_change_the_output(
    small_build: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: several chunks so that two spawned workers share the job
    monkeypatch.setattr(synthetic, "_CHUNK", 6)
    # Execute
    with caplog.at_level(logging.INFO, logger="fedspeech"):
        build_synthetic_corpus(
            tmp_path / "par", num_utterances=SMALL, seed=0, num_voices=MIN_VOICES, workers=2
        )
    # Assert: the workers did the job (no fallback) and the files are the same
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert _tree_digest(tmp_path / "par") == _tree_digest(small_build)


def test_a_broken_worker_pool_falls_back_to_this_process(
    small_build: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the pool dies after the first chunk (as without a '__main__' guard)
    class DyingPool(ThreadPoolExecutor):
        def __init__(self, workers: int, mp_context: object) -> None:
            super().__init__(workers)

        def map(self, fn, *iterables, **kwargs):  # type: ignore[no-untyped-def]
            results = super().map(fn, *iterables, **kwargs)
            yield next(results)
            raise BrokenProcessPool("simulated")

    monkeypatch.setattr(synthetic, "_CHUNK", 6)
    monkeypatch.setattr(synthetic, "ProcessPoolExecutor", DyingPool)
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedspeech"):
        _, report = build_synthetic_corpus(
            tmp_path / "c", num_utterances=SMALL, seed=0, num_voices=MIN_VOICES, workers=2
        )
    # Assert
    assert "continuing in this process" in caplog.text
    assert report.kept == SMALL and not report.skipped
    assert _tree_digest(tmp_path / "c") == _tree_digest(small_build)


def test_augmentation_changes_audio_deterministically(small_build: Path, tmp_path: Path) -> None:
    # Execute
    for name in ("aug1", "aug2"):
        build_synthetic_corpus(
            tmp_path / name, num_utterances=SMALL, seed=0, num_voices=MIN_VOICES, augment=True
        )
    # Assert
    clean, aug = _tree_digest(small_build), _tree_digest(tmp_path / "aug1")
    assert aug == _tree_digest(tmp_path / "aug2")
    wavs = [k for k in clean if k.endswith(".wav")]
    assert sorted(wavs) == sorted(k for k in aug if k.endswith(".wav"))
    assert sum(clean[k] != aug[k] for k in wavs) >= SMALL * 0.8
    clean_rows = read_manifest(small_build / "manifest.tsv")
    aug_rows = read_manifest(tmp_path / "aug1" / "manifest.tsv")
    assert [(r.transcript, r.speaker) for r in clean_rows] == [
        (r.transcript, r.speaker) for r in aug_rows
    ]


def test_noise_and_reverb_helpers() -> None:
    rng = np.random.default_rng(0)
    speech = np.sin(np.arange(16000) * 0.05) * np.hanning(16000)  # (16000,)
    for kind, babble in (("white", ()), ("pink", ()), ("babble", (speech[::2],))):
        noise = make_noise(kind, speech.size, rng, babble)
        noisy = add_noise(speech, noise, snr_db=10.0)
        snr = 10 * np.log10(np.mean(speech**2) / np.mean((noisy - speech) ** 2))
        assert abs(snr - 10.0) < 1e-6, kind
    wet = reverberate(speech, rng, 16000)
    assert wet.shape == speech.shape and not np.allclose(wet, speech)
    assert np.isclose(np.mean(wet**2), np.mean(speech**2))
    out1 = augment_waveform(speech, np.random.default_rng(7), 16000, (speech,))
    out2 = augment_waveform(speech, np.random.default_rng(7), 16000, (speech,))
    np.testing.assert_array_equal(out1, out2)
    with pytest.raises(ValueError, match="unknown noise kind"):
        make_noise("brown", 10, rng)


def test_rerun_is_a_noop_and_a_parameter_change_rebuilds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    out = tmp_path / "corpus"
    build_synthetic_corpus(out, num_utterances=SMALL, seed=0, num_voices=MIN_VOICES)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    # Execute: same parameters, with the synthesizer out of reach (the no-op's time:
    # benchmarks/synthetic_build.py)
    def synthesizes(*args: object, **kwargs: object) -> None:
        raise AssertionError("the re-run started the synthesizer")

    with monkeypatch.context() as no_tts:
        no_tts.setattr(synthetic, "Espeak", synthesizes)
        manifest, report = build_synthetic_corpus(
            out, num_utterances=SMALL, seed=0, num_voices=MIN_VOICES
        )
    # Assert: nothing synthesized or rewritten, same answer
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    assert report.kept == SMALL and not report.skipped
    assert manifest == out / "manifest.tsv"

    # Execute: another seed -> rebuilt, old speakers' folders gone
    build_synthetic_corpus(out, num_utterances=SMALL + 2, seed=5, num_voices=MIN_VOICES)
    # Assert
    rows = read_manifest(out / "manifest.tsv")
    assert len(rows) == SMALL + 2
    speaker_dirs = {p.name for p in (out / "wavs").iterdir()}
    assert speaker_dirs == {speaker_id(v) for v in choose_voices(MIN_VOICES, seed=5)}
    info = json.loads((out / "build_info.json").read_text())
    assert info["params"]["seed"] == 5 and info["complete"] and info["kept"] == SMALL + 2

    # Execute: a deleted wav makes the build incomplete -> rebuilt
    rows[0].path.unlink()
    build_synthetic_corpus(out, num_utterances=SMALL + 2, seed=5, num_voices=MIN_VOICES)
    assert rows[0].path.is_file()


def test_failed_utterances_are_skipped_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: synthesis fails for one sentence
    bad = generate_sentences(SMALL, seed=0)[3]
    real = synthetic.render_utterance

    def flaky(tts: Espeak, text: str, *args: object, **kwargs: object) -> np.ndarray:
        if text == bad:
            raise TtsError("simulated engine failure")
        return real(tts, text, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(synthetic, "render_utterance", flaky)
    # Execute
    manifest, report = build_synthetic_corpus(
        tmp_path / "c", num_utterances=SMALL, seed=0, num_voices=MIN_VOICES
    )
    # Assert
    rows = read_manifest(manifest)
    assert report.kept == SMALL - 1 == len(rows)
    assert len(report.skipped) == 1 and "simulated engine failure" in report.skipped[0].reason
    assert bad not in {r.transcript for r in rows}
    # the no-op path returns the same report
    _, again = build_synthetic_corpus(
        tmp_path / "c", num_utterances=SMALL, seed=0, num_voices=MIN_VOICES
    )
    assert again.skipped == report.skipped and again.kept == report.kept


def test_a_process_says_once_that_a_corpus_is_up_to_date(
    small_build: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a process that has announced nothing yet
    monkeypatch.setattr(synthetic, "_ANNOUNCED", set())
    # Execute: a run checks its corpus several times (pre-flight, the server, each client)
    with caplog.at_level(logging.DEBUG, logger="fedspeech"):
        for _ in range(3):
            build_synthetic_corpus(small_build, num_utterances=SMALL, seed=0, num_voices=MIN_VOICES)
    # Assert: announced at INFO once in this process, then only at DEBUG
    levels = [r.levelno for r in caplog.records if "is up to date" in r.getMessage()]
    assert levels == [logging.INFO, logging.DEBUG, logging.DEBUG]


def test_concurrent_builders_of_one_folder_wait_for_each_other(
    small_build: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Execute: e.g. several simulated clients making sure the demo corpus exists
    with caplog.at_level(logging.INFO, logger="fedspeech"), ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(
                lambda _: build_synthetic_corpus(
                    tmp_path / "c", num_utterances=SMALL, seed=0, num_voices=MIN_VOICES
                ),
                range(2),
            )
        )
    # Assert: one built, the other waited and found the finished build
    assert [r[1].kept for r in results] == [SMALL, SMALL]
    assert sum("is up to date" in r.getMessage() for r in caplog.records) == 1
    assert _tree_digest(tmp_path / "c") == _tree_digest(small_build)


def test_refuses_to_overwrite_foreign_data_and_bad_parameters(tmp_path: Path) -> None:
    (tmp_path / "a" / "wavs").mkdir(parents=True)
    (tmp_path / "a" / "wavs" / "mine.wav").write_bytes(b"user data")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.tsv").write_text("user manifest")
    for folder in ("a", "b"):
        with pytest.raises(FileExistsError, match="not made by the synthetic corpus builder"):
            build_synthetic_corpus(tmp_path / folder, num_utterances=SMALL, num_voices=MIN_VOICES)
    assert (tmp_path / "a" / "wavs" / "mine.wav").read_bytes() == b"user data"
    assert (tmp_path / "b" / "manifest.tsv").read_text() == "user manifest"
    with pytest.raises(ValueError, match="num_voices >= 12"):
        build_synthetic_corpus(tmp_path / "x", num_voices=4)


def test_digit_corpus_says_each_digit_word_equally_often(tmp_path: Path) -> None:
    # Execute: a digits build next to the same seed's sentence build
    manifest, report = build_synthetic_corpus(
        tmp_path / "digits", num_utterances=40, num_voices=MIN_VOICES, text="digits", seed=3
    )
    rows = read_manifest(manifest)

    # Assert: one digit word per utterance, each digit 4 times, audio of every voice on disk
    words = [r.transcript for r in rows]
    assert report.kept == 40 and sorted(set(words)) == sorted(DIGIT_WORDS)
    assert all(words.count(w) == 4 for w in DIGIT_WORDS)
    assert len({r.speaker for r in rows}) == MIN_VOICES
    assert all(sf.info(str(r.path)).samplerate == 16_000 for r in rows)
    with pytest.raises(ValueError, match="text must be one of"):
        build_synthetic_corpus(tmp_path / "x", num_utterances=12, text="poems")  # type: ignore[arg-type]
