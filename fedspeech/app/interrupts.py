"""Ctrl-C and SIGTERM in the launching process: how a run is stopped, and when it must not be.

``stop_on_signals`` makes both raise ``KeyboardInterrupt`` (the launchers' cleanup of Flower, Ray
or the local engine's workers runs on the way out) and remembers that one came. Python drops an
exception raised where it calls Python code from C (a finalizer, a weakref callback: "Exception
ignored in ..."), and a signal handler runs wherever the main thread happens to be, so such a
``KeyboardInterrupt`` can be lost; ``raise_if_interrupted``, called by the launchers' wait loops,
raises it again. ``interrupts_ignored`` holds both signals off where stopping must not be cut
short.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger("fedspeech")

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_interrupted = threading.Event()


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` in the main thread, and are remembered."""
    _interrupted.clear()

    def _stop(signum: int, frame: FrameType | None) -> None:
        _interrupted.set()
        raise KeyboardInterrupt

    for sig in _STOP_SIGNALS:
        signal.signal(sig, _stop)


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a signal came (``stop_on_signals``) and the run goes on:
    its first ``KeyboardInterrupt`` was lost (module docstring)."""
    if _interrupted.is_set():
        log.warning("an interrupt came but did not stop the run (Python dropped it): stopping now")
        raise KeyboardInterrupt


@contextmanager
def interrupts_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM are ignored inside (when there is nothing left to stop, or stopping
    must not be cut short); only the main thread can set handlers, elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
