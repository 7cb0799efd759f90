"""Decoded utterances: the :class:`Hypothesis` and :class:`Word` types every decoder returns.

Greedy decoding (``fedspeech.decoding``) and beam search (``fedspeech.beam``) both build their
results here from a CTC token path, so the two agree on how words are split, timed and scored:
a word starts at the first frame of its first character and ends after the last frame of its
last character's run (the frames whose best label stays that character, up to the next
emission). A character's posterior is taken at the frame where it is emitted; a word's
confidence is the mean over its characters, an utterance's the mean over all emitted characters
(or, when nothing is emitted, the mean blank posterior: how sure the model is that nothing was
said). A module of its own so that ``decoding`` (which builds beam decoders) and ``beam`` (which
builds hypotheses) need not import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from fedspeech_features.text import CharTokenizer


@dataclass(frozen=True)
class Word:
    """One recognised word with its time span (seconds from the start of the audio)."""

    text: str
    start_s: float
    end_s: float
    confidence: float


@dataclass(frozen=True)
class Hypothesis:
    """A decoded utterance: text, its words with times, and a confidence in [0, 1] (None: no
    audio was decoded at all, e.g. a silent file)."""

    text: str
    words: list[Word]
    confidence: float | None

    def shifted(self, offset_s: float) -> Hypothesis:
        """The same hypothesis with every word time moved by ``offset_s`` (e.g. a chunk start)."""
        words = [
            replace(w, start_s=w.start_s + offset_s, end_s=w.end_s + offset_s) for w in self.words
        ]
        return replace(self, words=words)

    def clipped(self, duration_s: float) -> Hypothesis:
        """Word times capped at ``duration_s``: the last model frame may reach past the audio."""
        words = [
            replace(w, start_s=min(w.start_s, duration_s), end_s=min(w.end_s, duration_s))
            for w in self.words
        ]
        return replace(self, words=words)


def join_hypotheses(parts: Sequence[Hypothesis]) -> Hypothesis:
    """Concatenate hypotheses of consecutive chunks (word times already absolute).

    The confidence is the character-weighted mean over all words, as for a single utterance; with
    no words at all, the mean of the parts' confidences; with no parts (nothing was decoded:
    silence), None: there is no decision to be confident about.
    """
    words = [w for p in parts for w in p.words]
    confidence: float | None = None
    if words:
        confidence = char_weighted_confidence(words)
    elif parts:
        known = [p.confidence for p in parts if p.confidence is not None]
        confidence = float(np.mean(known)) if known else None
    return Hypothesis(" ".join(w.text for w in words), words, confidence)


def hypothesis_from_path(
    tokens: list[int],
    frames: list[int],
    posteriors: list[float],
    path: np.ndarray,
    tokenizer: CharTokenizer,
    frame_shift_s: float,
    blank_posterior: float,
) -> Hypothesis:
    """Group emitted labels into words split at spaces.

    Args:
        tokens: emitted label ids (no blanks), in order.
        frames: the frame where each label is emitted.
        posteriors: each label's posterior at that frame.
        path: ``(T,)`` best label per frame; a character's run continues while it stays the best.
        tokenizer: id -> character.
        frame_shift_s: seconds per frame.
        blank_posterior: the utterance confidence when nothing is emitted.
    """
    words: list[Word] = []
    current: list[int] = []  # indices (into tokens) of the current word's characters

    def flush(next_index: int) -> None:
        if not current:
            return
        last = current[-1]
        end, tok = frames[last], tokens[last]
        # the last character's run: while it stays the best label, up to the next emission
        stop = min(len(path), frames[next_index] if next_index < len(frames) else len(path))
        while end + 1 < stop and path[end + 1] == tok:
            end += 1
        words.append(
            Word(
                "".join(tokenizer.alphabet[tokens[i]] for i in current),
                frames[current[0]] * frame_shift_s,
                (end + 1) * frame_shift_s,
                float(np.mean([posteriors[i] for i in current])),
            )
        )
        current.clear()

    for i, tok in enumerate(tokens):
        if tokenizer.alphabet[tok] == " " or tok == tokenizer.blank_id:
            flush(i)
        else:
            current.append(i)
    flush(len(tokens))
    confidence = char_weighted_confidence(words) if words else blank_posterior
    return Hypothesis(" ".join(w.text for w in words), words, confidence)


def mean_blank_posterior(path: np.ndarray, posteriors: np.ndarray, blank: int) -> float:
    """Mean posterior of the frames whose best label is blank (0.0 if there are none)."""
    is_blank = path == blank  # (T,)
    return float(posteriors[is_blank].mean()) if is_blank.any() else 0.0


def char_weighted_confidence(words: Sequence[Word]) -> float:
    """Mean posterior over all characters of ``words`` (each word weighted by its length)."""
    total = sum(len(w.text) for w in words)
    return sum(w.confidence * len(w.text) for w in words) / total
