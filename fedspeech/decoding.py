"""CTC log-probs -> text with word times: the decoder protocol, greedy decoding, decoder factory.

Greedy decoding (here) and beam search (``fedspeech.beam``, built by :func:`make_decoder`) both
return a :class:`~fedspeech.hypothesis.Hypothesis` whose words carry start/end times read off the
CTC frame alignment (``fedspeech.hypothesis`` says how words are timed and scored).

>>> from fedspeech_features.text import CharTokenizer
>>> tok = CharTokenizer()
>>> ids = [0, 10, 10, 0, 11, 0, 1, 11, 0]  # -, h, h, -, i, -, ' ', i, -
>>> lp = torch.nn.functional.one_hot(torch.tensor(ids), tok.vocab_size).float().mul(9).log_softmax(-1)
>>> hyp = greedy_decode(lp, tok, frame_shift_s=0.03)
>>> hyp.text, [(w.text, round(w.start_s, 2), round(w.end_s, 2)) for w in hyp.words]
('hi i', [('hi', 0.03, 0.15), ('i', 0.21, 0.24)])
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from fedspeech.hypothesis import Hypothesis, hypothesis_from_path, mean_blank_posterior
from fedspeech_features.text import CharTokenizer


class Decoder(Protocol):
    """What transcription needs from a decoder: a padded batch of log-probs -> hypotheses."""

    def decode_batch(self, log_probs: Tensor, lengths: Tensor) -> list[Hypothesis]:
        """Decode ``(B, T, V)`` log-probs whose first ``lengths[b]`` frames are valid."""
        ...


def greedy_decode(log_probs: Tensor, tokenizer: CharTokenizer, frame_shift_s: float) -> Hypothesis:
    """Best-path CTC decoding of one utterance: argmax per frame, collapse repeats, drop blanks.

    Args:
        log_probs: ``(T, V)`` log-probabilities (or any monotone scores, e.g. logits; the
            confidences are only meaningful for log-probabilities).
        tokenizer: maps ids to characters; its space separates words.
        frame_shift_s: seconds between frames (``FeatureConfig.frame_shift_s``).
    """
    lengths = torch.tensor([log_probs.shape[0]])
    return GreedyDecoder(tokenizer, frame_shift_s).decode_batch(log_probs[None], lengths)[0]


class GreedyDecoder:
    """Greedy CTC decoding of padded batches (one argmax over the whole batch).

    ``blank_bias`` is added to the blank's log-probability before the argmax (the "blank penalty"
    of k2/icefall's greedy search, sign reversed): > 0 emits fewer characters (fewer insertions,
    more deletions), < 0 more. A model's tuned value travels in its provenance
    (``LoadedModel.blank_bias``); 0 is plain best-path decoding. Confidences stay the model's own
    posteriors.
    """

    def __init__(
        self, tokenizer: CharTokenizer, frame_shift_s: float, *, blank_bias: float = 0.0
    ) -> None:
        self.tokenizer = tokenizer
        self.frame_shift_s = frame_shift_s
        self.blank_bias = check_blank_bias(blank_bias)

    def decode_batch(self, log_probs: Tensor, lengths: Tensor) -> list[Hypothesis]:
        """Decode ``(B, T, V)`` log-probs; frames at or past ``lengths[b]`` are ignored."""
        log_probs = log_probs.detach().float()
        if self.blank_bias:
            log_probs = log_probs.clone()
            log_probs[..., self.tokenizer.blank_id] += self.blank_bias
        best_lp, best = log_probs.max(dim=-1)  # (B, T), (B, T)
        if self.blank_bias:  # confidences: the unbiased posterior of the chosen label
            best_lp = best_lp - self.blank_bias * (best == self.tokenizer.blank_id)
        post = best_lp.exp().cpu().numpy()  # (B, T) posterior of the best label
        best_np = best.cpu().numpy()  # (B, T)
        blank = self.tokenizer.blank_id
        out = []
        for b, n in enumerate(lengths.tolist()):
            path = best_np[b, :n]  # (T_b,)
            # a label is emitted where it starts a run and is not blank
            starts = np.flatnonzero((path != blank) & np.r_[True, path[1:] != path[:-1]])
            blank_post = mean_blank_posterior(path, post[b, :n], blank)
            out.append(
                hypothesis_from_path(
                    path[starts].tolist(),
                    starts.tolist(),
                    post[b, starts].tolist(),
                    path,
                    self.tokenizer,
                    self.frame_shift_s,
                    blank_post,
                )
            )
        return out


BLANK_BIAS_LIMIT = 10.0  # |bias| beyond this turns every frame blank (or none): surely a typo


def check_blank_bias(value: float) -> float:
    """``value`` as a blank bias, or ValueError: a finite number within +-``BLANK_BIAS_LIMIT``."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)) or not (
        -BLANK_BIAS_LIMIT <= value <= BLANK_BIAS_LIMIT
    ):
        raise ValueError(
            f"blank bias must be a number in [-{BLANK_BIAS_LIMIT:g}, {BLANK_BIAS_LIMIT:g}],"
            f" got {value!r}"
        )
    return float(value)


def make_decoder(
    tokenizer: CharTokenizer,
    frame_shift_s: float,
    *,
    beam_size: int = 0,
    lexicon: str | Path | None = None,
    lm: str | Path | None = None,
    lm_weight: float = 2.0,
    word_score: float = 0.0,
    blank_bias: float = 0.0,
) -> Decoder:
    """Greedy decoding for ``beam_size`` 0 (without lexicon or LM), else ``beam.BeamDecoder``.

    A lexicon or LM with ``beam_size`` 0 gets a beam of 50 (flashlight's default).
    ``blank_bias`` (see :class:`GreedyDecoder`) is for greedy decoding only: beam search has its
    own ``word_score``.
    """
    if beam_size < 0:
        raise ValueError(f"beam size must be >= 0 (0 = greedy), got {beam_size}")
    if beam_size == 0 and lexicon is None and lm is None:
        return GreedyDecoder(tokenizer, frame_shift_s, blank_bias=blank_bias)
    if blank_bias:
        raise ValueError("a blank bias applies to greedy decoding only (beam search: --word-score)")
    from fedspeech.beam import BeamDecoder  # lazy: flashlight-text only when beam searching

    return BeamDecoder(
        tokenizer,
        frame_shift_s,
        beam_size=beam_size or 50,
        lexicon=lexicon,
        lm=lm,
        lm_weight=lm_weight,
        word_score=word_score,
    )
