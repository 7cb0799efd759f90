"""Files for beam search: word lexicons and n-gram language models in ARPA format (KenLM reads it).

``write_arpa`` builds a small word n-gram LM from transcripts in pure Python (Witten-Bell
discounting in backoff form), so that beam search with an LM needs no external tool. For large
corpora, KenLM's ``lmplz`` gives better (modified Kneser-Ney) models in the same format.

>>> import tempfile
>>> tmp = Path(tempfile.mkdtemp())
>>> write_arpa(["the cat sat", "the cat ran"], tmp / "lm.arpa", order=2).name
'lm.arpa'
>>> read_arpa_vocab(tmp / "lm.arpa")
['cat', 'ran', 'sat', 'the']
"""

from __future__ import annotations

import io
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from fedspeech_features.files import atomic_write
from fedspeech_features.text import CharTokenizer

log = logging.getLogger(__name__)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
# ARPA's stand-in for log10(0): "<s>" is a context, never a prediction (as SRILM/KenLM write it).
_LOG10_ZERO = -99.0
_ARPA_MAGIC = b"\\data\\"

Ngram = tuple[str, ...]


def write_arpa(transcripts: Iterable[str], path: str | Path, *, order: int = 2) -> Path:
    """Write a word n-gram LM of ``transcripts`` (whitespace-separated words) as an ARPA file.

    Unigrams are add-one smoothed over the vocabulary plus ``</s>`` and ``<unk>``; each higher
    order uses Witten-Bell discounting: a seen n-gram ``h w`` gets ``c(h w) / (c(h) + T(h))``
    (``T(h)`` = distinct words seen after ``h``) and the remaining mass goes to the lower order
    through the backoff weight of ``h``, so every context's distribution sums to one.

    Args:
        transcripts: sentences, already normalised (e.g. ``normalize_transcript``).
        path: the ARPA file to write (atomically).
        order: n-gram order (>= 2: KenLM refuses unigram-only models).

    Returns:
        ``path``.

    Raises:
        ValueError: ``order < 2`` or no words at all.
    """
    if order < 2:
        raise ValueError(f"order must be >= 2 (KenLM loads bigram models and up), got {order}")
    counts: list[Counter[Ngram]] = [Counter() for _ in range(order)]
    for sentence in transcripts:
        words = sentence.split()
        if not words:
            continue
        tokens = [BOS, *words, EOS]
        for n in range(1, order + 1):
            # every n-gram that ends at a predicted token (all but <s>) and fits the sentence
            for end in range(max(n - 1, 1), len(tokens)):
                counts[n - 1][tuple(tokens[end - n + 1 : end + 1])] += 1
    if not counts[0]:
        raise ValueError("no words in the transcripts")
    model = _WittenBell(counts)
    path = Path(path)
    text = io.StringIO()
    model.write(text)
    atomic_write(path, text.getvalue())
    log.info("wrote %d-gram LM %s (%d words)", order, path, len(counts[0]))
    return path


class _WittenBell:
    """Probabilities and backoff weights of a Witten-Bell backoff model from n-gram counts."""

    def __init__(self, counts: list[Counter[Ngram]]) -> None:
        self.order = len(counts)
        self.counts = counts
        unigrams = counts[0]
        self.vocab = sorted({w for (w,) in unigrams} | {EOS, UNK})
        total = sum(unigrams.values())
        self.prob: dict[Ngram, float] = {
            (w,): (unigrams[(w,)] + 1) / (total + len(self.vocab)) for w in self.vocab
        }
        self.backoff: dict[Ngram, float] = {}
        for n in range(2, self.order + 1):
            followers: dict[Ngram, Counter[str]] = defaultdict(Counter)
            for gram, c in counts[n - 1].items():
                followers[gram[:-1]][gram[-1]] += c
            for history, nexts in followers.items():
                seen, types = sum(nexts.values()), len(nexts)
                for w, c in nexts.items():
                    self.prob[(*history, w)] = c / (seen + types)
                # lower-order mass of the seen followers: >0 left, as <unk> never follows anything
                lower = sum(self._p(w, history[1:]) for w in nexts)
                self.backoff[history] = (types / (seen + types)) / (1.0 - lower)

    def _p(self, word: str, history: Ngram) -> float:
        """Backoff probability of ``word`` after ``history`` (levels below the one being built)."""
        if (*history, word) in self.prob:
            return self.prob[(*history, word)]
        if not history:
            return self.prob[(UNK,)]
        return self.backoff.get(history, 1.0) * self._p(word, history[1:])

    def write(self, fh: TextIO) -> None:
        """ARPA text: header with counts, one section per order, ``\\end\\``."""
        sections: list[list[str]] = []
        unigram_lines = [_line(_LOG10_ZERO, (BOS,), self.backoff.get((BOS,)), self.order > 1)]
        for w in self.vocab:
            unigram_lines.append(
                _line(math.log10(self.prob[(w,)]), (w,), self.backoff.get((w,)), self.order > 1)
            )
        sections.append(unigram_lines)
        for n in range(2, self.order + 1):
            grams = sorted(g for g in self.prob if len(g) == n)
            has_backoff = n < self.order
            sections.append(
                [
                    _line(math.log10(self.prob[g]), g, self.backoff.get(g), has_backoff)
                    for g in grams
                ]
            )
        write = fh.write
        write("\n\\data\\\n")
        for n, lines in enumerate(sections, start=1):
            write(f"ngram {n}={len(lines)}\n")
        for n, lines in enumerate(sections, start=1):
            write(f"\n\\{n}-grams:\n")
            write("".join(lines))
        write("\n\\end\\\n")


def _line(logp: float, gram: Ngram, backoff: float | None, has_backoff: bool) -> str:
    text = f"{logp:.6f}\t{' '.join(gram)}"
    if has_backoff and backoff is not None:
        text += f"\t{math.log10(backoff):.6f}"
    return text + "\n"


def read_arpa_vocab(path: str | Path) -> list[str]:
    """The words of an ARPA LM's unigram section, without ``<s>``, ``</s>`` and ``<unk>``.

    Raises:
        ValueError: the file is not an ARPA text file (no ``\\1-grams:`` section).
    """
    words: list[str] = []
    in_unigrams = found = False
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if line.startswith("\\"):
                in_unigrams = line == "\\1-grams:"
                found = found or in_unigrams
                continue
            if in_unigrams and line:
                fields = line.split()
                if len(fields) >= 2 and fields[1] not in (BOS, EOS, UNK):
                    words.append(fields[1])
    if not found:
        raise ValueError(f"{path}: not an ARPA language model (no \\1-grams: section)")
    return sorted(set(words))


def is_binary_kenlm(path: str | Path) -> bool:
    """True unless the file starts (after blank lines) like an ARPA text file."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    return not head.startswith(_ARPA_MAGIC)


def read_lexicon(path: str | Path, tokenizer: CharTokenizer) -> list[str]:
    """The words of a lexicon file (first column of each line; spellings are re-derived).

    Words with characters outside the tokenizer's alphabet are left out (counted in a warning).
    """
    words, bad = [], 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            if not fields:
                continue
            if all(ch in tokenizer.alphabet[1:] for ch in fields[0]):
                words.append(fields[0])
            else:
                bad += 1
    if bad:
        log.warning("%s: %d words with characters outside the alphabet left out", path, bad)
    return words


def write_lexicon(words: Iterable[str], path: str | Path, tokenizer: CharTokenizer) -> int:
    """Write ``word<TAB>c h a r s`` lines (flashlight's lexicon format); returns the word count.

    The spellings carry no trailing word boundary ``|``: the model emits a space only between
    words, and flashlight's lexicon decoder inserts boundaries between words itself.
    Duplicates and words the alphabet cannot spell (including any with whitespace) are left out.
    """
    seen: set[str] = set()
    lines = []
    for word in words:
        if not word or word in seen or not all(ch in tokenizer.alphabet[1:] for ch in word):
            continue
        if any(ch.isspace() for ch in word):
            continue
        seen.add(word)
        lines.append(f"{word}\t{' '.join(word)}\n")
    Path(path).write_text("".join(lines), encoding="utf-8")
    return len(lines)
