"""Atomic writes: a reader (or a restart after a crash) sees the old file or folder or the new one.

Every file fedspeech replaces in place (manifests, feature-cache entries, privacy ledgers, the
tracking records, language models, build and split records) is written through
:func:`atomic_write`, every folder (model directories, checkpoints) through
:func:`atomic_directory`. They live in the bottom layer so that every layer can use them.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"  # a temporary file left by a crash ends so (e.g. to be swept up)


def atomic_write(
    path: str | Path,
    data: str | bytes,
    *,
    mode: int | None = None,
    durable: bool = True,
) -> Path:
    """Replace ``path`` with ``data`` (str: written as UTF-8, newlines as they are) atomically.

    The data goes to a temporary file of a name of its own in the same folder (so that two
    writers of one file never share it, and the final rename stays within one file system), which
    is then renamed over ``path`` with ``os.replace``: readers see the old or the new content,
    never part of it. If anything fails before the rename (a full disk, an exception), ``path`` is
    left as it was and the temporary file is removed.

    Args:
        path: the file to write; its folder must exist.
        data: the whole content.
        mode: permission bits of the file (e.g. ``0o600`` for a file only its owner may read);
            None: as ``open`` would create it (``0o666`` less the umask).
        durable: fsync the file before the rename, and the folder after it, so that once this
            returns the new content survives a power cut too (a privacy ledger must not lose a
            charged round). False only for files that are cheap to recompute and written by the
            thousand (feature-cache entries), where an fsync each would cost more than a redo.

    Returns:
        ``path`` as a Path.

    Raises:
        OSError: the file could not be written (``path`` is unchanged).
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = _create_temp(path, 0o666 if mode is None else mode)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_folder(path.parent)
    return path


def _create_temp(path: Path, mode: int) -> tuple[int, Path]:
    """A new, empty temporary file beside ``path``: (open descriptor, its path).

    Created with ``O_EXCL`` under a random name, so that concurrent writers each get their own.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:  # 48 random bits taken: draw again
            continue


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; some file systems cannot fsync a folder (ignored)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        log.debug("cannot open %s to fsync it: %s", folder, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        log.debug("cannot fsync %s: %s", folder, exc)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Build a folder that replaces ``final`` whole: yields an empty temporary folder beside it.

    When the block ends normally the folder takes ``final``'s place (:func:`replace_directory`);
    when it raises (Ctrl-C included) the temporary folder is removed and ``final`` is untouched.
    Files written into the folder should be durable themselves (``atomic_write`` or an fsync).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(new: Path, final: Path) -> None:
    """Move the finished folder ``new`` to ``final``, replacing any folder there.

    The old folder is moved aside first and removed only once the new one is in place, so a crash
    leaves either the old or the new folder at ``final``, never a half-written one.
    """
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, final)


def remove_paths(folder: Path, names: Iterable[str]) -> None:
    """Remove each of ``names`` under ``folder``: a folder with all it holds, a file; absent: nothing."""
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
