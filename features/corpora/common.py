"""Validation shared by every corpus builder: decode the audio, normalise the text, name bad items.

Builders keep the original audio files (the manifest points at them; resampling to 16 kHz happens
at feature time), so an 8 kHz or stereo file is valid. Each file is still decoded in full here:
that is the only way to catch truncated or corrupt files before training trips over them, and it
gives the duration of the audio the model will actually see.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedspeech_features.audio import MIN_DURATION_S, TARGET_SAMPLE_RATE, load_audio
from fedspeech_features.errors import AudioError, FedspeechDataError, SkipReport, TextError
from fedspeech_features.manifest import Utterance, write_manifest
from fedspeech_features.text import normalize_transcript

log = logging.getLogger("fedspeech")

# What soundfile 0.14 (libsndfile 1.2 with mpg123/lame) decodes.
AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg", ".mp3")


class CorpusError(FedspeechDataError):
    """A corpus source that is missing or not in the layout its builder expects."""


@dataclass(frozen=True)
class RawItem:
    """One candidate utterance as a builder found it: audio file, raw transcript, speaker id."""

    audio: Path
    transcript: str
    speaker: str


def check_utterance(
    audio: Path,
    transcript: str,
    speaker: str,
    *,
    min_duration_s: float | None = None,
    max_duration_s: float | None = None,
) -> Utterance:
    """Validate one item and return its manifest row.

    Args:
        audio: Audio file; decoded in full (any rate, any channel count).
        transcript: Raw transcript; normalised with ``normalize_transcript``.
        speaker: Speaker id; inner whitespace becomes ``_`` (the manifest is a TSV).
        min_duration_s: Shortest accepted duration (default: one 25 ms analysis window).
        max_duration_s: Longest accepted duration (default: no limit).

    Returns:
        The utterance; ``duration_s`` is that of the decoded 16 kHz audio.

    Raises:
        AudioError: Unreadable, corrupt, truncated, empty, too short or too long audio.
        TextError: Empty transcript, unmappable characters or no speaker id.
        Every message starts with the audio file's path.
    """
    wave = load_audio(
        audio,
        TARGET_SAMPLE_RATE,
        min_duration_s=MIN_DURATION_S if min_duration_s is None else min_duration_s,
        max_duration_s=max_duration_s,
    )  # (N,) at 16 kHz
    try:
        text = normalize_transcript(transcript)
    except TextError as exc:
        raise TextError(f"{audio}: {exc}") from exc
    if not text:
        raise TextError(f"{audio}: empty transcript (raw: {transcript!r})")
    speaker_id = "_".join(speaker.split())
    if not speaker_id:
        raise TextError(f"{audio}: no speaker id")
    return Utterance(
        path=audio,
        transcript=text,
        speaker=speaker_id,
        duration_s=wave.shape[0] / TARGET_SAMPLE_RATE,
    )


def validate_utterance(
    audio: Path,
    transcript: str,
    speaker: str,
    report: SkipReport,
    *,
    min_duration_s: float | None = None,
    max_duration_s: float | None = None,
) -> Utterance | None:
    """``check_utterance``, but a bad item is recorded in ``report`` (named, with the reason).

    Returns:
        The utterance (and ``report.kept`` is incremented), or None when it was skipped.
    """
    try:
        utt = check_utterance(
            audio,
            transcript,
            speaker,
            min_duration_s=min_duration_s,
            max_duration_s=max_duration_s,
        )
    except (AudioError, TextError) as exc:
        report.skip(audio, exc)
        return None
    report.kept += 1
    return utt


def validate_items(
    items: Iterable[RawItem],
    report: SkipReport,
    *,
    min_duration_s: float | None = None,
    max_duration_s: float | None = None,
) -> list[Utterance]:
    """Validate every item in order; bad ones are skipped and named in ``report``.

    Sequential on purpose: decoding is fast enough (measured here on one core: the 3000 FSDD files
    in ~0.7 s, 355 LibriSpeech FLACs / 65 min in ~0.8 s) and one ordered pass keeps the skip log
    in file order.
    """
    kept: list[Utterance] = []
    for item in items:
        utt = validate_utterance(
            item.audio,
            item.transcript,
            item.speaker,
            report,
            min_duration_s=min_duration_s,
            max_duration_s=max_duration_s,
        )
        if utt is not None:
            kept.append(utt)
    return kept


def write_corpus(out_manifest: Path, utterances: Sequence[Utterance], report: SkipReport) -> Path:
    """Write the manifest of a build and log its summary (kept N, skipped M).

    When nothing was kept no manifest is written (an empty one would only fail later, in
    training), and a manifest left by an earlier build is removed, so that it cannot be mistaken
    for this one's result.

    Returns:
        The manifest path (absent when nothing was kept).
    """
    if not utterances:
        if out_manifest.is_file():
            out_manifest.unlink()
            log.warning("%s: removed the earlier build's %s", report.what, out_manifest)
        log.error(
            "%s: no usable utterances (every item was skipped): no manifest written", report.what
        )
        report.log_summary(log)
        return out_manifest
    write_manifest(out_manifest, utterances)
    minutes = sum(u.duration_s for u in utterances) / 60.0
    speakers = len({u.speaker for u in utterances})
    log.info(
        "%s: wrote %s (%d utterances, %d speakers, %.1f min)",
        report.what,
        out_manifest,
        len(utterances),
        speakers,
        minutes,
    )
    report.log_summary(log)
    return out_manifest


def find_audio_files(root: Path, *, recursive: bool = True) -> list[Path]:
    """Audio files (by extension, case-insensitive) under ``root``, sorted for a stable order."""
    candidates = root.rglob("*") if recursive else root.glob("*")
    return sorted(p for p in candidates if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())


def require_dir(root: Path, what: str) -> Path:
    """Return ``root`` if it is a directory, else raise CorpusError naming it."""
    if not root.is_dir():
        raise CorpusError(f"{root}: {what} folder not found")
    return root
