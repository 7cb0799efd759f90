"""Console logging for the CLI: one format, level from -v/-q."""

from __future__ import annotations

import logging
import sys


def setup_logging(verbosity: int = 0) -> None:
    """Log to stderr: WARNING with -q (verbosity < 0), INFO by default, DEBUG with -v."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    root = logging.getLogger()
    if root.handlers:  # embedded (tests, notebooks): keep the host's handlers
        root.setLevel(level)
    else:
        logging.basicConfig(
            level=level,
            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            stream=sys.stderr,
        )
    # Third-party chatter that drowns the pipeline's own progress lines.
    for noisy in ("numba", "matplotlib", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# Top-level loggers of our packages (``fedspeech.*`` names and the modules' ``__name__``).
OUR_LOGGERS = ("fedspeech", "fedspeech_client", "fedspeech_server", "fedspeech_features")


def show_progress(names: tuple[str, ...] = OUR_LOGGERS, level: int = logging.INFO) -> None:
    """Print our own loggers' records in a Flower process (its output is what users see).

    Only fedspeech's loggers get a handler: the root logger stays untouched, so Flower's and
    httpx's records are not printed twice. Where the root logger has handlers already (this
    process set up its logging: the ``fedspeech`` command with ``--engine local``, whose apps
    run in its own process and its workers), the records go to them, in their format.
    """
    has_own = bool(logging.getLogger().handlers)
    for name in names:
        logger = logging.getLogger(name)
        if not logger.handlers and not has_own:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(level)
