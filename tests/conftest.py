"""Shared fixtures: where the real-speech data sets live (../shared/data beside the repo)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo root>/../shared/data`` (or ``$FEDSPEECH_SHARED_DATA``); skips the test if absent."""
    override = os.environ.get("FEDSPEECH_SHARED_DATA")
    root = (
        Path(override)
        if override
        else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
    if not root.is_dir():
        pytest.skip(
            "../shared/data not found: real-speech tests need the shared data sets beside the repo"
        )
    return root


@pytest.fixture()
def flower_server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a ServerApp process: messages built outside one need it."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Tiny models train faster on one thread, and 2 threads on a shared 2-core box can stall."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
