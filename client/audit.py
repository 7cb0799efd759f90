"""One-run privacy audit of local training with input-space canaries (Steinke, Nasr & Jagielski 2023).

Black box, input space: m canary utterances (random feature frames at the scale of CMVN'd
features, each with a random transcript of its own, so that nothing else in the data explains
it) are each added to the training data independently with probability 1/2. The model is trained
once with ``fedspeech_client.train.train_local``, the code every client runs (DP-SGD or not, as the run
config says). A canary's score is its CTC loss per label under the initial model minus under the
trained one: a canary that was trained on should have lost more. The ``guesses`` highest scores
are guessed "in", the ``guesses`` lowest "out", the rest abstain; the number right gives the
empirical epsilon lower bound of ``fedspeech.audit_bound``, reported next to the accountant's
epsilon. Only the final weights are used (no gradients, no intermediate models): the bound is
what someone holding the released model could prove, so it can sit far below the accountant's
epsilon, which also covers every intermediate step. A lower bound above the accountant's
epsilon means a bug in the DP implementation or its accounting.

The inclusion coin flips come from the audit seed and the training's randomness from its own
generators, so the two are independent as the theorem needs. Like the clients, the audit lets
Opacus set the Poisson rate q = 1 / ceil(N / B) from the training set size N, which here is
n + (canaries in): the dataset size is treated as public, as Opacus's accounting does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import fedspeech.metric_keys as mk
from fedspeech.audit_bound import epsilon_lower_bound
from fedspeech.model import BiGRUCTC, load_plain_state_dict
from fedspeech_client.batching import LabelledFeatures
from fedspeech_client.train import TrainConfig, train_local
from fedspeech_features.text import CharTokenizer

__all__ = [
    "AuditResult",
    "AuditSettings",
    "Canary",
    "canary_losses",
    "guess_membership",
    "make_canaries",
    "run_canary_audit",
]

log = logging.getLogger(__name__)

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class AuditSettings:
    """How the canary audit is run.

    Attributes:
        canaries: m, canary utterances, each included with probability 1/2.
        guesses: k: the k highest scores are guessed "in" and the k lowest "out" (r = 2k).
        canary_frames: model frames of every canary.
        canary_letters: letters of every canary's random transcript.
        confidence: confidence of the lower bound, e.g. 0.95.
        seed: canaries and coin flips (independent of the training's own randomness).
    """

    canaries: int = 200
    guesses: int = 20
    canary_frames: int = 30
    canary_letters: int = 4
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.guesses < 1 or 2 * self.guesses > self.canaries:
            raise ValueError(f"need 1 <= guesses ({self.guesses}) <= canaries / 2")
        if self.canary_letters < 1 or self.canary_frames < 2 * self.canary_letters:
            # CTC needs a blank between repeated letters: 2 frames per letter always suffice.
            raise ValueError("need canary-letters >= 1 and canary-frames >= 2 x canary-letters")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")


@dataclass(frozen=True)
class Canary:
    """One canary utterance (``fedspeech_client.batching.LabelledFeatures``)."""

    feats: Tensor  # (T, D) float32
    labels: Tensor  # (L,) int64
    transcript: str


@dataclass(frozen=True)
class AuditResult:
    """What the audit measured.

    Attributes:
        canaries: m.
        included: canaries the coin flips put in the training data.
        guesses: r, guesses made (2 x ``AuditSettings.guesses``).
        correct: v, guesses that were right.
        epsilon_lower: the empirical lower bound at ``confidence``.
        epsilon: the accountant's epsilon of the training run at ``delta`` (None: no DP).
        delta: the delta of the audited guarantee (the run config's).
        confidence: confidence of the lower bound.
        noise_multiplier: DP-SGD's noise multiplier (None: no DP).
        train_examples: utterances trained on (the data + the included canaries).
        train_loss: the training's last-epoch loss.
        seconds: wall time of the audit (training and scoring).
        scores: every canary's loss decrease, in canary order.
        membership: whether each canary was included.
    """

    canaries: int
    included: int
    guesses: int
    correct: int
    epsilon_lower: float
    epsilon: float | None
    delta: float
    confidence: float
    noise_multiplier: float | None
    train_examples: int
    train_loss: float
    seconds: float
    scores: tuple[float, ...]
    membership: tuple[bool, ...]

    def metrics(self) -> dict[str, float]:
        """Finite numbers for a tracker's ``log_round`` (the accountant's epsilon when DP is on)."""
        out = {
            "audit_epsilon_lower": self.epsilon_lower,
            "audit_canaries": float(self.canaries),
            "audit_included": float(self.included),
            "audit_guesses": float(self.guesses),
            "audit_correct": float(self.correct),
            "audit_confidence": self.confidence,
            "audit_seconds": self.seconds,
            "train_loss": self.train_loss,
        }
        if self.epsilon is not None:
            out["epsilon"] = self.epsilon
        return out

    def summary(self) -> dict[str, Any]:
        """The result without the per-canary lists (what the CLI prints)."""
        data = dict(self.__dict__)
        data.pop("scores")
        data.pop("membership")
        return data


def make_canaries(
    count: int, frame_dim: int, settings: AuditSettings, generator: torch.Generator
) -> list[Canary]:
    """``count`` canaries: N(0, 1) frames (CMVN'd features' scale) and distinct random transcripts."""
    tokenizer = CharTokenizer()
    seen: set[str] = set()
    canaries: list[Canary] = []
    while len(canaries) < count:
        picks = torch.randint(0, len(_LETTERS), (settings.canary_letters,), generator=generator)
        transcript = "".join(_LETTERS[i] for i in picks.tolist())
        if transcript in seen:
            continue
        seen.add(transcript)
        feats = torch.randn(settings.canary_frames, frame_dim, generator=generator)  # (T, D)
        labels = torch.tensor(tokenizer.encode(transcript), dtype=torch.int64)  # (L,)
        canaries.append(Canary(feats, labels, transcript))
    return canaries


def canary_losses(model: nn.Module, canaries: Sequence[Canary]) -> np.ndarray:
    """CTC loss per label of every canary under ``model`` (eval mode), shape ``(m,)``."""
    model.eval()
    feats = torch.stack([c.feats for c in canaries])  # (m, T, D): canaries share one length
    lengths = torch.full((len(canaries),), feats.shape[1], dtype=torch.int64)  # (m,)
    labels = torch.stack([c.labels for c in canaries])  # (m, L)
    label_lens = torch.full((len(canaries),), labels.shape[1], dtype=torch.int64)  # (m,)
    with torch.no_grad():
        log_probs = model(feats, lengths)  # (m, T, V)
        losses = nn.functional.ctc_loss(
            log_probs.transpose(0, 1),  # (T, m, V)
            labels,
            lengths,
            label_lens,
            blank=0,
            reduction="none",
            zero_infinity=True,
        )  # (m,)
    return (losses / label_lens).numpy().astype(np.float64)


def guess_membership(scores: np.ndarray, guesses: int) -> np.ndarray:
    """+1 ("in") for the ``guesses`` highest scores, -1 ("out") for the lowest, 0 elsewhere."""
    order = np.argsort(-scores, kind="stable")  # (m,) highest first
    out = np.zeros(len(scores), dtype=np.int64)
    out[order[:guesses]] = 1
    out[order[len(scores) - guesses :]] = -1
    return out


def run_canary_audit(
    model: BiGRUCTC,
    examples: Sequence[LabelledFeatures],
    train: TrainConfig,
    settings: AuditSettings,
) -> AuditResult:
    """Audit one training run of ``train_local`` on ``examples`` + the included canaries.

    Args:
        model: the initial model (left untouched).
        examples: the training data besides the canaries.
        train: the training settings (DP-SGD on or off, its noise or target epsilon).
        settings: the audit's settings.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    canaries = make_canaries(settings.canaries, model.cfg.input_dim, settings, generator)
    membership = torch.rand(settings.canaries, generator=generator) < 0.5  # (m,) fair coins
    included = [c for c, inside in zip(canaries, membership.tolist(), strict=True) if inside]
    before = canary_losses(model, canaries)
    log.info(
        "audit: training on %d utterances + %d of %d canaries (%s)",
        len(examples),
        len(included),
        len(canaries),
        "DP-SGD" if train.dp else "no DP",
    )
    result = train_local(model, [*examples, *included], train)
    trained = BiGRUCTC(model.cfg, dp=False)
    load_plain_state_dict(trained, result.state_dict)
    scores = before - canary_losses(trained, canaries)  # (m,) loss decrease
    guesses = guess_membership(scores, settings.guesses)
    truth = np.where(membership.numpy(), 1, -1)
    correct = int(np.sum(guesses * truth > 0))
    made = int(np.count_nonzero(guesses))
    delta = train.delta
    lower = epsilon_lower_bound(settings.canaries, made, correct, delta, settings.confidence)
    return AuditResult(
        canaries=settings.canaries,
        included=len(included),
        guesses=made,
        correct=correct,
        epsilon_lower=lower,
        epsilon=result.epsilon,
        delta=delta,
        confidence=settings.confidence,
        noise_multiplier=result.noise_multiplier,
        train_examples=len(examples) + len(included),
        train_loss=float(result.metrics[mk.TRAIN_LOSS]),
        seconds=time.perf_counter() - start,
        scores=tuple(float(s) for s in scores),
        membership=tuple(bool(b) for b in membership.tolist()),
    )
