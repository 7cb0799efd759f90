"""Checkpoints of a federated run: the global model after a round, plus where the run stands.

``<run dir>/checkpoint/`` holds ``model/`` (a model directory: what ``fedspeech transcribe``
reads), ``state.json`` (round, per-round history, per-client table, tracking run id, run config,
user-level privacy ledger)
and, for server optimizers with state (FedAdam), ``strategy.safetensors``, and last
``manifest.json``: the size and SHA-256 of every other file. A checkpoint is written into a
temporary sibling folder (files fsynced) and swapped in by renames; a crash mid-swap leaves the
previous checkpoint as ``.checkpoint.old-*``, which ``load_checkpoint`` falls back to. Loading
checks the manifest first: a truncated, missing or altered file is detected, never loaded; an
intact older checkpoint is used if there is one, else ``CheckpointError`` says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from fedspeech.model_config import ModelConfig
from fedspeech.modeldir import load_model_dir, save_model_dir
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.files import atomic_directory, atomic_write
from fedspeech_features.text import CharTokenizer

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
STRATEGY_FILE = "strategy.safetensors"
MANIFEST_FILE = "manifest.json"
_STATE_VERSION = 1
_MANIFEST_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is incomplete or damaged (the message names the file and the problem)."""


@dataclass(frozen=True)
class RunState:
    """Where a run stands after its last finished round.

    Attributes:
        round: the last finished round (0: none yet).
        history: one ``RoundSummary.to_json()`` per finished round, in order.
        clients: the per-client table (``fedspeech_server.rounds.update_clients``).
        tracking_run_id: the tracker's run id (reopened on resume).
        run_config: the flat run config the run was started with.
        finished: the run reached its last planned round.
        user_privacy: the user-level DP state (``fedspeech_server.user_dp.UserDPState.to_dict``): saved
            with the round it charges, so a resumed run neither loses nor repeats a round.
        run_key: a random id of the run, the same across resumes, sent to the clients with every
            train message (``run-key``) so that a client can tell a round it was already
            charged for (an attempt cut off by an interruption) from a new one.
    """

    round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    tracking_run_id: str | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    user_privacy: dict[str, Any] = field(default_factory=dict)
    run_key: str = ""

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
    with atomic_directory(final) as tmp:
        save_model_dir(
            tmp / "model", state_dict, model_config, feature_config, tokenizer, provenance
        )
        if strategy_arrays:
            from safetensors.numpy import save_file

            save_file(
                {k: np.ascontiguousarray(v) for k, v in strategy_arrays.items()},
                str(tmp / STRATEGY_FILE),
            )
        atomic_write(tmp / STATE_FILE, state.to_json())
        manifest = {"version": _MANIFEST_VERSION, "files": _describe_files(tmp)}
        atomic_write(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.debug("checkpoint of round %d in %s", state.round, final)
    return final


def load_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The run folder's newest intact checkpoint; None if there is none.

    The current one, else (a crash mid-swap, a damaged current one) the newest intact
    ``.checkpoint.old-*``.

    Raises:
        CheckpointError: checkpoints exist but none is intact (the message says what is wrong).
    """
    candidates = checkpoint_candidates(Path(run_dir))
    errors: list[str] = []
    for path in candidates:
        try:
            checkpoint = _load(path)
        except (ValueError, OSError) as exc:
            log.error("checkpoint %s is damaged, not loaded: %s", path, exc)
            errors.append(f"{path}: {exc}")
            continue
        if errors:
            log.warning(
                "using the older intact checkpoint %s (round %d)", path, checkpoint.state.round
            )
        return checkpoint
    if errors:
        raise CheckpointError("no intact checkpoint: " + "; ".join(errors))
    return None


def verify_checkpoint(path: Path) -> None:
    """Check every file of the checkpoint folder ``path`` against its ``manifest.json``.

    A checkpoint written before manifests existed is accepted with a warning.

    Raises:
        CheckpointError: the manifest is unreadable, or a file is missing, of another size or
            of another SHA-256 than it records.
    """
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        log.warning("%s has no %s (an older fedspeech wrote it): not verified", path, MANIFEST_FILE)
        return
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("version") != _MANIFEST_VERSION or not isinstance(files, dict):
            raise ValueError("unknown manifest format")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    for name, expected in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST_FILE})")
        size = file.stat().st_size
        if size != expected.get("size"):
            raise CheckpointError(
                f"{file}: {size} bytes, {expected.get('size')} written: truncated or altered"
            )
        if _sha256(file) != expected.get("sha256"):
            raise CheckpointError(f"{file}: content differs from what was written (SHA-256)")


def _load(path: Path) -> Checkpoint:
    verify_checkpoint(path)
    loaded = load_model_dir(path / "model")  # validates config and weights, never unpickles
    state = RunState.from_json((path / STATE_FILE).read_text(encoding="utf-8"))
    arrays: dict[str, np.ndarray] = {}
    if (path / STRATEGY_FILE).is_file():
        from safetensors.numpy import load_file

        arrays = load_file(str(path / STRATEGY_FILE))
    return Checkpoint(path, dict(loaded.model.state_dict()), state, arrays)


def find_checkpoint(run_dir: Path) -> Path | None:
    """``run_dir/checkpoint``, else the newest ``.checkpoint.old-*/checkpoint``, else None."""
    candidates = checkpoint_candidates(run_dir)
    return candidates[0] if candidates else None


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """Checkpoint folders holding a state file: the current one first, then older, newest first."""
    final = run_dir / CHECKPOINT_DIR
    olds = sorted(
        (p / CHECKPOINT_DIR for p in run_dir.glob(f".{CHECKPOINT_DIR}.old-*")),
        key=lambda p: p.stat().st_mtime if p.exists() else 0.0,
        reverse=True,
    )
    return [p for p in [final, *olds] if (p / STATE_FILE).is_file()]


def _describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> size and SHA-256 of every file under ``folder`` (each fsynced first)."""
    out: dict[str, dict[str, Any]] = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
        out[file.relative_to(folder).as_posix()] = {
            "size": file.stat().st_size,
            "sha256": _sha256(file),
        }
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
