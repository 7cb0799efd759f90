"""Error types and the skip report shared by every batch reader: bad items are named, counted, skipped."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field


class FedspeechDataError(ValueError):
    """Base class of data errors; the message always names the offending item."""


class AudioError(FedspeechDataError):
    """An audio file that cannot be used (unreadable, corrupt, empty, too short/long, non-finite)."""


class SampleRateError(AudioError):
    """Audio recorded at a sample rate too low to carry speech (below 8 kHz)."""


class TextError(FedspeechDataError):
    """A transcript that cannot be mapped onto the tokenizer's alphabet (or is empty)."""


class ManifestError(FedspeechDataError):
    """A manifest that is not in the ``path  transcript  speaker  duration_s`` TSV format."""


@dataclass(frozen=True)
class Skipped:
    """One item a batch reader left out, and why.

    ``kind`` sorts the reasons into a few counts (e.g. ``audio``, ``sample-rate``,
    ``transcript``, ``ctc-infeasible``) that can be reported without naming any item.
    """

    item: str
    reason: str
    kind: str = "other"


@dataclass
class SkipReport:
    """Counts of kept and skipped items of one batch operation (a corpus build, a feature pass...)."""

    what: str
    kept: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    def skip(self, item: object, reason: str | BaseException, kind: str = "other") -> None:
        """Record ``item`` as skipped (a ``kind`` of reason) and log a warning naming it."""
        entry = Skipped(str(item), str(reason), kind)
        self.skipped.append(entry)
        # Error messages already start with the item's name: don't print it twice.
        message = (
            entry.reason if entry.reason.startswith(entry.item) else f"{entry.item}: {entry.reason}"
        )
        logging.getLogger("fedspeech").warning("%s: skipped %s", self.what, message)

    def log_summary(self, logger: logging.Logger | None = None) -> None:
        """Log one line: how many items were kept and how many skipped."""
        log = logger or logging.getLogger("fedspeech")
        level = logging.WARNING if self.skipped else logging.INFO
        log.log(level, "%s: kept %d, skipped %d", self.what, self.kept, len(self.skipped))

    def counts(self) -> dict[str, int]:
        """Skipped items per ``kind``."""
        out: dict[str, int] = {}
        for entry in self.skipped:
            out[entry.kind] = out.get(entry.kind, 0) + 1
        return out

    def merge(self, other: SkipReport) -> None:
        """Add another report's counts to this one."""
        self.kept += other.kept
        self.skipped.extend(other.skipped)
