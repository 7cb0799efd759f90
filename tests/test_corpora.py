"""Corpus builders on layouts made in tmp_path from the real speech in ../shared/data.

Each builder must keep every good item, skip each bad one with a reason naming the file, and
write a manifest whose rows point at the original audio.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedspeech_features.audio import load_audio
from fedspeech_features.corpora.an4 import build_an4
from fedspeech_features.corpora.common import CorpusError, check_utterance, validate_utterance
from fedspeech_features.corpora.commonvoice import build_commonvoice
from fedspeech_features.corpora.folder import build_folder
from fedspeech_features.corpora.fsdd import build_fsdd
from fedspeech_features.corpora.librispeech import build_librispeech
from fedspeech_features.errors import AudioError, SkipReport, TextError
from fedspeech_features.manifest import Utterance, read_manifest

CLIENT_A = "a1" * 64  # Common Voice client ids are 128 hex digits
CLIENT_B = "b2" * 64


# ----------------------------------------------------------------------------- helpers
def _manifest(shared_data: Path, name: str) -> list[Utterance]:
    return read_manifest(shared_data / name / "manifest.tsv")


def _skipped_items(report: SkipReport) -> set[str]:
    return {Path(s.item).name for s in report.skipped}


def _reason_for(report: SkipReport, name: str) -> str:
    reasons = [s.reason for s in report.skipped if Path(s.item).name == name]
    assert len(reasons) == 1, f"{name} skipped {len(reasons)} times: {report.skipped}"
    assert name in reasons[0], "the reason must name the file"
    return reasons[0]


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _write_zero_length_wav(path: Path) -> Path:
    sf.write(path, np.zeros(0, dtype=np.float32), 16_000)  # valid header, 0 frames
    return path


def _write_text_as_wav(path: Path) -> Path:
    path.write_text("this is not audio, just text renamed to .wav\n" * 20)
    return path


# ----------------------------------------------------------------------------- common
def test_check_utterance_keeps_8khz_and_stereo_with_16khz_durations(
    shared_data: Path, tmp_path: Path
) -> None:
    # Prepare: a real 8 kHz FSDD file, and a stereo copy of a real LibriSpeech file
    fsdd = shared_data / "fsdd" / "recordings" / "3_theo_0.wav"
    libri = _manifest(shared_data, "librispeech_samples")[0].path
    mono, sr = sf.read(libri, dtype="float32")
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([mono, 0.5 * mono], axis=1), sr)

    # Execute
    utt8k = check_utterance(fsdd, "Three", "theo")
    utt_st = check_utterance(stereo, "some WORDS", "spk 1")

    # Assert: original files kept, durations of the decoded audio, text normalised
    assert utt8k.path == fsdd and utt8k.transcript == "three"
    assert utt8k.duration_s == pytest.approx(sf.info(fsdd).duration, abs=1e-3)
    assert utt_st.path == stereo and utt_st.speaker == "spk_1"
    assert utt_st.duration_s == pytest.approx(len(mono) / sr, abs=1e-3)


def test_validate_utterance_records_skips_naming_the_file(
    shared_data: Path, tmp_path: Path
) -> None:
    good = shared_data / "fsdd" / "recordings" / "0_george_0.wav"
    report = SkipReport("unit")
    assert validate_utterance(good, "zero", "george", report) is not None
    assert validate_utterance(good, "零", "george", report) is None
    assert validate_utterance(good, " ... ", "george", report) is None
    assert validate_utterance(good, "zero", "   ", report) is None
    text_wav = _write_text_as_wav(tmp_path / "notes.wav")
    assert validate_utterance(text_wav, "zero", "george", report) is None
    assert validate_utterance(good, "zero", "george", report, max_duration_s=0.1) is None
    assert report.kept == 1
    reasons = [s.reason for s in report.skipped]
    assert "零" in reasons[0] and "0_george_0.wav" in reasons[0]
    assert "empty transcript" in reasons[1]
    assert "no speaker id" in reasons[2]
    assert "notes.wav" in reasons[3] and "decode" in reasons[3]
    assert "too long" in reasons[4]
    with pytest.raises(TextError, match=r"0_george_0\.wav"):
        check_utterance(good, "中文", "george")
    with pytest.raises(AudioError, match=r"notes\.wav"):
        check_utterance(text_wav, "zero", "george")


# ----------------------------------------------------------------------------- LibriSpeech
def _librispeech_layout(shared_data: Path, root: Path, n_speakers: int = 3) -> list[Utterance]:
    """root/train-clean-100/<spk>/<chap>/<id>.flac (symlinks) + <spk>-<chap>.trans.txt."""
    utts = _manifest(shared_data, "librispeech_samples")
    counts = Counter(u.speaker for u in utts)
    # the speakers with the most utterances (10 each, several chapters) -> a realistic tree
    speakers = sorted(counts, key=lambda s: (-counts[s], s))[:n_speakers]
    chosen = [u for u in utts if u.speaker in speakers]
    chapters: dict[Path, list[str]] = {}
    for utt in chosen:
        spk, chap, _ = utt.path.stem.split("-")
        folder = root / "train-clean-100" / spk / chap
        folder.mkdir(parents=True, exist_ok=True)
        (folder / utt.path.name).symlink_to(utt.path)
        # LibriSpeech transcripts are upper case
        chapters.setdefault(folder / f"{spk}-{chap}.trans.txt", []).append(
            f"{utt.path.stem} {utt.transcript.upper()}"
        )
    for trans, lines in chapters.items():
        trans.write_text("\n".join(lines) + "\n")
    return chosen


def test_build_librispeech_nested_layout(shared_data: Path, tmp_path: Path) -> None:
    # Prepare
    root = tmp_path / "LibriSpeech"
    chosen = _librispeech_layout(shared_data, root)
    out = tmp_path / "out" / "manifest.tsv"

    # Execute: from the LibriSpeech folder and from the subset folder
    report = build_librispeech(root, out)
    report_subset = build_librispeech(root / "train-clean-100", tmp_path / "subset.tsv")

    # Assert
    assert report.kept == len(chosen) >= 6 and not report.skipped
    assert report_subset.kept == len(chosen)
    rows = read_manifest(out)
    expected = {u.path.name: u for u in chosen}
    assert {r.path.name for r in rows} == set(expected)
    for row in rows:
        ref = expected[row.path.name]
        assert row.transcript == ref.transcript  # lower-cased back, apostrophes kept
        assert row.speaker == ref.speaker == row.path.stem.split("-")[0]
        assert row.duration_s == pytest.approx(ref.duration_s, abs=2e-3)
        assert row.path.is_file()


def test_build_librispeech_skips_missing_truncated_and_orphan_audio(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a good layout, then damage it in three ways
    root = tmp_path / "train-clean-100"
    chosen = _librispeech_layout(shared_data, tmp_path / "ls", n_speakers=2)
    shutil.move(tmp_path / "ls" / "train-clean-100", root)
    chapter = next(root.rglob("*.trans.txt"))
    spk, chap = chapter.name.removesuffix(".trans.txt").split("-")
    with chapter.open("a") as fh:
        fh.write(f"{spk}-{chap}-9999 A LINE WITHOUT AUDIO\n")
    victim = sorted(chapter.parent.glob("*.flac"))[0]
    real = victim.resolve()
    victim.unlink()
    _truncate(real, victim)  # same id, half the bytes
    orphan = chapter.parent / f"{spk}-{chap}-8888.flac"
    shutil.copy(real, orphan)

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedspeech"):
        report = build_librispeech(root, tmp_path / "manifest.tsv")

    # Assert: three skips with clear reasons, every other utterance kept
    assert report.kept == len(chosen) - 1
    assert len(report.skipped) == 3
    line_skips = [s.reason for s in report.skipped if f"{spk}-{chap}-9999" in s.reason]
    assert len(line_skips) == 1
    assert "no audio file" in line_skips[0] and chapter.name in line_skips[0]
    assert "decode" in _reason_for(report, victim.name)
    assert "no transcript line" in _reason_for(report, orphan.name)
    assert len(read_manifest(tmp_path / "manifest.tsv")) == len(chosen) - 1
    assert victim.name in caplog.text and "skipped 3" in caplog.text


def test_build_librispeech_rejects_a_folder_without_transcripts(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"trans\.txt"):
        build_librispeech(tmp_path, tmp_path / "m.tsv")
    with pytest.raises(CorpusError, match="not found"):
        build_librispeech(tmp_path / "missing", tmp_path / "m.tsv")


# ----------------------------------------------------------------------------- Common Voice
def test_build_commonvoice_tsv_and_mp3_clips(shared_data: Path, tmp_path: Path) -> None:
    # Prepare: four real LJSpeech utterances converted to MP3 clips
    corpus = tmp_path / "cv-corpus" / "en"
    clips = corpus / "clips"
    clips.mkdir(parents=True)
    utts = _manifest(shared_data, "ljspeech_mini")[:4]
    for i, utt in enumerate(utts):
        wave, sr = sf.read(utt.path, dtype="float32")
        sf.write(clips / f"common_voice_en_{i}.mp3", wave, sr, format="MP3")
    header = "client_id\tpath\tsentence_id\tsentence\tup_votes\tdown_votes\tage\tgender\tlocale"
    rows = [
        # a quote character inside the sentence: QUOTE_NONE keeps the row intact
        f'{CLIENT_A}\tcommon_voice_en_0.mp3\ts0\t"{utts[0].transcript}," he said.\t2\t0\t\t\ten',
        f"{CLIENT_A}\tcommon_voice_en_1\ts1\t{utts[1].transcript.upper()}\t2\t0\t\t\ten",
        f"{CLIENT_B}\tcommon_voice_en_2.mp3\ts2\t{utts[2].transcript}\t2\t0\tthirties\tmale\ten",
        f"{CLIENT_B}\tcommon_voice_en_3.mp3\ts3\t这是中文\t2\t0\t\t\ten",  # unmappable text
        f"{CLIENT_B}\tcommon_voice_en_404.mp3\ts4\tmissing clip\t2\t0\t\t\ten",
        f"{CLIENT_B}\tcommon_voice_en_2.mp3\ts5\ttoo few fields",
    ]
    tsv = corpus / "validated.tsv"
    tsv.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "manifest.tsv"

    # Execute
    report = build_commonvoice(tsv, out)

    # Assert
    assert report.kept == 3 and len(report.skipped) == 3
    reasons = " | ".join(s.reason for s in report.skipped)
    assert "common_voice_en_3.mp3" in reasons and "这是中文" in reasons
    assert "common_voice_en_404.mp3" in reasons and "validated.tsv:6" in reasons
    assert "validated.tsv:7" in reasons and "fields" in reasons
    manifest = read_manifest(out)
    assert [m.path.name for m in manifest] == [f"common_voice_en_{i}.mp3" for i in range(3)]
    assert manifest[0].transcript == f"{utts[0].transcript} he said"
    assert manifest[1].transcript == utts[1].transcript
    assert [m.speaker for m in manifest] == [CLIENT_A[:16], CLIENT_A[:16], CLIENT_B[:16]]
    for m, ref in zip(manifest, utts, strict=False):
        assert m.duration_s == pytest.approx(ref.duration_s, abs=0.1)  # MP3 adds padding
        assert load_audio(m.path).shape[0] == pytest.approx(m.duration_s * 16_000, abs=16)


def test_build_commonvoice_layout_errors(tmp_path: Path) -> None:
    tsv = tmp_path / "train.tsv"
    with pytest.raises(CorpusError, match="not found"):
        build_commonvoice(tsv, tmp_path / "m.tsv")
    tsv.write_text("path\ttext\nx.mp3\thello\n")
    (tmp_path / "clips").mkdir()
    with pytest.raises(CorpusError, match="client_id, sentence"):
        build_commonvoice(tsv, tmp_path / "m.tsv")
    with pytest.raises(CorpusError, match="clips folder not found"):
        build_commonvoice(tsv, tmp_path / "m.tsv", clips_dir=tmp_path / "nope")


# ----------------------------------------------------------------------------- FSDD
def test_build_fsdd_subset_with_bad_files(shared_data: Path, tmp_path: Path) -> None:
    # Prepare: 12 real recordings, one badly named copy, one text file, one truncated wav
    src = shared_data / "fsdd" / "recordings"
    rec = tmp_path / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    names = [f"{d}_{spk}_{i}.wav" for d in (1, 7) for spk in ("jackson", "theo") for i in (0, 1, 2)]
    for name in names:
        (rec / name).symlink_to(src / name)
    shutil.copy(src / "5_lucas_3.wav", rec / "five-lucas.wav")
    _write_text_as_wav(rec / "4_theo_99.wav")
    _truncate(src / "9_nicolas_4.wav", rec / "9_nicolas_4.wav")
    (rec / "README.txt").write_text("not a recording")

    # Execute: from the dataset folder and from recordings/ itself
    report = build_fsdd(tmp_path / "fsdd", tmp_path / "fsdd" / "manifest.tsv")
    report_rec = build_fsdd(rec, tmp_path / "rec.tsv")

    # Assert
    assert report.kept == report_rec.kept == len(names)
    assert _skipped_items(report) == {"five-lucas.wav", "4_theo_99.wav", "9_nicolas_4.wav"}
    assert "{digit}_{speaker}_{index}" in _reason_for(report, "five-lucas.wav")
    assert "truncated" in _reason_for(report, "9_nicolas_4.wav")
    rows = read_manifest(tmp_path / "fsdd" / "manifest.tsv")
    assert {(r.path.name.split("_")[0], r.transcript) for r in rows} == {
        ("1", "one"),
        ("7", "seven"),
    }
    assert {r.speaker for r in rows} == {"jackson", "theo"}
    text = (tmp_path / "fsdd" / "manifest.tsv").read_text()
    assert "\nrecordings/1_jackson_0.wav\tone\tjackson\t" in text  # relative, original file


def test_build_fsdd_full_real_folder(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "fsdd.tsv"
    report = build_fsdd(shared_data / "fsdd", out)
    rows = read_manifest(out)
    assert report.kept == len(rows) == 3000 and not report.skipped
    assert sorted({r.speaker for r in rows}) == [
        "george",
        "jackson",
        "lucas",
        "nicolas",
        "theo",
        "yweweler",
    ]
    # resolved: ../shared may be a symlink, which read_manifest resolves and the builder keeps
    reference = {u.path.resolve(): u for u in _manifest(shared_data, "fsdd")}
    for row in rows:
        ref = reference[row.path.resolve()]
        assert (row.transcript, row.speaker) == (ref.transcript, ref.speaker)
        assert row.duration_s == pytest.approx(ref.duration_s, abs=2e-3)


# ----------------------------------------------------------------------------- folder
def test_build_folder_with_txt_transcripts_and_bad_inputs(
    shared_data: Path, tmp_path: Path
) -> None:
    # Prepare: two speaker folders of real audio (flac, 8 kHz wav, stereo wav) + bad inputs
    root = tmp_path / "corpus"
    (root / "alice").mkdir(parents=True)
    (root / "bob" / "session1").mkdir(parents=True)
    libri = _manifest(shared_data, "librispeech_samples")[:2]
    shutil.copy(libri[0].path, root / "alice" / "one.flac")
    (root / "alice" / "one.txt").write_text(libri[0].transcript.upper() + "\n")
    shutil.copy(shared_data / "fsdd" / "recordings" / "2_theo_0.wav", root / "alice" / "two.wav")
    (root / "alice" / "two.txt").write_text("Two.")
    mono, sr = sf.read(libri[1].path, dtype="float32")
    sf.write(root / "bob" / "session1" / "stereo.wav", np.stack([mono, mono], axis=1), sr)
    (root / "bob" / "session1" / "stereo.txt").write_text("\ufeff" + libri[1].transcript)
    shutil.copy(libri[1].path, root / "bob" / "no_text.flac")
    _write_zero_length_wav(root / "bob" / "empty.wav")
    (root / "bob" / "empty.txt").write_text("nothing here")
    _write_text_as_wav(root / "bob" / "fake.wav")
    (root / "bob" / "fake.txt").write_text("fake")
    shutil.copy(libri[0].path, root / "bob" / "chinese.flac")
    (root / "bob" / "chinese.txt").write_text("你好世界")
    _truncate(libri[0].path, root / "bob" / "half.flac")
    (root / "bob" / "half.txt").write_text("half")
    out = tmp_path / "manifest.tsv"

    # Execute
    report = build_folder(root, out)

    # Assert: 3 kept (8 kHz and stereo included), each bad file skipped and named
    assert report.kept == 3
    assert _skipped_items(report) == {
        "no_text.flac",
        "empty.wav",
        "fake.wav",
        "chinese.flac",
        "half.flac",
    }
    assert "no transcript file no_text.txt" in _reason_for(report, "no_text.flac")
    assert "empty audio" in _reason_for(report, "empty.wav")
    assert "decode" in _reason_for(report, "fake.wav")
    assert "你好世界" in _reason_for(report, "chinese.flac")
    assert "decode" in _reason_for(report, "half.flac")
    rows = {r.path.name: r for r in read_manifest(out)}
    assert set(rows) == {"one.flac", "two.wav", "stereo.wav"}
    assert rows["one.flac"].transcript == libri[0].transcript
    assert rows["one.flac"].speaker == "alice"
    assert rows["two.wav"].transcript == "two"
    assert rows["two.wav"].duration_s == pytest.approx(
        sf.info(root / "alice" / "two.wav").duration, abs=1e-3
    )
    assert rows["stereo.wav"].speaker == "session1"
    assert rows["stereo.wav"].transcript == libri[1].transcript
    assert rows["stereo.wav"].duration_s == pytest.approx(libri[1].duration_s, abs=2e-3)
    # The 8 kHz file is kept as is; features get it at 16 kHz
    assert sf.info(rows["two.wav"].path).samplerate == 8000
    n_8k = sf.info(rows["two.wav"].path).frames
    assert load_audio(rows["two.wav"].path).shape[0] == pytest.approx(2 * n_8k, abs=2)

    # A single given speaker overrides folder names
    report_one = build_folder(root, tmp_path / "one.tsv", speaker="carol")
    assert report_one.kept == 3
    assert {r.speaker for r in read_manifest(tmp_path / "one.tsv")} == {"carol"}


def test_build_folder_duration_filters(shared_data: Path, tmp_path: Path) -> None:
    for name in ("0_george_0.wav", "0_george_1.wav"):  # 0.30 s and 0.59 s
        shutil.copy(shared_data / "fsdd" / "recordings" / name, tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text("zero")
    report = build_folder(tmp_path, tmp_path / "out" / "m.tsv", min_duration_s=0.4)
    assert report.kept == 1 and "too short" in _reason_for(report, "0_george_0.wav")
    report = build_folder(tmp_path, tmp_path / "out" / "m.tsv", max_duration_s=0.4)
    assert report.kept == 1 and "too long" in _reason_for(report, "0_george_1.wav")


def test_build_folder_with_nothing_usable_writes_no_manifest_and_removes_a_stale_one(
    tmp_path: Path,
) -> None:
    # Prepare: one non-audio "wav"; a manifest left by an earlier build
    _write_text_as_wav(tmp_path / "a.wav")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "m.tsv").write_text("path\ttranscript\tspeaker\tduration_s\nold.wav\tx\ts\t1.0\n")
    # Execute
    report = build_folder(tmp_path, tmp_path / "m.tsv")
    # Assert: the bad file is named, and no manifest (empty or stale) is left to train on
    assert report.kept == 0 and len(report.skipped) == 1
    assert not (tmp_path / "m.tsv").exists()


def test_data_folder_cli_writes_relative_paths_beside_the_audio(
    shared_data: Path, tmp_path: Path
) -> None:
    from fedspeech.app.cli import main as cli_main

    # Prepare: a folder of one real recording and its transcript
    shutil.copy(shared_data / "fsdd" / "recordings" / "2_theo_0.wav", tmp_path / "two.wav")
    (tmp_path / "two.txt").write_text("two")
    # Execute: without --out
    rc = cli_main(["data", "folder", str(tmp_path)])
    # Assert: ROOT/manifest.tsv with paths relative to it (the README's layout)
    lines = (tmp_path / "manifest.tsv").read_text().splitlines()
    assert rc == 0 and lines[1].startswith("two.wav\ttwo\t")


def _an4_tree(shared_data: Path, root: Path) -> dict[str, list[Utterance]]:
    """The CMU AN4 layout (etc/*.transcription, wav/*/<speaker>/<id>.wav) holding real AN4
    audio: 2 utterances of 2 train speakers and of 1 test speaker, from the shared copy."""
    rows = read_manifest(shared_data / "an4" / "manifest.tsv")
    chosen: dict[str, list[Utterance]] = {"train": [], "test": []}
    for split, speakers in (("train", ("fash", "fbbh")), ("test", ("fcaw",))):
        for speaker in speakers:
            chosen[split] += [r for r in rows if r.speaker == speaker][:2]
    for split, (name, folder) in (
        ("train", ("an4_train.transcription", "an4_clstk")),
        ("test", ("an4_test.transcription", "an4test_clstk")),
    ):
        lines = []
        for row in chosen[split]:
            utt_id = row.path.name.removesuffix(".opus")
            target = root / "wav" / folder / row.speaker / f"{utt_id}.wav"
            target.parent.mkdir(parents=True, exist_ok=True)
            wave, rate = sf.read(row.path)
            sf.write(target, wave, rate)
            lines.append(f"<s> {row.transcript.upper()} </s> ({utt_id})")
        (root / "etc").mkdir(exist_ok=True)
        (root / "etc" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return chosen


def test_build_an4_keeps_the_official_split_and_names_bad_lines(
    shared_data: Path, tmp_path: Path
) -> None:
    from fedspeech.app.cli import main

    # Prepare: real AN4 audio in the CMU layout, plus a line without audio and a malformed one
    root = tmp_path / "an4"
    chosen = _an4_tree(shared_data, root)
    train_file = root / "etc" / "an4_train.transcription"
    with train_file.open("a", encoding="utf-8") as fh:
        fh.write("<s> ERASE C Q </s> (an999-fash-b)\nNO PARENTHESES HERE\n")
    # Execute: the CLI, once per split
    rc_train = main(["data", "an4", str(root), "--manifest", str(tmp_path / "train.tsv")])
    rc_test = main(
        ["data", "an4", str(root), "--split", "test", "--manifest", str(tmp_path / "test.tsv")]
    )
    train, test = read_manifest(tmp_path / "train.tsv"), read_manifest(tmp_path / "test.tsv")
    # Assert: the official split, speakers from the ids, lower-case transcripts
    assert rc_train == 0 and rc_test == 0
    assert {u.speaker for u in train} == {"fash", "fbbh"} and {u.speaker for u in test} == {"fcaw"}
    assert sorted(u.transcript for u in train) == sorted(r.transcript for r in chosen["train"])
    assert all(u.path.suffix == ".wav" and u.duration_s > 0.5 for u in train + test)
    report = build_an4(root, tmp_path / "again.tsv")
    reasons = " ".join(s.reason for s in report.skipped)
    assert report.kept == 4 and len(report.skipped) == 2
    assert "an999-fash-b" in reasons and "NO PARENTHESES HERE" in reasons
    with pytest.raises(CorpusError, match=r"an4_train\.transcription"):
        build_an4(tmp_path, tmp_path / "x.tsv")
