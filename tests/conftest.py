"""Shared fixtures and helpers: the real-speech data sets (../shared/data beside the repo), tiny
run configs and models, free ports, processes left running.

Constants and helper functions are imported by the test modules (``from tests.conftest import
TINY_SIMULATION``; pytest imports this file under that name too, so it is loaded once).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fedspeech.app.flower_launch import processes_with_env

if TYPE_CHECKING:
    import torch

    from fedspeech.model import BiGRUCTC


def pytest_configure(config: pytest.Config) -> None:
    """Keep the session's RDP curves (``fedspeech.rdp_store``) out of the user's cache folder:
    one folder for the session, its subprocesses included, none left behind."""
    import tempfile

    from fedspeech.rdp_store import CACHE_ENV

    if CACHE_ENV not in os.environ:
        folder = tempfile.TemporaryDirectory(prefix="fedspeech-test-cache-")
        config.add_cleanup(folder.cleanup)
        os.environ[CACHE_ENV] = folder.name


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


# ------------------------------------------------------------------ tiny configurations
# Shared by several modules: change them here, and every test using them sees the same run.

TINY_SIMULATION: dict[str, Any] = {
    **{"synthetic-utterances": 96, "holdout-speakers": 2, "eval-max-utterances": 8},
    **{"n-mfcc": 13, "n-mels": 40, "hidden-size": 16, "num-layers": 1, "dropout": 0.0},
    **{"batch-size": 8, "epochs": 1, "noise-multiplier": 1.0, "delta": 1e-5, "dp-seed": 0},
}
"""Run config of a tiny DP simulation: 96 synthetic utterances (16 voices), a 1-layer GRU-16."""

TINY_NODE: dict[str, Any] = {
    **{"n-mfcc": 6, "n-mels": 8, "stack": 1, "subsample": 1},
    **{"hidden-size": 4, "num-layers": 1, "dropout": 0.0},
}
"""Run config of a tiny client model on 6-dim frames (examples made of random features)."""


def _devices() -> list[Any]:
    import torch

    no_cuda = pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"
    )
    return ["cpu", pytest.param("cuda", marks=no_cuda)]


DEVICES = _devices()
"""The ``device`` values device-dependent tests run on: ``cpu`` always, ``cuda`` where present."""


def tiny_model(seed: int = 0) -> BiGRUCTC:
    """A 1-layer BiGRU-8 on 6-dim frames, no dropout, seeded with ``torch.manual_seed(seed)``."""
    import torch

    from fedspeech.model import BiGRUCTC
    from fedspeech.model_config import ModelConfig

    torch.manual_seed(seed)
    return BiGRUCTC(ModelConfig(input_dim=6, hidden_size=8, num_layers=1, dropout=0.0))


@dataclass(frozen=True)
class RandomUtterance:
    """A training example of random 6-dim frames (``LabelledFeatures``)."""

    feats: torch.Tensor  # (T, 6)
    labels: torch.Tensor  # (L,) ids in 1..28


def random_utterances(n: int, *, seed: int = 0) -> list[RandomUtterance]:
    """``n`` utterances of 5-11 random frames and 2 labels each, drawn from a generator seeded
    ``seed`` (the same list every call)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [
        RandomUtterance(
            torch.randn(int(torch.randint(5, 12, (1,), generator=g)), 6, generator=g),
            torch.randint(1, 29, (2,), generator=g),
        )
        for _ in range(n)
    ]


# ------------------------------------------------------------------ ports and processes


def run_processes(run_dir: Path) -> list[str]:
    """Command lines of the live processes of a simulation in ``run_dir`` (its ``FLWR_HOME``)."""
    return [_cmdline(pid)[:100] for pid in processes_with_env(f"FLWR_HOME={run_dir / '.flwr'}")]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return f"{pid} (gone)"
