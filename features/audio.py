"""Audio I/O: read WAV/FLAC/OGG/MP3 with soundfile, mix down to mono, resample to 16 kHz (soxr)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from fedspeech_features.errors import AudioError, SampleRateError, SkipReport

TARGET_SAMPLE_RATE = 16_000
# Telephone band: the lowest rate that still carries intelligible speech. Lower-rate files (or a
# header with a wrong, tiny rate) are refused rather than upsampled into a muffled 16 kHz signal.
MIN_SOURCE_SAMPLE_RATE = 8_000
# Shorter than one 25 ms analysis window: no MFCC frame can be computed from it.
MIN_DURATION_S = 0.025
# A WAV header is a handful of chunks (fmt, LIST, fact, ...) before "data"; stop looking after this.
_MAX_WAV_CHUNKS = 64


def audio_duration(path: str | Path) -> float:
    """Duration in seconds from the file header (no decoding). Raises AudioError naming the file."""
    try:
        info = sf.info(str(path))
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioError(f"{path}: not a readable audio file ({_short(exc)})") from exc
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(f"{path}: empty audio file (0 samples)")
    return float(info.frames) / float(info.samplerate)


def load_audio(
    path: str | Path,
    sample_rate: int = TARGET_SAMPLE_RATE,
    *,
    min_duration_s: float = MIN_DURATION_S,
    max_duration_s: float | None = None,
    min_source_rate: int = MIN_SOURCE_SAMPLE_RATE,
) -> np.ndarray:
    """Decode ``path`` to a mono float32 waveform at ``sample_rate``.

    Multi-channel audio is averaged to mono; other rates (from ``min_source_rate`` up) are
    resampled with soxr (high quality). Samples outside [-1, 1] (float files) are scaled down to
    peak 1.

    Returns:
        ``(N,)`` float32 array.

    Raises:
        SampleRateError: the file's sample rate is below ``min_source_rate``.
        AudioError: unreadable/corrupt/truncated file, no samples, non-finite samples, or a
            duration outside ``[min_duration_s, max_duration_s]``. The message names the file.
    """
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (N, C)
    except Exception as exc:
        raise AudioError(f"{path}: cannot decode audio ({_short(exc)})") from exc
    if data.shape[0] == 0:
        raise AudioError(f"{path}: empty audio file (0 samples)")
    if sr < min_source_rate:
        raise SampleRateError(
            f"{path}: sample rate {sr} Hz is below {min_source_rate} Hz (too low for speech)"
        )
    truncated = _wav_truncation(path)
    if truncated:
        raise AudioError(f"{path}: truncated WAV file ({truncated})")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]  # (N,)
    if not np.all(np.isfinite(wave)):
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    if sr != sample_rate:
        wave = soxr.resample(wave, sr, sample_rate, quality="HQ").astype(np.float32)  # (N',)
    duration = wave.shape[0] / sample_rate
    if duration < min_duration_s:
        raise AudioError(f"{path}: too short ({duration:.3f} s < {min_duration_s:.3f} s)")
    if max_duration_s is not None and duration > max_duration_s:
        raise AudioError(f"{path}: too long ({duration:.1f} s > {max_duration_s:.1f} s)")
    peak = float(np.abs(wave).max())
    if peak > 1.0:
        wave = wave / peak
    return np.ascontiguousarray(wave, dtype=np.float32)


def load_many(
    paths: Iterable[str | Path], sample_rate: int = TARGET_SAMPLE_RATE, **limits: float | None
) -> tuple[list[tuple[Path, np.ndarray]], SkipReport]:
    """Load every readable file; unreadable ones are skipped, named and counted in the report."""
    report = SkipReport("load audio")
    loaded: list[tuple[Path, np.ndarray]] = []
    for p in paths:
        try:
            loaded.append((Path(p), load_audio(p, sample_rate, **limits)))  # type: ignore[arg-type]
        except AudioError as exc:
            report.skip(p, exc)
        else:
            report.kept += 1
    return loaded, report


def _wav_truncation(path: str | Path) -> str | None:
    """Describe how a RIFF/WAVE file is cut short, or None if it is complete (or not a WAV).

    libsndfile silently decodes the samples that are present when a WAV's data chunk is shorter
    than its header declares (a half-copied file reads as half the audio, with no error), so the
    declared size is checked against the bytes on disk here.
    """
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None  # not a WAV (or RF64/W64): nothing to check
            for _ in range(_MAX_WAV_CHUNKS):
                chunk = fh.read(8)
                if len(chunk) < 8:
                    return None
                chunk_id, chunk_size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if chunk_id == b"data":
                    available = size - fh.tell()
                    # 0 and 0xFFFFFFFF mean "unknown length" (streamed writers): not checkable.
                    if chunk_size in (0, 0xFFFFFFFF) or chunk_size <= available:
                        return None
                    return f"header declares {chunk_size} data bytes, file holds {available}"
                fh.seek(chunk_size + (chunk_size & 1), os.SEEK_CUR)  # chunks are word-aligned
    except OSError:
        return None  # sf.read could open it; a failure here is not evidence of truncation
    return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
