"""Free Spoken Digit Dataset -> manifest: ``recordings/{digit}_{speaker}_{index}.wav``.

The transcript is the digit's word (``7`` -> ``seven``), the speaker comes from the file name.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedspeech_features.corpora.common import (
    RawItem,
    find_audio_files,
    require_dir,
    validate_items,
    write_corpus,
)
from fedspeech_features.errors import SkipReport

DIGIT_WORDS: tuple[str, ...] = (
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
)
_NAME = re.compile(r"(?P<digit>[0-9])_(?P<speaker>[A-Za-z0-9]+)_(?P<index>[0-9]+)")


def build_fsdd(
    root: Path,
    out_manifest: Path,
    *,
    min_duration_s: float | None = None,
    max_duration_s: float | None = None,
) -> SkipReport:
    """Validate every FSDD recording and write a manifest.

    Audio files whose name is not ``{digit}_{speaker}_{index}`` are skipped and named, as are
    undecodable ones; other files (README, ...) are ignored.

    Args:
        root: The FSDD folder (holding ``recordings/``) or the ``recordings`` folder itself.
        out_manifest: Manifest to write; audio paths point at the original 8 kHz wavs.
        min_duration_s: Skip shorter recordings (default: one 25 ms analysis window).
        max_duration_s: Skip longer recordings (default: no limit).

    Returns:
        Counts of kept and skipped recordings.

    Raises:
        CorpusError: ``root`` is not a folder.
    """
    require_dir(root, "FSDD")
    recordings = root / "recordings" if (root / "recordings").is_dir() else root
    report = SkipReport(f"build fsdd {recordings}")
    items: list[RawItem] = []
    for audio in find_audio_files(recordings, recursive=False):
        match = _NAME.fullmatch(audio.stem)
        if match is None:
            report.skip(audio, f"{audio}: file name is not {{digit}}_{{speaker}}_{{index}}.wav")
            continue
        items.append(
            RawItem(
                audio=audio,
                transcript=DIGIT_WORDS[int(match["digit"])],
                speaker=match["speaker"],
            )
        )
    utterances = validate_items(
        items, report, min_duration_s=min_duration_s, max_duration_s=max_duration_s
    )
    write_corpus(out_manifest, utterances, report)
    return report
