"""Checkpoints of a federated run: the global model after a round, plus where the run stands.

``<run dir>/checkpoint/`` holds ``model/`` (a model directory: what ``fedspeech transcribe``
reads), ``state.json`` (round, per-round history, per-client table, tracking run id, run config)
and, for server optimizers with state (FedAdam), ``strategy.safetensors``. A checkpoint is
written into a temporary sibling folder and swapped in by renames; a crash mid-swap leaves the
previous checkpoint as ``.checkpoint.old-*``, which ``load_checkpoint`` falls back to.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from features.mfcc import FeatureConfig
from features.text import CharTokenizer
from fedspeech.model import ModelConfig
from fedspeech.modeldir import load_model_dir, replace_directory, save_model_dir

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
STRATEGY_FILE = "strategy.safetensors"
_STATE_VERSION = 1


@dataclass(frozen=True)
class RunState:
    """Where a run stands after its last finished round.

    Attributes:
        round: the last finished round (0: none yet).
        history: one ``RoundSummary.to_json()`` per finished round, in order.
        clients: the per-client table (``server.rounds.update_clients``).
        tracking_run_id: the tracker's run id (reopened on resume).
        run_config: the flat run config the run was started with.
        finished: the run reached its last planned round.
    """

    round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    tracking_run_id: str | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    finished: bool = False

    def to_json(self) -> str:
        """Pretty JSON (strict: no NaN)."""
        data = {"version": _STATE_VERSION, **self.__dict__}
        return json.dumps(data, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RunState:
        """Inverse of ``to_json``. Raises ValueError on malformed input."""
        try:
            data = json.loads(text)
            if data.pop("version") != _STATE_VERSION:
                raise ValueError("unknown state.json version")
            return cls(**data)
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a run state: {exc}") from exc


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: weights (plain names), run state, server-optimizer arrays."""

    path: Path
    state_dict: dict[str, Tensor]
    state: RunState
    strategy_arrays: dict[str, np.ndarray]


def save_checkpoint(
    run_dir: str | Path,
    state_dict: Mapping[str, Tensor],
    state: RunState,
    *,
    model_config: ModelConfig,
    feature_config: FeatureConfig,
    tokenizer: CharTokenizer,
    provenance: Mapping[str, Any],
    strategy_arrays: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write ``<run_dir>/checkpoint`` (replacing the previous one); returns its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / CHECKPOINT_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_DIR}.tmp-", dir=run_dir))
    try:
        save_model_dir(
            tmp / "model", state_dict, model_config, feature_config, tokenizer, provenance
        )
        if strategy_arrays:
            from safetensors.numpy import save_file

            save_file(
                {k: np.ascontiguousarray(v) for k, v in strategy_arrays.items()},
                str(tmp / STRATEGY_FILE),
            )
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as fh:
            fh.write(state.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("checkpoint of round %d in %s", state.round, final)
    return final


def load_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The run folder's checkpoint (or the one a crash left mid-swap); None if there is none.

    Raises:
        ValueError: a checkpoint exists but is damaged (its model directory or state.json).
    """
    path = find_checkpoint(Path(run_dir))
    if path is None:
        return None
    loaded = load_model_dir(path / "model")  # validates config and weights, never unpickles
    state = RunState.from_json((path / STATE_FILE).read_text(encoding="utf-8"))
    arrays: dict[str, np.ndarray] = {}
    if (path / STRATEGY_FILE).is_file():
        from safetensors.numpy import load_file

        arrays = load_file(str(path / STRATEGY_FILE))
    return Checkpoint(path, dict(loaded.model.state_dict()), state, arrays)


def find_checkpoint(run_dir: Path) -> Path | None:
    """``run_dir/checkpoint``, else the newest ``.checkpoint.old-*/checkpoint``, else None."""
    final = run_dir / CHECKPOINT_DIR
    if (final / STATE_FILE).is_file():
        return final
    olds = sorted(
        (p / CHECKPOINT_DIR for p in run_dir.glob(f".{CHECKPOINT_DIR}.old-*")),
        key=lambda p: p.stat().st_mtime if p.exists() else 0.0,
    )
    olds = [p for p in olds if (p / STATE_FILE).is_file()]
    return olds[-1] if olds else None
