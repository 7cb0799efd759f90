"""Word and character error rates of a model on a manifest (jiwer, corpus level).

The audio goes through the same path as ``fedspeech transcribe`` (the model's own feature
config, chunking, decoder), so the figures are those a user of the model gets. References are
normalised like training transcripts. An utterance is skipped (named in a warning, counted) when
its audio cannot be read or its reference is empty or cannot be spelled by the model's tokenizer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jiwer
import torch

from fedspeech.decoding import Decoder
from fedspeech.modeldir import LoadedModel
from fedspeech.transcribe import Transcriber
from fedspeech_features.errors import Skipped, SkipReport, TextError
from fedspeech_features.manifest import Utterance, read_manifest
from fedspeech_features.text import normalize_transcript

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredUtterance:
    """One scored utterance: normalised reference and the model's hypothesis."""

    path: Path
    reference: str
    hypothesis: str


@dataclass(frozen=True)
class EvalResult:
    """Corpus-level error rates and what was scored.

    Attributes:
        wer: word error rate (``jiwer.wer`` over all scored utterances); NaN if none scored.
        cer: character error rate (``jiwer.cer``; spaces count as characters); NaN if none.
        utterances: every scored utterance, in manifest order.
        skipped: every skipped utterance and why.
    """

    wer: float
    cer: float
    utterances: list[ScoredUtterance] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def scored(self) -> int:
        """Number of utterances scored."""
        return len(self.utterances)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (NaN rates become ``null``): wer, cer, scored, skipped, skipped_items."""
        return {
            "wer": None if math.isnan(self.wer) else self.wer,
            "cer": None if math.isnan(self.cer) else self.cer,
            "scored": self.scored,
            "skipped": len(self.skipped),
            "skipped_items": [{"path": s.item, "reason": s.reason} for s in self.skipped],
        }


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[float, float]:
    """Corpus-level ``(WER, CER)`` with jiwer's definitions; NaN for no references.

    Raises:
        ValueError: the lists differ in length or a reference is empty (jiwer cannot score it).
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        return math.nan, math.nan
    if any(not r.strip() for r in references):
        raise ValueError("empty reference: WER is undefined for it")
    return float(jiwer.wer(list(references), list(hypotheses))), float(
        jiwer.cer(list(references), list(hypotheses))
    )


def evaluate_manifest(
    loaded: LoadedModel,
    manifest: str | Path | Sequence[Utterance],
    *,
    decoder: Decoder | None = None,
    progress: bool | None = None,
    device: torch.device | None = None,
) -> EvalResult:
    """Transcribe a manifest's utterances and score them against their transcripts.

    Args:
        loaded: the model (from ``load_model_dir``, or built in memory, e.g. by the server).
        manifest: a manifest.tsv path, or its rows.
        decoder: greedy by default (see ``fedspeech.decoding.make_decoder``).
        progress: progress bar on stderr (``None``: for 2+ files on a terminal).
        device: where the model runs (moved there, see ``Transcriber``); None: where it is.

    Raises:
        ManifestError: the manifest file is missing or malformed.
    """
    rows = read_manifest(manifest) if isinstance(manifest, str | Path) else list(manifest)
    report = SkipReport("evaluate")
    references: list[str] = []
    audio: list[Path] = []
    for utt in rows:
        try:
            reference = normalize_transcript(utt.transcript)
            loaded.tokenizer.encode(reference)  # TextError: empty or outside the alphabet
        except TextError as exc:
            report.skip(utt.path, f"reference not usable ({exc})")
            continue
        references.append(reference)
        audio.append(utt.path)
    scored: list[ScoredUtterance] = []
    transcriber = Transcriber(loaded, decoder, device=device)
    transcripts = transcriber.transcribe_files(audio, progress=progress)
    for ref, transcript in zip(references, transcripts, strict=True):  # one per file, in order
        if transcript.hypothesis is None:
            report.skip(transcript.path, transcript.error or "cannot transcribe")
            continue
        scored.append(ScoredUtterance(transcript.path, ref, transcript.hypothesis.text))
        report.kept += 1
    report.log_summary(log)
    wer, cer = error_rates([s.reference for s in scored], [s.hypothesis for s in scored])
    return EvalResult(wer, cer, scored, report.skipped)
