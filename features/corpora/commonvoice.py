"""Common Voice ``*.tsv`` + ``clips/`` -> manifest (speaker = client_id, transcript = sentence).

Common Voice TSVs are tab-separated with *no* quoting: a sentence may contain ``"`` characters
that are part of the text. They are read with ``csv.QUOTE_NONE``, as Common Voice's own loaders do.
"""

from __future__ import annotations

import csv
from pathlib import Path

from fedspeech_features.corpora.common import (
    CorpusError,
    RawItem,
    require_dir,
    validate_items,
    write_corpus,
)
from fedspeech_features.errors import SkipReport

REQUIRED_COLUMNS: tuple[str, ...] = ("client_id", "path", "sentence")
# client_id is a 128-hex-digit SHA-512; 16 digits (64 bits) keep ids readable in tables and
# logs, and a collision among even a million speakers has probability ~3e-8.
DEFAULT_SPEAKER_ID_CHARS = 16


def build_commonvoice(
    tsv: Path,
    out_manifest: Path,
    *,
    clips_dir: Path | None = None,
    speaker_id_chars: int | None = DEFAULT_SPEAKER_ID_CHARS,
    min_duration_s: float | None = None,
    max_duration_s: float | None = None,
) -> SkipReport:
    """Validate every row of a Common Voice TSV (validated.tsv, train.tsv...); write a manifest.

    Rows with the wrong number of fields, a missing clip, undecodable audio or a sentence that
    cannot be normalised are skipped, each named with the reason.

    Args:
        tsv: The Common Voice TSV.
        out_manifest: Manifest to write; audio paths point at the original clips.
        clips_dir: Folder of the clips (default: ``clips/`` beside the TSV).
        speaker_id_chars: Keep this many leading characters of ``client_id`` (None: all).
        min_duration_s: Skip shorter clips (default: one 25 ms analysis window).
        max_duration_s: Skip longer clips (default: no limit).

    Returns:
        Counts of kept and skipped clips.

    Raises:
        CorpusError: The TSV is missing, lacks a required column, or the clips folder is missing.
    """
    if not tsv.is_file():
        raise CorpusError(f"{tsv}: Common Voice TSV not found")
    clips = require_dir(clips_dir if clips_dir is not None else tsv.parent / "clips", "clips")
    report = SkipReport(f"build commonvoice {tsv}")
    items = _read_tsv(tsv, clips, speaker_id_chars, report)
    utterances = validate_items(
        items, report, min_duration_s=min_duration_s, max_duration_s=max_duration_s
    )
    write_corpus(out_manifest, utterances, report)
    return report


def _read_tsv(
    tsv: Path, clips: Path, speaker_id_chars: int | None, report: SkipReport
) -> list[RawItem]:
    items: list[RawItem] = []
    seen: set[Path] = set()
    with tsv.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = next(reader, None)
            if header is None:
                raise CorpusError(f"{tsv}: empty file (no header)")
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise CorpusError(
                    f"{tsv}: not a Common Voice TSV: missing column(s) {', '.join(missing)} "
                    f"(header: {header!r})"
                )
            col = {name: header.index(name) for name in REQUIRED_COLUMNS}
            for fields in reader:
                lineno = reader.line_num
                where = f"{tsv}:{lineno}"
                if not fields or not "".join(fields).strip():
                    continue
                if len(fields) != len(header):
                    report.skip(where, f"{where}: expected {len(header)} fields, got {len(fields)}")
                    continue
                clip = _find_clip(clips, fields[col["path"]].strip())
                if clip is None:
                    report.skip(where, f"{where}: clip {fields[col['path']]!r} not in {clips}")
                    continue
                if clip in seen:
                    report.skip(where, f"{where}: clip {clip} listed twice")
                    continue
                seen.add(clip)
                client_id = fields[col["client_id"]].strip()
                speaker = client_id[:speaker_id_chars] if speaker_id_chars else client_id
                items.append(
                    RawItem(audio=clip, transcript=fields[col["sentence"]], speaker=speaker)
                )
        except csv.Error as exc:
            raise CorpusError(f"{tsv}:{reader.line_num}: malformed TSV ({exc})") from exc
    return items


def _find_clip(clips: Path, name: str) -> Path | None:
    if not name:
        return None
    clip = clips / name
    if clip.is_file():
        return clip
    # The earliest releases listed clip names without the .mp3 extension.
    if not clip.suffix and clip.with_name(clip.name + ".mp3").is_file():
        return clip.with_name(clip.name + ".mp3")
    return None
