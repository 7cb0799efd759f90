"""atomic_write: the target holds the old or the new content, never part of it; no temp file left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedspeech_features import files
from fedspeech_features.files import atomic_directory, atomic_write


def test_writes_text_and_bytes_replacing_the_old_content(tmp_path: Path) -> None:
    # Arrange
    target = tmp_path / "ledger.json"
    target.write_text("old", encoding="utf-8")
    # Execute
    returned = atomic_write(str(target), "néw\n")
    # Assert
    assert returned == target and target.read_bytes() == "néw\n".encode()
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failure_mid_write_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    # Arrange: the disk takes the first 4 bytes, then fails
    target = tmp_path / "manifest.tsv"
    target.write_text("old content", encoding="utf-8")
    real_write = os.write
    calls = []

    def failing_write(fd: int, data: bytes | memoryview) -> int:
        calls.append(len(data))
        if len(calls) > 1:
            raise error
        return real_write(fd, bytes(data[:4]))

    monkeypatch.setattr(files.os, "write", failing_write)
    # Execute
    with pytest.raises(type(error)):
        atomic_write(target, "new content that is long")
    # Assert
    assert len(calls) == 2  # it did write part of the new content somewhere
    assert target.read_text(encoding="utf-8") == "old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.tsv"]


def test_a_failed_rename_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "tracking.json"
    target.write_text("old", encoding="utf-8")

    def failing_replace(src: str | Path, dst: str | Path) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(PermissionError):
        atomic_write(target, "new")
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tracking.json"]


def test_the_temp_file_lies_beside_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a rename across file systems would not be atomic: the temp file must share the folder
    renamed: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src: str | Path, dst: str | Path) -> None:
        renamed.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", spy)
    atomic_write(tmp_path / "a.json", "{}")
    [(src, dst)] = renamed
    assert src.parent == dst.parent == tmp_path and src.name.endswith(".tmp")


def test_durable_writes_fsync_the_file_and_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", spy)
    atomic_write(tmp_path / "ledger.json", "{}")
    assert len(synced) == 2  # the data before the rename, the folder after it
    synced.clear()
    atomic_write(tmp_path / "entry.safetensors", b"x", durable=False)
    assert synced == []


def test_mode_is_exact_and_the_default_follows_the_umask(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "private.json", "{}", mode=0o600)
        atomic_write(tmp_path / "shared.tsv", "x", mode=0o644)
        atomic_write(tmp_path / "plain.json", "{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "shared.tsv").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o644  # 0o666 less the umask


def test_atomic_directory_replaces_the_folder_whole_or_not_at_all(tmp_path: Path) -> None:
    # Prepare: a finished folder
    final = tmp_path / "model"
    final.mkdir()
    (final / "a.txt").write_text("old", encoding="utf-8")
    # Execute: a build that fails half-way, then one that finishes
    with pytest.raises(KeyboardInterrupt), atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("half", encoding="utf-8")
        raise KeyboardInterrupt
    after_failure = sorted(p.name for p in tmp_path.iterdir())
    kept = (final / "a.txt").read_text(encoding="utf-8")
    with atomic_directory(final) as tmp:
        (tmp / "b.txt").write_text("new", encoding="utf-8")
    # Assert: the failed build left the old folder and no temporary one; the next replaced it
    assert after_failure == ["model"] and kept == "old"
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
