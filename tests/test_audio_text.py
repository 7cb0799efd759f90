"""fedspeech_features.audio, .text and .manifest: decoding, normalisation, the manifest TSV contract."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from fedspeech_features.audio import audio_duration, load_audio, load_many
from fedspeech_features.errors import AudioError, ManifestError, TextError
from fedspeech_features.manifest import MANIFEST_COLUMNS, Utterance, read_manifest, write_manifest
from fedspeech_features.text import BLANK, DEFAULT_ALPHABET, CharTokenizer, normalize_transcript

HEADER = "\t".join(MANIFEST_COLUMNS) + "\n"


@pytest.fixture(scope="module")
def libri_flac(shared_data: Path) -> Path:
    return read_manifest(shared_data / "librispeech_samples" / "manifest.tsv")[0].path


@pytest.fixture(scope="module")
def fsdd_wav(shared_data: Path) -> Path:
    return shared_data / "fsdd" / "recordings" / "3_jackson_0.wav"


# ----------------------------------------------------------------------------- audio
def test_load_audio_resamples_8khz_to_16khz(fsdd_wav: Path) -> None:
    native, sr = sf.read(fsdd_wav, dtype="float32")
    wave = load_audio(fsdd_wav)
    assert sr == 8000 and wave.dtype == np.float32 and wave.ndim == 1
    assert wave.shape[0] == pytest.approx(2 * native.shape[0], abs=2)
    # Same signal, not just the same length: the energy survives resampling
    assert np.sqrt(np.mean(wave**2)) == pytest.approx(np.sqrt(np.mean(native**2)), rel=0.05)
    assert audio_duration(fsdd_wav) == pytest.approx(wave.shape[0] / 16_000, abs=1e-3)


def test_load_audio_mixes_stereo_down(libri_flac: Path, tmp_path: Path) -> None:
    mono, sr = sf.read(libri_flac, dtype="float32")
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([mono, 0.5 * mono], axis=1), sr, subtype="FLOAT")
    wave = load_audio(stereo)
    assert sr == 16_000 and wave.shape == mono.shape
    np.testing.assert_allclose(wave, 0.75 * mono, atol=1e-6)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda src, dst: dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2]), "decode"),
        (lambda src, dst: dst.write_text("plain text, not audio\n" * 10), "decode"),
        (lambda src, dst: dst.write_bytes(b""), "decode"),
    ],
    ids=["truncated-flac", "text-file", "zero-bytes"],
)
def test_load_audio_rejects_corrupt_files_naming_them(
    libri_flac: Path, tmp_path: Path, make: object, message: str
) -> None:
    bad = tmp_path / "bad_file.flac"
    make(libri_flac, bad)  # type: ignore[operator]
    with pytest.raises(AudioError, match=message) as info:
        load_audio(bad)
    assert str(bad) in str(info.value)


def test_load_audio_rejects_empty_truncated_short_and_nan_wavs(
    libri_flac: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16_000)
    with pytest.raises(AudioError, match=r"empty\.wav: empty audio"):
        load_audio(empty)
    with pytest.raises(AudioError, match=r"empty\.wav: empty audio"):
        audio_duration(empty)

    full = tmp_path / "full.wav"
    sf.write(full, sf.read(libri_flac, dtype="float32")[0], 16_000)
    half = tmp_path / "half.wav"
    half.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(AudioError, match=r"half\.wav: truncated WAV"):
        load_audio(half)
    assert load_audio(full).shape[0] == sf.info(full).frames  # the complete file is fine

    short = tmp_path / "short.wav"
    sf.write(short, np.full(100, 0.1, np.float32), 16_000)  # 6 ms < one 25 ms window
    with pytest.raises(AudioError, match="too short"):
        load_audio(short)
    with pytest.raises(AudioError, match="too long"):
        load_audio(full, max_duration_s=1.0)

    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(8000, np.nan, np.float32), 16_000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        load_audio(nan)


def test_load_audio_scales_float_audio_above_full_scale(tmp_path: Path) -> None:
    loud = tmp_path / "loud.wav"
    sf.write(loud, np.linspace(-4, 2, 16_000, dtype=np.float32), 16_000, subtype="FLOAT")
    wave = load_audio(loud)
    assert float(np.abs(wave).max()) == pytest.approx(1.0)
    assert wave[0] == pytest.approx(-1.0) and wave[-1] == pytest.approx(0.5)


def test_load_many_keeps_good_files_and_counts_bad_ones(fsdd_wav: Path, tmp_path: Path) -> None:
    bad = tmp_path / "noise.wav"
    bad.write_text("nope")
    loaded, report = load_many([fsdd_wav, bad, fsdd_wav])
    assert [p for p, _ in loaded] == [fsdd_wav, fsdd_wav]
    assert report.kept == 2 and [s.item for s in report.skipped] == [str(bad)]


# ----------------------------------------------------------------------------- text
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("It's 3 o'clock, Zoë!", "it's three o'clock zoe"),
        ("HELLO   World", "hello world"),
        ("room 42", "room forty two"),
        ("10,000 people", "ten thousand people"),
        ("2.05 km", "two point zero five km"),
        ("in 1999 and 2024", "in nineteen ninety nine and twenty twenty four"),
        ("the 21st century, the 3rd man", "the twenty first century the third man"),
        ("4stars", "four stars"),
        ("50% off & more", "fifty percent off and more"),
        ('Well... (yes) - no; "maybe"?', "well yes no maybe"),
        ("'quoted' dogs' toys don't", "quoted dogs toys don't"),
        ("rock \u2019n\u2019 roll it\u2019s", "rock n roll it's"),  # quotes vs apostrophe
        ("café naïve Ångström", "cafe naive angstrom"),
        ("Straße, Œuvre, Ørsted", "strasse oeuvre orsted"),
        ("  ", ""),
    ],
)
def test_normalize_transcript(raw: str, expected: str) -> None:
    assert normalize_transcript(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["你好 world", "привет", "emoji 🙂", "9" * 400, "1" * 5000],
    ids=["chinese", "cyrillic", "emoji", "huge-number", "over-int-digit-limit"],
)
def test_normalize_transcript_rejects_unmappable_text(raw: str) -> None:
    with pytest.raises(TextError) as info:
        normalize_transcript(raw)
    assert "cannot" in str(info.value)


def test_normalize_transcript_names_the_bad_characters() -> None:
    with pytest.raises(TextError, match="'中文'"):
        normalize_transcript("hello 中文")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abcxyz ABC'.,!?-0123456789%&éü\u2019", max_size=40))
def test_normalize_transcript_output_is_in_the_alphabet_and_idempotent(raw: str) -> None:
    out = normalize_transcript(raw)
    assert set(out) <= set(DEFAULT_ALPHABET[1:])
    assert out == out.strip() and "  " not in out
    assert normalize_transcript(out) == out


def test_char_tokenizer_round_trip_and_blank() -> None:
    tok = CharTokenizer()
    assert tok.blank_id == 0 and tok.alphabet[0] == BLANK
    assert tok.vocab_size == 29
    ids = tok.encode("it's a test")
    assert 0 not in ids and ids[:3] == [11, 22, 2]
    assert tok.decode(ids) == "it's a test"
    assert tok.decode([0, *ids, 0]) == "it's a test"  # blanks dropped
    assert CharTokenizer.from_dict(tok.to_dict()).alphabet == tok.alphabet


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz' ", min_size=1).filter(str.strip))
def test_char_tokenizer_round_trips_any_alphabet_text(text: str) -> None:
    tok = CharTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_char_tokenizer_errors() -> None:
    tok = CharTokenizer()
    with pytest.raises(TextError, match="empty"):
        tok.encode("   ")
    with pytest.raises(TextError, match="'Q'"):
        tok.encode("Quiet")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([3, -1])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([29])
    with pytest.raises(ValueError, match="blank"):
        CharTokenizer(["a", "b"])
    with pytest.raises(ValueError, match="duplicate"):
        CharTokenizer([BLANK, "a", "a"])


# ----------------------------------------------------------------------------- manifest
def test_manifest_round_trip_relative_and_absolute_paths(tmp_path: Path) -> None:
    inside = tmp_path / "data" / "audio" / "a.wav"
    outside = tmp_path / "elsewhere" / "b.flac"
    for p in (inside, outside):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    utts = [
        Utterance(inside, "hello world", "spk1", 1.25),
        Utterance(outside, "it's me", "spk2", 0.5),
    ]
    manifest = tmp_path / "data" / "manifest.tsv"
    assert write_manifest(manifest, utts) == 2
    lines = manifest.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "path\ttranscript\tspeaker\tduration_s"
    assert lines[1] == "audio/a.wav\thello world\tspk1\t1.250"
    assert lines[2].startswith(str(outside) + "\t")
    assert read_manifest(manifest) == utts
    assert not list(manifest.parent.glob("*.tmp"))


def test_two_writers_of_one_manifest_do_not_clash(tmp_path: Path) -> None:
    # Prepare: a second write of the same manifest starts while the first is still writing
    # (what two recipe processes preparing the same folds do)
    manifest = tmp_path / "manifest.tsv"
    first = [Utterance(tmp_path / "a.wav", "first", "s1", 1.0)]
    second = [Utterance(tmp_path / "b.wav", "second", "s2", 2.0)]

    def slow_rows() -> Iterator[Utterance]:
        write_manifest(manifest, second)  # the other writer, done in the middle of this one
        yield from first

    # Execute: both finish (with a shared temp name the first one's rename would fail)
    assert write_manifest(manifest, slow_rows()) == 1
    # Assert: the last one to finish wins whole; no temp file is left; others can read it
    assert read_manifest(manifest) == first
    assert not list(tmp_path.glob("*.tmp"))
    assert manifest.stat().st_mode & 0o777 == 0o644


def test_manifest_keeps_symlinked_audio_relative(fsdd_wav: Path, tmp_path: Path) -> None:
    link = tmp_path / "clips" / "x.wav"
    link.parent.mkdir()
    link.symlink_to(fsdd_wav)
    write_manifest(tmp_path / "manifest.tsv", [Utterance(link, "three", "jackson", 0.4)])
    assert "\nclips/x.wav\t" in (tmp_path / "manifest.tsv").read_text()
    assert read_manifest(tmp_path / "manifest.tsv")[0].path == link


def test_write_manifest_rejects_tabs_and_leaves_nothing_behind(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.tsv"
    bad = [
        Utterance(tmp_path / "a.wav", "ok", "s", 1.0),
        Utterance(tmp_path / "b.wav", "a\tb", "s", 1),
    ]
    with pytest.raises(ManifestError, match="tab or newline"):
        write_manifest(manifest, bad)
    assert not manifest.exists() and not list(tmp_path.iterdir())


def test_read_manifest_bad_header_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("file\ttext\nx.wav\thello\n")
    with pytest.raises(ManifestError, match="header must be"):
        read_manifest(bad)
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(ManifestError, match="header must be"):
        read_manifest(tmp_path / "empty.tsv")


def test_read_manifest_skips_bad_rows_and_keeps_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text(
        "\ufeff"  # a byte-order mark, as spreadsheets write it
        + HEADER
        + "a.wav\tgood one\tspk\t1.5\n"
        + "b.wav\ttoo few\tspk\n"
        + "c.wav\tnot a number\tspk\tlong\n"
        + "d.wav\tnan\tspk\tnan\n"
        + "e.wav\tnegative\tspk\t-1\n"
        + "\n"
        + '"f.wav"\tsays "hi"\tspk\t2\n',
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING, logger="fedspeech"):
        rows = read_manifest(manifest)
    assert [(r.path.name, r.transcript) for r in rows] == [
        ("a.wav", "good one"),
        ('"f.wav"', 'says "hi"'),  # no quoting rules: quotes are data
    ]
    assert rows[0].path == tmp_path.resolve() / "a.wav" and rows[0].duration_s == 1.5
    for lineno in (3, 4, 5, 6):
        assert f"manifest.tsv:{lineno}" in caplog.text
    assert "skipped 4" in caplog.text


def test_real_shared_manifests(shared_data: Path) -> None:
    expected = {  # utterances, speakers, minutes (DESIGN.md)
        "fsdd": (3000, 6, None),
        "librispeech_samples": (355, 262, 65),
        "speechocean762_train": (2000, 125, 139),
    }
    for name, (n_utts, n_speakers, minutes) in expected.items():
        rows = read_manifest(shared_data / name / "manifest.tsv")
        assert len(rows) == n_utts, name
        assert len({r.speaker for r in rows}) == n_speakers, name
        if minutes is not None:
            assert sum(r.duration_s for r in rows) / 60 == pytest.approx(minutes, abs=1), name
        assert all(r.path.is_absolute() and r.path.is_file() for r in rows), name
        assert all(r.transcript == normalize_transcript(r.transcript) for r in rows), name
        assert all(r.duration_s > 0 and math.isfinite(r.duration_s) for r in rows), name
    fsdd = read_manifest(shared_data / "fsdd" / "manifest.tsv")
    assert {r.transcript for r in fsdd} == {
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
    }
