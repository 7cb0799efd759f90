"""Any folder of audio files with same-name ``.txt`` transcripts -> manifest.

``a/b/take1.wav`` is transcribed by ``a/b/take1.txt``; wav, flac, ogg and mp3 files are found
recursively. The speaker is the audio file's parent folder name unless one speaker is given.
"""

from __future__ import annotations

from pathlib import Path

from fedspeech_features.corpora.common import (
    RawItem,
    find_audio_files,
    require_dir,
    validate_items,
    write_corpus,
)
from fedspeech_features.errors import SkipReport


def build_folder(
    root: Path,
    out_manifest: Path,
    *,
    speaker: str | None = None,
    min_duration_s: float | None = None,
    max_duration_s: float | None = None,
) -> SkipReport:
    """Validate every audio file under ``root`` that has a transcript and write a manifest.

    Audio without a ``.txt`` beside it, unreadable transcripts, undecodable audio and
    transcripts that cannot be normalised are skipped, each named with the reason.

    Args:
        root: Folder searched recursively.
        out_manifest: Manifest to write; audio paths point at the original files.
        speaker: One speaker id for every file (default: each file's parent folder name).
        min_duration_s: Skip shorter files (default: one 25 ms analysis window).
        max_duration_s: Skip longer files (default: no limit).

    Returns:
        Counts of kept and skipped files.

    Raises:
        CorpusError: ``root`` is not a folder.
    """
    require_dir(root, "audio")
    report = SkipReport(f"build folder {root}")
    items: list[RawItem] = []
    for audio in find_audio_files(root):
        text_file = audio.with_suffix(".txt")
        if not text_file.is_file():
            report.skip(audio, f"{audio}: no transcript file {text_file.name} beside it")
            continue
        try:
            # utf-8-sig: editors on Windows often prepend a byte-order mark.
            transcript = text_file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            report.skip(audio, f"{audio}: cannot read transcript {text_file} ({exc})")
            continue
        items.append(
            RawItem(
                audio=audio,
                transcript=transcript,
                speaker=speaker if speaker is not None else audio.parent.name,
            )
        )
    utterances = validate_items(
        items, report, min_duration_s=min_duration_s, max_duration_s=max_duration_s
    )
    write_corpus(out_manifest, utterances, report)
    return report
