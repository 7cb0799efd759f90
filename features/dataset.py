"""Manifest rows -> training examples (feature frames + CTC label ids); bad rows skipped, named."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from fedspeech_features.cache import FeatureCache
from fedspeech_features.errors import (
    AudioError,
    FedspeechDataError,
    SampleRateError,
    SkipReport,
    TextError,
)
from fedspeech_features.manifest import Utterance
from fedspeech_features.mfcc import FeatureExtractor
from fedspeech_features.text import CharTokenizer, normalize_transcript

log = logging.getLogger(__name__)

# Below this many items a progress bar is noise (extraction takes well under a second).
_PROGRESS_MIN_ITEMS = 50


@dataclass(frozen=True, eq=False)
class Example:
    """One utterance ready for CTC training.

    Attributes:
        path: the audio file.
        feats: ``(T', frame_dim)`` float32 model frames.
        labels: ``(L,)`` int64 tokenizer ids of the normalised transcript (no blanks), ``L <= T'``.
        transcript: the normalised transcript the labels spell.
        speaker: speaker id from the manifest.
        duration_s: duration from the manifest.
    """

    path: Path
    feats: Tensor
    labels: Tensor
    transcript: str
    speaker: str
    duration_s: float

    @property
    def utt_id(self) -> str:
        """Short name of the utterance: the audio file name without its extension."""
        return self.path.stem


def extract_manifest(
    utterances: Sequence[Utterance],
    extractor: FeatureExtractor,
    cache: FeatureCache | None,
    tokenizer: CharTokenizer,
) -> tuple[list[Example], SkipReport]:
    """Features and labels of every usable utterance, in manifest order.

    An utterance is skipped (named in the report and a warning, never raised) when its audio cannot
    be used, its transcript is empty or has characters the tokenizer cannot spell, or it is
    CTC-infeasible: more labels than model frames. Each skip has a ``kind`` (``SKIP_KINDS``:
    ``audio``, ``sample-rate``, ``transcript``, ``ctc-infeasible``) for counts that name no file.

    Args:
        utterances: manifest rows.
        extractor: waveform -> model frames.
        cache: on-disk feature cache, or ``None`` to always extract.
        tokenizer: transcript -> label ids.

    Returns:
        The examples and a report of kept/skipped counts.
    """
    report = SkipReport("extract features")
    examples: list[Example] = []
    show = None if len(utterances) > _PROGRESS_MIN_ITEMS else True  # None: only on a terminal
    for utt in tqdm(utterances, desc="features", unit="utt", disable=show):
        # the report names the file; reasons say what is wrong with it
        if not utt.path.is_file():
            report.skip(utt.path, "audio file not found", "audio")
            continue
        try:
            text = normalize_transcript(utt.transcript)
            labels = torch.tensor(tokenizer.encode(text), dtype=torch.long)  # (L,)
            if cache is None:
                feats = extractor.from_file(utt.path)  # (T', D)
            else:
                feats = cache.get_or_compute(utt.path, extractor.from_file)  # (T', D)
        except FedspeechDataError as exc:  # AudioError, TextError
            report.skip(utt.path, str(exc).removeprefix(f"{utt.path}: "), _skip_kind(exc))
            continue
        if labels.numel() > feats.shape[0]:
            report.skip(
                utt.path,
                f"CTC-infeasible: {labels.numel()} labels > {feats.shape[0]} frames "
                f"({utt.duration_s:.2f} s at {extractor.cfg.frame_shift_s * 1000:.0f} ms/frame)",
                "ctc-infeasible",
            )
            continue
        examples.append(Example(utt.path, feats, labels, text, utt.speaker, utt.duration_s))
        report.kept += 1
    report.log_summary(log)
    if cache is not None:
        log.info("feature cache %s: %d hits, %d misses", cache.dir, cache.hits, cache.misses)
    return examples, report


SKIP_KINDS = ("audio", "sample-rate", "transcript", "ctc-infeasible", "other")
"""The kinds of reasons ``extract_manifest`` skips an utterance for (``Skipped.kind``)."""


def _skip_kind(exc: FedspeechDataError) -> str:
    if isinstance(exc, SampleRateError):
        return "sample-rate"
    if isinstance(exc, AudioError):
        return "audio"
    if isinstance(exc, TextError):
        return "transcript"
    return "other"
