"""A node's examples kept in memory between rounds, for as long as its files are unchanged.

A ClientApp process serves many rounds (a Flower SuperNode's, a Ray actor, a local-engine worker),
and every round used to read the node's features again from the on-disk cache: hash each audio
file, load and check its tensor, normalise and encode its transcript. That is ~0.4 ms an
utterance, 50 ms a round for a 130-utterance node (docs/benchmarks.md, "Federation overhead");
outside the round's own ``seconds``, it is pure overhead.

An entry is used again only while the manifest and every audio file it names (the kept and the
skipped ones) have the same size and modification time (``st_mtime_ns``, as git's index checks
its files), and the feature settings and cache folder are the same. Anything else (an edited,
added, removed or repaired file) reads the manifest again. Entries are evicted, least recently
used first, past ``budget_bytes`` of tensors per process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fedspeech_features.dataset import Example
from fedspeech_features.errors import SkipReport
from fedspeech_features.feature_config import FeatureConfig

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 256 * 2**20  # per process: a few nodes' features at the 10,000-client size

_Stat = tuple[int, int] | None  # (size, mtime_ns); None: the file is missing
Loaded = tuple[list[Example], SkipReport]


@dataclass(frozen=True)
class _Entry:
    signature: tuple[tuple[str, _Stat], ...]
    loaded: Loaded
    nbytes: int


def _stat(path: str | Path) -> _Stat:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _signature(manifest: Path, paths: Iterable[str]) -> tuple[tuple[str, _Stat], ...]:
    return tuple((p, _stat(p)) for p in (str(manifest), *paths))


def _nbytes(examples: list[Example]) -> int:
    return sum(
        e.feats.numel() * e.feats.element_size() + e.labels.numel() * e.labels.element_size()
        for e in examples
    )


class ExampleMemo:
    """Loaded examples per (manifest, feature settings, cache folder), checked against the files.

    Thread-safe; one per process (``MEMO``).
    """

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[str, FeatureConfig, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held now."""
        return sum(entry.nbytes for entry in self._entries.values())

    def get(
        self,
        manifest: Path,
        features: FeatureConfig,
        cache_dir: Path | None,
        load: Callable[[], Loaded],
    ) -> tuple[Loaded, bool]:
        """The examples of ``manifest``: the kept ones when unchanged, else ``load()`` (kept).

        Returns:
            ``(examples, report)`` and whether they came from memory.
        """
        key = (str(manifest.resolve()), features, str(cache_dir))
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None:
            if _signature(manifest, (p for p, _ in entry.signature[1:])) == entry.signature:
                with self._lock:
                    self._entries.move_to_end(key)
                    self.hits += 1
                return entry.loaded, True
            log.info("%s: its files changed since they were read; reading them again", manifest)
        before = _stat(manifest)  # before reading: a change made while reading is seen next time
        examples, report = loaded = load()
        paths = [str(e.path) for e in examples] + [s.item for s in report.skipped]
        signature = ((str(manifest), before), *_signature(manifest, paths)[1:])
        new = _Entry(signature, loaded, _nbytes(examples))
        with self._lock:
            self.misses += 1
            self._entries.pop(key, None)
            if new.nbytes <= self.budget_bytes:
                self._entries[key] = new
            while self.nbytes > self.budget_bytes:
                self._entries.popitem(last=False)
        return loaded, False


MEMO = ExampleMemo()
