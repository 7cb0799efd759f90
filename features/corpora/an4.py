"""AN4 (CMU census database) -> one manifest per official split: ``train`` or ``test``.

The layout of the CMU distribution (github.com/cmusphinx/an4)::

    etc/an4_train.transcription   <s> RUBOUT G M E F THREE NINE </s> (an251-fash-b)
    etc/an4_test.transcription    ... (an406-fcaw-b)
    wav/an4_clstk/<speaker>/<utterance id>.wav      (train: 948 utterances, 74 speakers)
    wav/an4test_clstk/<speaker>/<utterance id>.wav  (test: 130 utterances, 10 speakers)

The speaker is the middle field of the utterance id (``fash`` of ``an251-fash-b``). The split is
the official one, never re-drawn: test speakers never appear in train. Spelled letters stay single
letter words ("g m e f"), as the published AN4 results score them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from fedspeech_features.corpora.common import (
    AUDIO_EXTENSIONS,
    CorpusError,
    RawItem,
    require_dir,
    validate_items,
    write_corpus,
)
from fedspeech_features.errors import SkipReport

Split = Literal["train", "test"]
# split -> (transcription file under etc/, audio folder under wav/)
LAYOUT: dict[str, tuple[str, str]] = {
    "train": ("an4_train.transcription", "an4_clstk"),
    "test": ("an4_test.transcription", "an4test_clstk"),
}
# "<s> TEXT </s> (utterance-id)", the sentence markers optional
_LINE = re.compile(r"^(?:<s>)?\s*(?P<text>.*?)\s*(?:</s>)?\s*\((?P<id>[^()\s]+)\)\s*$")
# NIST SPHERE (.sph) is how the original tarball ships the audio; libsndfile reads it
_EXTENSIONS = (".wav", ".sph", *(e for e in AUDIO_EXTENSIONS if e != ".wav"))


def build_an4(
    root: Path,
    out_manifest: Path,
    *,
    split: Split = "train",
    min_duration_s: float | None = None,
    max_duration_s: float | None = None,
) -> SkipReport:
    """Validate every utterance of one official AN4 split and write its manifest.

    A transcript line without its audio file, a malformed line and undecodable audio are
    skipped, each named with the reason; audio files no transcript line names are not read.

    Args:
        root: the AN4 folder (holding ``etc/`` and ``wav/``).
        out_manifest: manifest to write; audio paths point at the original files.
        split: ``train`` or ``test`` (the official split).
        min_duration_s: skip shorter utterances (default: one 25 ms analysis window).
        max_duration_s: skip longer utterances (default: no limit).

    Returns:
        Counts of kept and skipped utterances.

    Raises:
        CorpusError: ``root`` is not an AN4 folder (no transcription file for ``split``).
    """
    if split not in LAYOUT:
        raise CorpusError(f"AN4 split {split!r}: expected one of {sorted(LAYOUT)}")
    require_dir(root, "AN4")
    name, folder = LAYOUT[split]
    transcription = root / "etc" / name
    if not transcription.is_file():
        raise CorpusError(
            f"{root}: no {transcription.relative_to(root)}; expected the CMU AN4 layout "
            "(etc/an4_{train,test}.transcription, wav/an4_clstk/, wav/an4test_clstk/)"
        )
    report = SkipReport(f"build an4 {split} {root}")
    items = _read_transcription(transcription, root / "wav" / folder, report)
    utterances = validate_items(
        items, report, min_duration_s=min_duration_s, max_duration_s=max_duration_s
    )
    write_corpus(out_manifest, utterances, report)
    return report


def _read_transcription(path: Path, audio_root: Path, report: SkipReport) -> list[RawItem]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path}: cannot read the transcription file ({exc})") from exc
    items: list[RawItem] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        match = _LINE.match(line.strip())
        parts = match["id"].split("-") if match else []
        if match is None or len(parts) != 3 or not match["text"]:
            report.skip(where, f"{where}: expected '<s> TEXT </s> (anNNN-speaker-x)', got {line!r}")
            continue
        speaker = parts[1]
        audio = next(
            (p for e in _EXTENSIONS if (p := audio_root / speaker / f"{match['id']}{e}").is_file()),
            None,
        )
        if audio is None:
            report.skip(where, f"{where}: no audio {audio_root / speaker / match['id']}.wav")
            continue
        items.append(RawItem(audio=audio, transcript=match["text"], speaker=speaker))
    return items
