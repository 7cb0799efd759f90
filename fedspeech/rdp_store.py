"""RDP curves on disk, shared by every process of this user: a noise calibration is done once.

A client that sets ``target-epsilon`` calibrates its noise multiplier on its first round
(``privacy_ledger.calibrate_noise_multiplier``: Opacus's bisection, 14-15 RDP curves of the
sampled Gaussian mechanism, each a new noise multiplier; 1.2-1.3 s here, docs/benchmarks.md).
``privacy_ledger`` keeps the curves in memory, but every process starts empty: each local-engine
worker and Ray actor, each run, each client of an experiment paid it again for the same sample
rate. The curves are a pure function of (noise multiplier, sample rate, orders) and of Opacus's
RDP code, so they are kept here too, bit for bit.

An entry is one file: a JSON header line (the noise multiplier and sample rate as Python writes
them, the orders, the digest of Opacus's ``rdp.py`` and the payload's SHA-256) and the curve's
float64 bytes. It is read only if every field matches the request and the payload its digest;
anything else is recomputed (a warning names the file) and written again. Files are written
atomically. The folder is ``$FEDSPEECH_CACHE_DIR/rdp`` (default ``$XDG_CACHE_HOME/fedspeech``,
else ``~/.cache/fedspeech``); ``FEDSPEECH_CACHE_DIR=""`` keeps the curves in memory only, as does
a folder that cannot be written (one log line at INFO per process).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedspeech_features.files import atomic_write

log = logging.getLogger(__name__)

CACHE_ENV = "FEDSPEECH_CACHE_DIR"
_FORMAT = 1


def cache_dir() -> Path | None:
    """The user's fedspeech cache folder (``$FEDSPEECH_CACHE_DIR``; empty: none)."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return Path(chosen).expanduser() if chosen.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "fedspeech"


class CurveStore:
    """RDP curves of one Opacus ``rdp.py`` (``code_digest``) at ``orders``, under ``root``.

    Attributes:
        hits, misses, damaged: lookups answered from disk, not found, found unusable.
    """

    def __init__(self, root: Path, orders: Sequence[float], code_digest: str) -> None:
        self.orders = [float(a) for a in orders]
        self.code_digest = code_digest
        self.dir = root / "rdp" / _digest(f"{_FORMAT} {code_digest} {self.orders!r}")[:16]
        self.hits = self.misses = self.damaged = 0
        self._writable = True

    def path(self, sigma: float, q: float) -> Path:
        """The file of the curve at (``sigma``, ``q``)."""
        name = _digest(f"{sigma!r} {q!r}")
        return self.dir / name[:2] / f"{name}.rdp"

    def get(self, sigma: float, q: float) -> np.ndarray | None:
        """The stored curve (float64, one value per order), or None."""
        path = self.path(sigma, q)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as exc:
            log.warning("RDP curve %s: cannot read (%s); computing it", path, exc)
            self.misses += 1
            return None
        curve = self._parse(data, sigma, q)
        if curve is None:
            log.warning("RDP curve %s: damaged or not this request's; computing it again", path)
            self.damaged += 1
            return None
        self.hits += 1
        return curve

    def put(self, sigma: float, q: float, curve: np.ndarray) -> None:
        """Store ``curve`` (float64, one value per order); a folder that cannot be written
        turns the store off for this process (one log line)."""
        if not self._writable:
            return
        payload = np.ascontiguousarray(curve, dtype=np.float64).tobytes()
        header = self._header(sigma, q, payload)
        path = self.path(sigma, q)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, header + b"\n" + payload, durable=False)
        except OSError as exc:
            self._writable = False  # not an error: the curves stay in memory, as before
            log.info("RDP curves are not kept on disk: %s (%s)", self.dir, exc)

    def _header(self, sigma: float, q: float, payload: bytes) -> bytes:
        fields = {
            "format": _FORMAT,
            "sigma": repr(sigma),
            "q": repr(q),
            "orders": self.orders,
            "code": self.code_digest,
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        return json.dumps(fields, sort_keys=True).encode()

    def _parse(self, data: bytes, sigma: float, q: float) -> np.ndarray | None:
        head, sep, payload = data.partition(b"\n")
        if not sep or len(payload) != 8 * len(self.orders):
            return None
        if head != self._header(sigma, q, payload):  # every field, the digest included
            return None
        curve = np.frombuffer(payload, dtype=np.float64).copy()
        return None if bool(np.isnan(curve).any()) else curve


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def source_digest(path: Path) -> str:
    """SHA-256 of a source file's bytes (read once per process)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
