"""Audio files -> text with word times: load, split long audio on silence, features, model, decode.

Long recordings are cut into chunks of at most ``max_chunk_s`` seconds at the quietest point
near each limit, so feature and model memory stay bounded whatever the file's length (the
decoded waveform itself is held: 3.8 MB per minute at 16 kHz). Chunks whose loudest 10 ms frame
stays below ``silence_dbfs`` are not decoded: a silent file gives an empty transcript. Chunks of
several files are batched through the model, sorted by length. A file that cannot be read gives a
:class:`Transcript` with an ``error`` naming it; the other files are unaffected.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from fedspeech.decoding import Decoder, GreedyDecoder
from fedspeech.hypothesis import Hypothesis, join_hypotheses
from fedspeech.modeldir import LoadedModel
from fedspeech_features.audio import MIN_DURATION_S, load_audio
from fedspeech_features.errors import AudioError
from fedspeech_features.mfcc import FeatureExtractor

log = logging.getLogger(__name__)

# What soundfile (libsndfile 1.2) decodes; a folder is searched for these, case-insensitively.
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif"})
# Level analysis frames for silence detection, and the span a cut point's level is averaged over
# (a pause between words lasts 0.1-0.5 s; a single quiet frame inside a word is not a pause).
_LEVEL_FRAME_S = 0.01
_PAUSE_S = 0.2
# A chunk at most this loud (digital silence is -200 dBFS, room noise -70..-50, speech peaks
# -30..-6) holds no speech and is not decoded.
_SILENCE_DBFS = -50.0
# Audio per group of files transcribed together: bounds memory for many files.
_GROUP_SECONDS = 120.0
# Padded frames per model forward: 12 000 frames of 30 ms = 6 min of audio, ~100 MB activations.
_BATCH_FRAMES = 12_000


@dataclass(frozen=True)
class Transcript:
    """The result for one file: a hypothesis, or an error message naming the file."""

    path: Path
    duration_s: float
    hypothesis: Hypothesis | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{path, text, words, confidence, duration_s}`` or ``{path, error}``."""
        if self.hypothesis is None:
            return {"path": str(self.path), "error": self.error}
        hyp = self.hypothesis
        return {
            "path": str(self.path),
            "text": hyp.text,
            "words": [
                {
                    "word": w.text,
                    "start": round(w.start_s, 3),
                    "end": round(w.end_s, 3),
                    "confidence": round(w.confidence, 4),
                }
                for w in hyp.words
            ],
            "confidence": None if hyp.confidence is None else round(hyp.confidence, 4),
            "duration_s": round(self.duration_s, 3),
        }


@dataclass
class TranscribeStats:
    """Seconds spent per stage and seconds of audio transcribed, summed over calls."""

    audio_s: float = 0.0
    load_s: float = 0.0
    feature_s: float = 0.0
    model_s: float = 0.0
    decode_s: float = 0.0


@dataclass(frozen=True)
class Chunk:
    """Samples ``[start, end)`` of a waveform; ``silent`` chunks are not decoded."""

    start: int
    end: int
    silent: bool


def plan_chunks(
    wave: np.ndarray,
    sample_rate: int,
    max_chunk_s: float = 20.0,
    *,
    silence_dbfs: float = _SILENCE_DBFS,
) -> list[Chunk]:
    """Cut a waveform into chunks of at most ``max_chunk_s`` at pauses.

    Each cut falls at the quietest ``_PAUSE_S`` stretch within the last 40% of the allowed length
    (the latest one on ties), so chunks are 60-100% of ``max_chunk_s`` except the last, which is
    at least 1 s long unless the whole waveform is shorter.

    Returns:
        Chunks covering ``wave`` without gaps or overlaps, in order.
    """
    frame = max(1, round(_LEVEL_FRAME_S * sample_rate))
    level = frame_levels(wave, frame)  # (F,) dBFS
    n_frames = len(level)
    pause = max(1, round(_PAUSE_S / _LEVEL_FRAME_S))
    smooth = np.convolve(level, np.ones(pause) / pause, mode="same")  # (F,)
    limit = max(1, round(max_chunk_s / _LEVEL_FRAME_S))
    min_tail = round(1.0 / _LEVEL_FRAME_S)
    cuts = [0]
    while n_frames - cuts[-1] > limit:
        lo = cuts[-1] + max(1, round(0.6 * limit))
        hi = min(cuts[-1] + limit, n_frames - min_tail)
        if hi <= lo:  # less than a second would be left over: split the rest evenly instead
            lo = hi = cuts[-1] + (n_frames - cuts[-1]) // 2
        window = smooth[lo : hi + 1]
        cuts.append(lo + len(window) - 1 - int(np.argmin(window[::-1])))
    cuts.append(n_frames)
    return [
        Chunk(a * frame, min(b * frame, len(wave)), bool(level[a:b].max() < silence_dbfs))
        for a, b in itertools.pairwise(cuts)
    ]


def frame_levels(wave: np.ndarray, frame: int) -> np.ndarray:
    """``(F,)`` level in dBFS of each ``frame``-sample frame (the last one zero-padded).

    Plain numpy, not ``librosa.feature.rms``: the same levels within 1e-5 dB at about the same
    speed, but librosa's feature module takes ~1.4 s to import, which every simulation's first
    central evaluation and every first transcription paid (benchmarks/pause_levels.py).
    -200 dBFS floors digital silence.
    """
    n_frames = -(-len(wave) // frame)
    padded = np.zeros(n_frames * frame, dtype=np.float32)  # (F * frame,)
    padded[: len(wave)] = wave
    rms = np.sqrt(np.mean(padded.reshape(n_frames, frame) ** 2, axis=1))  # (F,)
    return np.asarray(20.0 * np.log10(np.maximum(rms, 1e-10)))


class Transcriber:
    """Transcribe files or waveforms with a loaded model; build once, call many times.

    Args:
        loaded: the model, its feature config and tokenizer.
        decoder: greedy by default (see ``fedspeech.decoding.make_decoder``).
        max_chunk_s: longest stretch of audio given to the model at once.
        device: where the model runs (``loaded.model`` is moved there, in place); None: where its
            weights are. Features are made and hypotheses decoded on the CPU.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        decoder: Decoder | None = None,
        *,
        max_chunk_s: float = 20.0,
        device: torch.device | None = None,
    ) -> None:
        if device is None:
            device = next(loaded.model.parameters()).device
        self.device = device
        loaded.model.to(device)
        self.loaded = loaded
        self.feature_config = loaded.feature_config
        self.extractor = FeatureExtractor(loaded.feature_config)
        self.decoder = decoder or GreedyDecoder(
            loaded.tokenizer, loaded.feature_config.frame_shift_s
        )
        self.max_chunk_s = max_chunk_s
        self.stats = TranscribeStats()
        # a chunk must outlast half an FFT window to be framed (see FeatureExtractor.from_file)
        self._min_samples = self.extractor.cfg.n_fft // 2 + 1

    def transcribe_wave(self, wave: np.ndarray) -> Hypothesis:
        """Transcribe one mono waveform at the model's sample rate (``(N,)`` float32)."""
        return self._transcribe_waves([wave])[0]

    def transcribe_files(
        self, paths: Sequence[str | Path], *, progress: bool | None = None
    ) -> Iterator[Transcript]:
        """Transcribe files in order, yielding one :class:`Transcript` per file.

        Args:
            paths: audio files.
            progress: show a progress bar on stderr (``None``: only for 2+ files on a terminal).
        """
        bar = tqdm(
            total=len(paths),
            unit="file",
            desc="transcribe",
            disable=(None if len(paths) > 1 else True) if progress is None else not progress,
        )
        with bar:
            for group in self._groups(paths):
                waves = [w for _, w, _ in group if w is not None]
                hyps = iter(self._transcribe_waves(waves))
                for path, wave, error in group:
                    sr = self.feature_config.sample_rate
                    if wave is None:
                        yield Transcript(path, 0.0, None, error)
                    else:
                        yield Transcript(path, len(wave) / sr, next(hyps))
                    bar.update(1)

    def _groups(
        self, paths: Iterable[str | Path]
    ) -> Iterator[list[tuple[Path, np.ndarray | None, str | None]]]:
        """Loaded files in groups of about ``_GROUP_SECONDS`` of audio (errors as messages)."""
        group: list[tuple[Path, np.ndarray | None, str | None]] = []
        seconds = 0.0
        sr = self.feature_config.sample_rate
        for p in paths:
            path = Path(p)
            start = time.perf_counter()
            try:
                if not path.is_file():
                    raise AudioError(f"{path}: file not found")
                shortest = max(MIN_DURATION_S, self._min_samples / sr)
                wave = load_audio(path, sr, min_duration_s=shortest)
                group.append((path, wave, None))
                seconds += len(wave) / sr
            except AudioError as exc:
                group.append((path, None, str(exc)))
            except (OSError, ValueError, RuntimeError) as exc:  # e.g. an odd rate soxr refuses
                group.append((path, None, f"{path}: cannot read audio ({exc})"))
            self.stats.load_s += time.perf_counter() - start
            if seconds >= _GROUP_SECONDS:
                yield group
                group, seconds = [], 0.0
        if group:
            yield group

    def _transcribe_waves(self, waves: Sequence[np.ndarray]) -> list[Hypothesis]:
        """Chunk, featurise, run the model in length-sorted batches, decode, join per waveform."""
        sr = self.feature_config.sample_rate
        pieces: list[tuple[int, Chunk]] = []  # (waveform index, chunk) of every audible chunk
        for i, wave in enumerate(waves):
            self.stats.audio_s += len(wave) / sr
            for chunk in plan_chunks(wave, sr, self.max_chunk_s):
                if not chunk.silent and chunk.end - chunk.start >= self._min_samples:
                    pieces.append((i, chunk))
        start = time.perf_counter()
        feats = self.extractor.batch([waves[i][c.start : c.end] for i, c in pieces])  # [(T, D)]
        self.stats.feature_s += time.perf_counter() - start
        hyps: list[Hypothesis | None] = [None] * len(pieces)
        order = sorted(range(len(pieces)), key=lambda k: feats[k].shape[0], reverse=True)
        for batch in _batches(order, [f.shape[0] for f in feats]):
            start = time.perf_counter()
            x = pad_sequence([feats[k] for k in batch], batch_first=True)  # (B, T, D)
            lengths = torch.tensor([feats[k].shape[0] for k in batch])  # (B,)
            with torch.inference_mode():
                log_probs = self.loaded.model(x.to(self.device), lengths).cpu()  # (B, T, V)
            self.stats.model_s += time.perf_counter() - start
            start = time.perf_counter()
            for k, hyp in zip(batch, self.decoder.decode_batch(log_probs, lengths), strict=True):
                chunk = pieces[k][1]
                hyps[k] = hyp.clipped((chunk.end - chunk.start) / sr).shifted(chunk.start / sr)
            self.stats.decode_s += time.perf_counter() - start
        per_wave: list[list[Hypothesis]] = [[] for _ in waves]
        for (i, _), maybe in zip(pieces, hyps, strict=True):
            assert maybe is not None  # every piece is in exactly one batch
            per_wave[i].append(maybe)
        return [join_hypotheses(parts) for parts in per_wave]


def _batches(order: Sequence[int], lengths: Sequence[int]) -> Iterator[list[int]]:
    """Consecutive runs of ``order`` (longest first) whose padded size fits ``_BATCH_FRAMES``."""
    batch: list[int] = []
    for k in order:
        # longest first: the first member sets the padded length
        if batch and lengths[batch[0]] * (len(batch) + 1) > _BATCH_FRAMES:
            yield batch
            batch = []
        batch.append(k)
    if batch:
        yield batch


def find_audio_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, and the audio files under folders (recursively, sorted by path).

    A path that does not exist is kept (its transcript will carry a "not found" error).
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
                )
            )
        else:
            found.append(path)
    return found


@dataclass
class _SrtBlock:
    start_s: float
    end_s: float
    words: list[str] = field(default_factory=list)


def to_srt(hypothesis: Hypothesis, *, max_block_s: float = 7.0, max_chars: int = 42) -> str:
    """SubRip subtitles from word times, one text line per block.

    A block spans at most ``max_block_s`` seconds and ``max_chars`` characters; a pause of over
    1 s also starts a new one. No words give an empty string (a valid, empty SRT file).

    >>> from fedspeech.hypothesis import Word
    >>> words = [Word("hi", 0.5, 0.7, 1.0), Word("there", 0.8, 1.2, 1.0)]
    >>> to_srt(Hypothesis("hi there", words, 1.0))
    '1\\n00:00:00,500 --> 00:00:01,200\\nhi there\\n\\n'
    """
    blocks: list[_SrtBlock] = []
    for w in hypothesis.words:
        cur = blocks[-1] if blocks else None
        if (
            cur is None
            or w.end_s - cur.start_s > max_block_s
            or len(" ".join([*cur.words, w.text])) > max_chars
            or w.start_s - cur.end_s > 1.0
        ):
            blocks.append(_SrtBlock(w.start_s, w.end_s, [w.text]))
        else:
            cur.words.append(w.text)
            cur.end_s = w.end_s
    return "".join(
        f"{n}\n{_srt_time(b.start_s)} --> {_srt_time(b.end_s)}\n{' '.join(b.words)}\n\n"
        for n, b in enumerate(blocks, start=1)
    )


def _srt_time(seconds: float) -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"
