"""``fedspeech transcribe`` / ``evaluate``: chunking, bad input, output formats, error rates.

The model is an untrained tiny one (its words are junk): these tests check robustness, times and
formats, not accuracy.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf

from fedspeech.app.cli import main
from fedspeech.evaluate import error_rates
from fedspeech.lm import read_arpa_vocab, write_arpa
from fedspeech.modeldir import load_model_dir
from fedspeech.transcribe import Transcriber, find_audio_files, plan_chunks
from fedspeech_features.audio import load_audio
from tests.test_modeldir import make_model_dir

SR = 16_000
# Three short LibriSpeech utterances (1.6-2.0 s) from ../shared/data/librispeech_samples.
SPEECH = {
    "easy going": "audio/train-clean-100/1447-130550-0000.flac",
    "the seventh chapter": "audio/train-clean-100/403-126855-0000.flac",
    "northanger abbey": "audio/train-clean-100/19-198-0000.flac",
}
SRT_BLOCK = re.compile(
    r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)\n(.+)\n"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def speech(shared_data: Path) -> list[Path]:
    return [shared_data / "librispeech_samples" / p for p in SPEECH.values()]


def _wav(path: Path, wave: np.ndarray, sr: int = SR) -> Path:
    sf.write(path, wave, sr, subtype="PCM_16")
    return path


def _tiled(speech: list[Path], seconds: float, gap_s: float = 1.0) -> np.ndarray:
    """Real speech clips separated by ``gap_s`` of digital silence, repeated to ``seconds``."""
    gap = np.zeros(int(gap_s * SR), dtype=np.float32)
    unit = np.concatenate([part for p in speech for part in (load_audio(p), gap)])
    reps = int(np.ceil(seconds * SR / len(unit)))
    return np.tile(unit, reps)[: int(seconds * SR)]


# ---------------------------------------------------------------------- chunking
def test_long_audio_is_cut_in_pauses(speech: list[Path]) -> None:
    # Prepare: 60 s of speech, a 1 s pause after every clip
    wave = _tiled(speech, 60.0)

    # Execute
    chunks = plan_chunks(wave, SR, max_chunk_s=10.0)

    # Assert: contiguous cover, each at most 10 s, every cut inside a pause (digital zeros)
    assert chunks[0].start == 0 and chunks[-1].end == len(wave)
    assert all(a.end == b.start for a, b in itertools.pairwise(chunks))
    assert all(c.end - c.start <= 10 * SR for c in chunks) and len(chunks) >= 6
    for c in chunks[1:]:
        assert not np.any(wave[c.start - 800 : c.start + 800]), c.start / SR  # +-50 ms silent
    assert not any(c.silent for c in chunks)


def test_chunks_of_short_silent_and_just_too_long_audio() -> None:
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(SR * 3)).astype(np.float32)
    assert (
        plan_chunks(noise, SR) == [plan_chunks(noise, SR)[0]] and len(plan_chunks(noise, SR)) == 1
    )
    assert all(c.silent for c in plan_chunks(np.zeros(SR * 45, dtype=np.float32), SR, 20.0))
    # 20.5 s of noise with no pause: the last chunk still gets at least 1 s
    chunks = plan_chunks(np.tile(noise, 7)[: int(20.5 * SR)], SR, 20.0)
    assert len(chunks) == 2 and chunks[1].end - chunks[1].start >= SR


def test_word_times_are_offset_by_the_chunk_start(model_dir: Path, speech: list[Path]) -> None:
    # Prepare: 25 s of silence, then 2 s of speech; the silent first chunk is not decoded
    wave = np.concatenate([np.zeros(25 * SR, dtype=np.float32), load_audio(speech[0])])
    transcriber = Transcriber(load_model_dir(model_dir), max_chunk_s=20.0)

    # Execute
    hyp = transcriber.transcribe_wave(wave)

    # Assert: the (junk) words of the untrained model all lie in the speech chunk
    assert hyp.words, "an untrained model emits junk characters on speech"
    assert all(20.0 <= w.start_s <= w.end_s <= len(wave) / SR for w in hyp.words)


def test_ten_minute_file_is_transcribed_in_bounded_chunks(
    model_dir: Path, speech: list[Path], tmp_path: Path
) -> None:
    # Prepare: a 10-minute WAV of real speech and pauses
    path = _wav(tmp_path / "long.wav", _tiled(speech, 600.0))
    transcriber = Transcriber(load_model_dir(model_dir))

    # Execute (its speed: benchmarks/transcribe_rtf.py, "10-minute file")
    (result,) = transcriber.transcribe_files([path])

    # Assert: whole duration covered, words in order
    assert result.error is None and result.hypothesis is not None
    assert result.duration_s == pytest.approx(600.0)
    starts = [w.start_s for w in result.hypothesis.words]
    assert starts == sorted(starts) and starts[0] >= 0 and starts[-1] < 600.0
    assert max(w.start_s for w in result.hypothesis.words) > 580.0  # the last chunk was decoded


# ---------------------------------------------------------------------- the CLI
def test_batch_with_a_corrupt_file_transcribes_the_rest(
    model_dir: Path,
    speech: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 10)

    # Execute
    rc = main(
        ["transcribe", "--model", str(model_dir), str(speech[0]), str(corrupt), str(speech[1])]
    )

    # Assert: two path<TAB>text lines, the bad file named in an error, and a non-zero exit
    # (scripts must learn that a file is missing from the output)
    out = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert [line.split("\t")[0] for line in out] == [str(speech[0]), str(speech[1])]
    assert any("corrupt.wav" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    assert "transcribed 2 of 3 files" in caplog.text and "1 failed" in caplog.text


def test_one_file_gives_the_same_line_format_as_several(
    model_dir: Path, speech: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    assert main(["transcribe", "--model", str(model_dir), str(speech[0])]) == 0
    one = capsys.readouterr().out.splitlines()
    assert main(["transcribe", "--model", str(model_dir), str(speech[0]), str(speech[1])]) == 0
    two = capsys.readouterr().out.splitlines()
    # Assert
    assert len(one) == 1 and one[0].split("\t")[0] == str(speech[0])
    assert one[0] == two[0]


@pytest.mark.parametrize("value", ["0", "-3", "0.5", "nan", "ten"])
def test_a_max_chunk_below_one_second_is_refused(
    model_dir: Path, speech: list[Path], value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["transcribe", "--model", str(model_dir), str(speech[0]), "--max-chunk", value])
    assert stop.value.code == 2 and "--max-chunk" in capsys.readouterr().err


def test_silence_short_clips_and_folders_as_json(
    model_dir: Path, speech: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a folder (recursive) with silence, a 0.05 s clip, a 0.01 s clip, speech, a text file
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    _wav(folder / "silence.wav", np.zeros(3 * SR, dtype=np.float32))
    clip = load_audio(speech[0])
    _wav(folder / "short.wav", clip[SR // 2 : SR // 2 + int(0.05 * SR)])
    _wav(folder / "tiny.wav", clip[SR // 2 : SR // 2 + int(0.01 * SR)])
    sf.write(folder / "sub" / "speech.flac", clip, SR)
    (folder / "notes.txt").write_text("not audio")

    # Execute
    rc = main(["transcribe", "--model", str(model_dir), str(folder), "--format", "json"])

    # Assert
    results = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert rc == 1  # tiny.wav failed
    assert sorted(results) == ["short.wav", "silence.wav", "speech.flac", "tiny.wav"]
    assert results["silence.wav"]["text"] == "" and results["silence.wav"]["words"] == []
    assert results["silence.wav"]["confidence"] is None  # nothing decoded: no confidence
    assert results["short.wav"]["duration_s"] == pytest.approx(0.05)
    assert (
        "too short" in results["tiny.wav"]["error"] and "tiny.wav" in results["tiny.wav"]["error"]
    )
    words = results["speech.flac"]["words"]
    assert words and all(0 <= w["start"] <= w["end"] <= 2.0 for w in words)
    assert all(0 <= w["confidence"] <= 1 for w in words)
    assert results["speech.flac"]["text"] == " ".join(w["word"] for w in words)


def test_srt_output(
    model_dir: Path, speech: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # one file: SRT on stdout
    long = _wav(tmp_path / "long.wav", _tiled(speech, 30.0))
    assert main(["transcribe", "--model", str(model_dir), str(long), "--format", "srt"]) == 0
    blocks = SRT_BLOCK.findall(capsys.readouterr().out)
    assert [int(b[0]) for b in blocks] == list(range(1, len(blocks) + 1)) and len(blocks) > 3
    for b in blocks:
        h1, m1, s1, ms1, h2, m2, s2, ms2 = (int(x) for x in b[1:9])
        start, end = h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000
        line = b[9]
        assert start <= end <= 30.0
        assert " " not in line or (len(line) <= 42 and end - start <= 7.0)  # one junk word may not

    # several files: one .srt each in --out DIR; without --out it is a usage error
    args = ["transcribe", "--model", str(model_dir), *map(str, speech), "--format", "srt"]
    assert main(args) == 2
    assert main([*args, "--output", str(tmp_path / "subs")]) == 0
    assert sorted(p.name for p in (tmp_path / "subs").iterdir()) == [
        "1447-130550-0000.srt", "19-198-0000.srt", "403-126855-0000.srt"
    ]  # fmt: skip


def test_failures_and_bad_model_dirs_exit_non_zero(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "bad.wav").write_bytes(b"nothing")
    (tmp_path / "empty").mkdir()
    assert main(["transcribe", "--model", str(model_dir), str(tmp_path / "bad.wav")]) == 1
    assert main(["transcribe", "--model", str(model_dir), str(tmp_path / "missing.wav")]) == 1
    assert "missing.wav: file not found" in caplog.text
    assert main(["transcribe", "--model", str(model_dir), str(tmp_path / "empty")]) == 2
    assert "no audio files" in caplog.text
    assert main(["transcribe", "--model", str(tmp_path), str(tmp_path / "bad.wav")]) == 2
    assert "missing config.json, model.safetensors" in caplog.text


def test_transcribe_decodes_with_the_models_tuned_blank_bias_unless_told(
    speech: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the same weights without, and with the largest blank bias in their provenance
    plain = make_model_dir(tmp_path / "plain")
    tuned = make_model_dir(tmp_path / "tuned", decoding={"blank_bias": 10.0, "tuned_on": "dev"})

    def text(*args: str) -> str:
        assert main(["transcribe", *args, str(speech[0])]) == 0
        return capsys.readouterr().out.rstrip("\n").split("\t")[1]

    # Execute / Assert: by default the tuned model decodes (almost) every frame as blank
    assert text("--model", str(plain)) != ""
    assert len(text("--model", str(tuned))) < len(text("--model", str(plain)))
    # --blank-bias overrides the model's value, both ways
    assert text("--model", str(tuned), "--blank-bias", "0") == text("--model", str(plain))
    assert text("--model", str(plain), "--blank-bias", "10") == text("--model", str(tuned))
    # beam search ignores the model's greedy setting, and refuses an explicit one
    assert main(["transcribe", "--model", str(tuned), "--beam", "4", str(speech[0])]) == 0
    capsys.readouterr()
    args = ["transcribe", "--model", str(plain), "--beam", "4", "--blank-bias", "1"]
    assert main([*args, str(speech[0])]) == 2


def test_beam_search_with_an_arpa_lm_outputs_lm_words(
    model_dir: Path, speech: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lm = write_arpa(list(SPEECH), tmp_path / "lm.arpa", order=2)
    out_file = tmp_path / "out.txt"

    rc = main(
        ["transcribe", "--model", str(model_dir), str(speech[0]), "--beam", "8", "--lm", str(lm),
         "--output", str(out_file)]
    )  # fmt: skip

    assert rc == 0 and capsys.readouterr().out == ""
    path, text = out_file.read_text().rstrip("\n").split("\t")
    assert path == str(speech[0]) and set(text.split()) <= set(read_arpa_vocab(lm))


# ---------------------------------------------------------------------- evaluate
def test_error_rates_are_jiwer_corpus_rates() -> None:
    refs, hyps = ["the cat sat", "a dog"], ["the cat sad", ""]
    # WER (1 sub + 2 del) / 5 words; CER (1 sub + 5 del, spaces count) / 16 characters
    assert error_rates(refs, hyps) == (0.6, 0.375)
    assert error_rates(refs, hyps) == (jiwer.wer(refs, hyps), jiwer.cer(refs, hyps))
    assert error_rates(refs, refs) == (0.0, 0.0)
    with pytest.raises(ValueError, match="empty reference"):
        error_rates([""], ["x"])


def test_evaluate_counts_scored_and_skipped(
    model_dir: Path,
    shared_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: two good rows, a missing file, an unspellable and an empty reference
    root = shared_data / "librispeech_samples"
    rows = [
        f"{root / SPEECH['easy going']}\tEasy going!\ts1\t1.6",
        f"{root / SPEECH['northanger abbey']}\tnorthanger abbey\ts2\t2.0",
        f"{tmp_path / 'gone.wav'}\thello\ts3\t1.0",
        f"{root / SPEECH['the seventh chapter']}\t日本語\ts4\t1.9",
        f"{root / SPEECH['the seventh chapter']}\t \ts4\t1.9",
    ]
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("path\ttranscript\tspeaker\tduration_s\n" + "\n".join(rows) + "\n")
    base = ["evaluate", "--model", str(model_dir), "--manifest", str(manifest)]

    # Execute
    rc_text = main(base)
    text = capsys.readouterr().out
    rc_json = main([*base, "--json"])
    result = json.loads(capsys.readouterr().out)

    # Assert
    assert rc_text == rc_json == 0
    assert re.search(r"WER\s+\d+\.\d\d%", text) and re.search(r"CER\s+\d+\.\d\d%", text)
    assert "scored   2 utterances" in text and "skipped  3 utterances" in text
    assert result["scored"] == 2 and result["skipped"] == 3
    assert result["wer"] >= 0.5 and result["cer"] > 0  # untrained: mostly wrong
    assert sorted(Path(s["path"]).name for s in result["skipped_items"]) == [
        "403-126855-0000.flac", "403-126855-0000.flac", "gone.wav"
    ]  # fmt: skip
    assert "gone.wav" in caplog.text


def test_find_audio_files_keeps_named_files_and_searches_folders(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.WAV", "a/b/y.flac", "a/z.txt"):
        (tmp_path / name).write_bytes(b"")
    found = find_audio_files([tmp_path / "a", tmp_path / "named.txt"])
    assert found == [tmp_path / "a/b/y.flac", tmp_path / "a/x.WAV", tmp_path / "named.txt"]
