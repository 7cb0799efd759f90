"""The folders of a benchmark that runs simulations: ``--data-dir``, ``--keep`` and ``--json``."""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def add_folder_args(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` (corpus and feature cache), ``--keep`` (run folders), ``--json``."""
    parser.add_argument("--data-dir", type=Path, help="corpus and feature cache (kept)")
    parser.add_argument("--keep", type=Path, help="run folders and logs here (kept)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")


def parse_round_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Add the folder options, parse, and check ``--rounds`` (round 1 is a warm-up, so at least
    2 are needed for a steady round); log warnings only."""
    add_folder_args(parser)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 includes Ray's warm-up)")
    logging.basicConfig(level=logging.WARNING)
    return args


@contextmanager
def work_folders(args: argparse.Namespace, prefix: str) -> Iterator[tuple[Path, Path]]:
    """``(work, data_dir)``: ``--keep`` or a temporary folder removed after, and ``--data-dir``
    or ``work/data``; both absolute (the Flower processes run elsewhere)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = (args.keep or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        yield work, (args.data_dir or work / "data").resolve()
