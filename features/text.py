"""Transcript normalisation and the character tokenizer (blank = 0, space, apostrophe, a-z)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from num2words import num2words

from fedspeech_features.errors import TextError

BLANK = "<blank>"
# Index 0 is the CTC blank; the order is part of the model-directory contract (config.json).
DEFAULT_ALPHABET: tuple[str, ...] = (BLANK, " ", "'", *"abcdefghijklmnopqrstuvwxyz")

_SYMBOL_WORDS = {"%": " percent ", "&": " and ", "+": " plus ", "@": " at ", "=": " equals "}
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'"})
# Punctuation that separates words; anything else not in the alphabet is an error.
_SEPARATORS = re.compile(
    r"[\s\.,;:!\?\"\(\)\[\]\{\}\-\u2013\u2014/\\_\u201c\u201d\u00ab\u00bb\u2026*#~|<>]+"
)
# Lower-case letters that NFKD does not split into base letter + accent.
_LIGATURES = str.maketrans(
    {"ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "ı": "i"}
)
# "1,000,000" (thousands groups) or "42"; then a decimal part ("2.5", European "2,5") or an
# ordinal suffix that ends the word ("3rd", but not the "st" of "4stars").
_NUMBER = re.compile(
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
    r"(?:[.,](?P<frac>\d+)|(?P<ord>st|nd|rd|th)(?![a-z]))?"
)
_YEAR = re.compile(r"1[1-9]\d\d|20\d\d")


def _number_to_words(match: re.Match[str]) -> str:
    """Spell one ``_NUMBER`` match: '42', '3rd', '1999' (a year), '2.05', '10,000'.

    Raises:
        TextError: num2words cannot spell it (e.g. too large).
    """
    digits, frac, ordinal = match["int"], match["frac"], match["ord"]
    try:
        value = int(digits.replace(",", ""))  # ValueError past Python's 4300-digit limit
        if ordinal:
            words = num2words(value, to="ordinal")
        elif frac is None and _YEAR.fullmatch(digits):  # years read as years: 1999, 2024
            words = num2words(value, to="year")
        else:
            words = num2words(value)
            if frac is not None:
                # Digit by digit: exact for any length, unlike num2words(float).
                words += " point " + " ".join(num2words(int(d)) for d in frac)
    except (OverflowError, ValueError, NotImplementedError) as exc:
        raise TextError(f"cannot spell out the number {match.group(0)!r} ({exc})") from exc
    return " " + words.replace("-", " ").replace(",", " ") + " "


def normalize_transcript(text: str) -> str:
    """Map a raw transcript onto the tokenizer's alphabet.

    Lower-cases, folds accents (é -> e, ß -> ss), spells out numbers and a few symbols, turns
    punctuation into spaces, keeps word-internal apostrophes and collapses whitespace.

    Raises:
        TextError: characters remain that have no spelling in the alphabet (the message lists them).

    >>> normalize_transcript("It's 3 o'clock, Zoë!")
    "it's three o'clock zoe"
    """
    out = unicodedata.normalize("NFKD", text).translate(_APOSTROPHES)
    out = "".join(ch for ch in out if not unicodedata.combining(ch)).lower().translate(_LIGATURES)
    out = _NUMBER.sub(_number_to_words, out)
    for sym, word in _SYMBOL_WORDS.items():
        out = out.replace(sym, word)
    out = _SEPARATORS.sub(" ", out)
    out = re.sub(r"(?<![a-z])'+|'+(?![a-z])", " ", out)  # quotes, not word-internal apostrophes
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
            raise TextError(
                f"character {exc.args[0]!r} of {text!r} is not in the alphabet"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        """Text of label ids (blanks dropped; no CTC collapsing: see the decoders for that).

        Raises:
            ValueError: an id outside ``0..vocab_size-1``.
        """
        n = len(self.alphabet)
        # Checked explicitly: a negative id would silently index from the end of the alphabet.
        bad = [int(i) for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"label ids {bad[:5]} outside the alphabet (0..{n - 1})")
        return "".join(self.alphabet[i] for i in ids if i != 0)

    def to_dict(self) -> dict[str, list[str]]:
        """JSON-serialisable form stored in a model directory's config.json."""
        return {"alphabet": list(self.alphabet)}

    @classmethod
    def from_dict(cls, data: dict[str, list[str]]) -> CharTokenizer:
        return cls(data["alphabet"])
