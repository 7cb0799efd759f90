"""The manifest contract: UTF-8 TSV with header ``path  transcript  speaker  duration_s``.

``path`` is relative to the manifest's folder (or absolute); transcripts are lowercase.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fedspeech_features.errors import ManifestError, SkipReport
from fedspeech_features.files import atomic_write

MANIFEST_COLUMNS: tuple[str, ...] = ("path", "transcript", "speaker", "duration_s")


@dataclass(frozen=True)
class Utterance:
    """One manifest row; ``path`` is absolute once read."""

    path: Path
    transcript: str
    speaker: str
    duration_s: float


def read_manifest(path: str | Path) -> list[Utterance]:
    """Read a manifest; rows that are malformed are skipped with a warning naming the line.

    Raises:
        ManifestError: the file is missing or its header is not the manifest header.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    root = path.resolve().parent
    report = SkipReport(f"read manifest {path}")
    # utf-8-sig: a manifest saved by a spreadsheet or Windows editor may start with a BOM.
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            rows = _read_rows(path, reader, root, report)
        except csv.Error as exc:  # e.g. a field over csv's size limit: name the line
            raise ManifestError(f"{path}:{reader.line_num}: malformed TSV ({exc})") from exc
    if report.skipped:
        report.log_summary()
    return rows


def _read_rows(
    path: Path, reader: Iterator[list[str]], root: Path, report: SkipReport
) -> list[Utterance]:
    rows: list[Utterance] = []
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != MANIFEST_COLUMNS:
        expected = "\t".join(MANIFEST_COLUMNS)
        raise ManifestError(f"{path}: header must be {expected!r}, got {header!r}")
    for lineno, fields in enumerate(reader, start=2):
        if not fields or not "".join(fields).strip():
            continue
        where = f"{path}:{lineno}"
        if len(fields) != len(MANIFEST_COLUMNS):
            report.skip(where, f"expected {len(MANIFEST_COLUMNS)} columns, got {len(fields)}")
            continue
        audio, transcript, speaker, duration = fields
        try:
            seconds = float(duration)
        except ValueError:
            report.skip(where, f"duration_s {duration!r} is not a number")
            continue
        if not math.isfinite(seconds) or seconds < 0:
            report.skip(where, f"duration_s {duration!r} is not a finite, non-negative number")
            continue
        if not audio.strip():
            report.skip(where, "empty path")
            continue
        audio_path = Path(audio)
        rows.append(
            Utterance(
                path=audio_path if audio_path.is_absolute() else root / audio_path,
                transcript=transcript.strip(),
                speaker=speaker.strip(),
                duration_s=seconds,
            )
        )
        report.kept += 1
    return rows


def write_manifest(path: str | Path, utterances: Iterable[Utterance]) -> int:
    """Write utterances as a manifest; paths under the manifest's folder are stored relative.

    Returns the number of rows written. The file is written atomically (temp file + rename).

    Raises:
        ManifestError: a path, transcript or speaker contains a tab or newline (nothing is written).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.abspath(path.parent))
    lines = ["\t".join(MANIFEST_COLUMNS) + "\n"]
    for utt in utterances:
        audio = _relative(utt.path, root)
        for field_value in (audio, utt.transcript, utt.speaker):
            if "\t" in field_value or "\n" in field_value or "\r" in field_value:
                raise ManifestError(f"{utt.path}: tab or newline in {field_value!r}")
        lines.append(f"{audio}\t{utt.transcript}\t{utt.speaker}\t{utt.duration_s:.3f}\n")
    atomic_write(path, "".join(lines), mode=0o644)  # readable by the other users of the data
    return len(lines) - 1


def _relative(audio: Path, root: Path) -> str:
    """``audio`` relative to ``root`` when it lies under it, else absolute.

    File symlinks are kept, not resolved: a corpus of symlinked audio stays relative (and
    portable) instead of pointing at wherever the links lead. Folders are compared both as
    written and resolved, so ``/tmp`` vs ``/private/tmp`` style aliases still match.
    """
    absolute = Path(os.path.abspath(audio))
    via_real_dir = absolute.parent.resolve() / absolute.name
    for candidate, base in ((absolute, root), (via_real_dir, root.resolve())):
        if candidate.is_relative_to(base):
            return candidate.relative_to(base).as_posix()
    return absolute.as_posix()
