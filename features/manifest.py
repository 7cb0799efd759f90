"""The manifest contract: UTF-8 TSV with header ``path  transcript  speaker  duration_s``.

``path`` is relative to the manifest's folder (or absolute); transcripts are lowercase.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from features.errors import ManifestError, SkipReport

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
    rows: list[Utterance] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
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
    if report.skipped:
        report.log_summary()
    return rows


def write_manifest(path: str | Path, utterances: Iterable[Utterance]) -> int:
    """Write utterances as a manifest; paths under the manifest's folder are stored relative.

    Returns the number of rows written. The file is written atomically (temp file + rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.resolve().parent
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        fh.write("\t".join(MANIFEST_COLUMNS) + "\n")
        for utt in utterances:
            for field_value in (utt.transcript, utt.speaker):
                if "\t" in field_value or "\n" in field_value:
                    raise ManifestError(f"{utt.path}: tab or newline in {field_value!r}")
            fh.write(f"{_relative(utt.path, root)}\t{utt.transcript}\t{utt.speaker}\t{utt.duration_s:.3f}\n")
            n += 1
    os.replace(tmp, path)
    return n


def _relative(audio: Path, root: Path) -> str:
    resolved = audio.resolve()
    try:
        return resolved.relative_to(root).as_posix()
    except ValueError:
        return resolved.as_posix()
