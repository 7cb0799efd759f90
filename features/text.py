"""Transcript normalisation and the character tokenizer (blank = 0, space, apostrophe, a-z)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from num2words import num2words

from features.errors import TextError

BLANK = "<blank>"
# Index 0 is the CTC blank; the order is part of the model-directory contract (config.json).
DEFAULT_ALPHABET: tuple[str, ...] = (BLANK, " ", "'", *"abcdefghijklmnopqrstuvwxyz")

_SYMBOL_WORDS = {"%": " percent ", "&": " and ", "+": " plus ", "@": " at ", "=": " equals "}
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'"})
# Punctuation that separates words; anything else not in the alphabet is an error.
_SEPARATORS = re.compile(r"[\s\.,;:!\?\"\(\)\[\]\{\}\-\u2013\u2014/\\_\u201c\u201d\u00ab\u00bb\u2026*#~|<>]+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?(?:st|nd|rd|th)?")


def _number_to_words(token: str) -> str:
    """'42' -> 'forty-two', '3rd' -> 'third', '1999' -> 'nineteen ninety-nine', '2.5' -> 'two point five'."""
    suffix = token[-2:] if token[-2:] in ("st", "nd", "rd", "th") else ""
    digits = token[: -len(suffix)] if suffix else token
    if suffix:
        words = num2words(int(digits), to="ordinal")
    elif re.fullmatch(r"1[1-9]\d\d|20\d\d", digits):  # years read as years: 1999, 2024
        words = num2words(int(digits), to="year")
    else:
        words = num2words(float(digits.replace(",", ".")) if re.search(r"[.,]", digits) else int(digits))
    return " " + words.replace("-", " ").replace(",", " ") + " "


def normalize_transcript(text: str) -> str:
    """Map a raw transcript onto the tokenizer's alphabet.

    Lower-cases, folds accents (é -> e), spells out digits and a few symbols, turns punctuation
    into spaces, keeps word-internal apostrophes and collapses whitespace.

    Raises:
        TextError: characters remain that have no spelling in the alphabet (the message lists them).

    >>> normalize_transcript("It's 3 o'clock, Zoë!")
    "it's three o'clock zoe"
    """
    out = unicodedata.normalize("NFKD", text).translate(_APOSTROPHES)
    out = "".join(ch for ch in out if not unicodedata.combining(ch)).lower()
    out = _NUMBER.sub(lambda m: _number_to_words(m.group(0)), out)
    for sym, word in _SYMBOL_WORDS.items():
        out = out.replace(sym, word)
    out = _SEPARATORS.sub(" ", out)
    out = re.sub(r"(^|\s)'+|'+(\s|$)", " ", out)  # quotes, not apostrophes
    out = " ".join(out.split())
    bad = sorted({ch for ch in out if ch not in DEFAULT_ALPHABET[1:]})
    if bad:
        raise TextError(f"cannot map characters {''.join(bad)!r} in transcript {text!r}")
    return out


class CharTokenizer:
    """Characters <-> ids for CTC. Id 0 is the blank; ``encode`` never emits it.

    >>> tok = CharTokenizer()
    >>> tok.encode("hi")
    [10, 11]
    >>> tok.decode([10, 11])
    'hi'
    """

    def __init__(self, alphabet: Sequence[str] = DEFAULT_ALPHABET) -> None:
        if not alphabet or alphabet[0] != BLANK:
            raise ValueError(f"alphabet must start with the blank symbol {BLANK!r}")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has duplicate symbols")
        self.alphabet: tuple[str, ...] = tuple(alphabet)
        self._ids = {ch: i for i, ch in enumerate(self.alphabet)}

    @property
    def blank_id(self) -> int:
        return 0

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        """Ids of a normalised transcript. Raises TextError for empty text or unknown characters."""
        if not text.strip():
            raise TextError("empty transcript")
        try:
            return [self._ids[ch] for ch in text if ch != BLANK]
        except KeyError as exc:
            raise TextError(f"character {exc.args[0]!r} of {text!r} is not in the alphabet") from None

    def decode(self, ids: Sequence[int]) -> str:
        """Text of label ids (blanks dropped; no CTC collapsing: see the decoders for that)."""
        return "".join(self.alphabet[i] for i in ids if i != 0)

    def to_dict(self) -> dict[str, list[str]]:
        """JSON-serialisable form stored in a model directory's config.json."""
        return {"alphabet": list(self.alphabet)}

    @classmethod
    def from_dict(cls, data: dict[str, list[str]]) -> CharTokenizer:
        return cls(data["alphabet"])
