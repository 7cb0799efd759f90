"""LibriSpeech folder -> manifest: ``<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac``.

Each chapter folder holds ``<speaker>-<chapter>.trans.txt`` with one ``ID TRANSCRIPT`` line per
utterance. ``root`` may be the ``LibriSpeech`` folder (several subsets), one subset such as
``train-clean-100``, or a single speaker or chapter folder: transcripts are found recursively.
"""

from __future__ import annotations

from pathlib import Path

from fedspeech_features.corpora.common import (
    AUDIO_EXTENSIONS,
    CorpusError,
    RawItem,
    find_audio_files,
    require_dir,
    validate_items,
    write_corpus,
)
from fedspeech_features.errors import SkipReport

TRANSCRIPT_SUFFIX = ".trans.txt"


def build_librispeech(
    root: Path,
    out_manifest: Path,
    *,
    min_duration_s: float | None = None,
    max_duration_s: float | None = None,
) -> SkipReport:
    """Validate every LibriSpeech utterance under ``root`` and write a manifest.

    The speaker id is the first field of the utterance id (``1089`` of ``1089-134686-0000``).
    A transcript line without its audio file, an audio file without a transcript line, a
    malformed line and undecodable audio are skipped, each named with the reason.

    Args:
        root: LibriSpeech, subset, speaker or chapter folder.
        out_manifest: Manifest to write; audio paths point at the original files.
        min_duration_s: Skip shorter utterances (default: one 25 ms analysis window).
        max_duration_s: Skip longer utterances (default: no limit).

    Returns:
        Counts of kept and skipped utterances.

    Raises:
        CorpusError: ``root`` is not a folder or holds no ``*.trans.txt`` file.
    """
    require_dir(root, "LibriSpeech")
    report = SkipReport(f"build librispeech {root}")
    transcripts = sorted(root.rglob(f"*{TRANSCRIPT_SUFFIX}"))
    if not transcripts:
        raise CorpusError(
            f"{root}: no LibriSpeech transcripts (*{TRANSCRIPT_SUFFIX}) found; expected "
            "<speaker>/<chapter>/<speaker>-<chapter>.trans.txt beside the .flac files"
        )
    items: list[RawItem] = []
    claimed: set[Path] = set()
    for trans in transcripts:
        for item in _read_chapter(trans, report):
            if item.audio in claimed:
                report.skip(
                    item.audio, f"{item.audio}: second transcript line for {item.audio.stem}"
                )
                continue
            claimed.add(item.audio)
            items.append(item)
    for audio in find_audio_files(root):
        if audio not in claimed:
            report.skip(
                audio, f"{audio}: no transcript line for {audio.stem} in {TRANSCRIPT_SUFFIX}"
            )
    utterances = validate_items(
        items, report, min_duration_s=min_duration_s, max_duration_s=max_duration_s
    )
    write_corpus(out_manifest, utterances, report)
    return report


def _read_chapter(trans: Path, report: SkipReport) -> list[RawItem]:
    """Items of one ``*.trans.txt``; lines whose audio is missing or malformed are skipped."""
    try:
        lines = trans.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        report.skip(trans, f"{trans}: cannot read transcript file ({exc})")
        return []
    items: list[RawItem] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        utt_id, _, text = line.strip().partition(" ")
        where = f"{trans}:{lineno}"
        if not text.strip():
            report.skip(where, f"{where}: expected 'ID TRANSCRIPT', got {line!r}")
            continue
        audio = _find_audio(trans.parent, utt_id)
        if audio is None:
            report.skip(
                where, f"{where}: no audio file {utt_id}.flac for transcript line in {trans.parent}"
            )
            continue
        items.append(RawItem(audio=audio, transcript=text, speaker=utt_id.split("-")[0]))
    return items


def _find_audio(folder: Path, utt_id: str) -> Path | None:
    # FLAC is the distributed format; converted copies (wav, ...) are accepted too.
    for ext in (".flac", *(e for e in AUDIO_EXTENSIONS if e != ".flac")):
        candidate = folder / f"{utt_id}{ext}"
        if candidate.is_file():
            return candidate
    return None
