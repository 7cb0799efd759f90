"""Error types and the skip report shared by every batch reader: bad items are named, counted, skipped."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field


class FedspeechDataError(ValueError):
    """Base class of data errors; the message always names the offending item."""


class AudioError(FedspeechDataError):
    """An audio file that cannot be used (unreadable, corrupt, empty, too short/long, non-finite)."""


class TextError(FedspeechDataError):
    """A transcript that cannot be mapped onto the tokenizer's alphabet (or is empty)."""


class ManifestError(FedspeechDataError):
    """A manifest that is not in the ``path  transcript  speaker  duration_s`` TSV format."""


@dataclass(frozen=True)
class Skipped:
    """One item a batch reader left out, and why."""

    item: str
    reason: str


@dataclass
class SkipReport:
    """Counts of kept and skipped items of one batch operation (a corpus build, a feature pass...)."""

    what: str
    kept: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    def skip(self, item: object, reason: str | BaseException) -> None:
        """Record ``item`` as skipped and log the reason as a warning naming it."""
        entry = Skipped(str(item), str(reason))
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

    def merge(self, other: SkipReport) -> None:
        """Add another report's counts to this one."""
        self.kept += other.kept
        self.skipped.extend(other.skipped)
