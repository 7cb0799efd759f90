"""Tracking records waiting for MLflow, kept in the run folder so an outage or a crash loses none.

``tracking_buffer.jsonl`` holds one JSON operation per line (``{"op": "metrics", "run_id": ...}``)
while MLflow is unreachable; ``mlflow_runs.json`` maps placeholder run ids (handed out before
MLflow answered) to the MLflow runs created for them later. Plain JSON: no MLflow import here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedspeech_features.files import atomic_write

__all__ = ["BUFFER_FILE", "RUN_IDS_FILE", "Op", "load_ops", "read_run_ids", "remember_run_id"]

log = logging.getLogger(__name__)

BUFFER_FILE = "tracking_buffer.jsonl"
RUN_IDS_FILE = "mlflow_runs.json"

Op = dict[str, Any]


def load_ops(path: Path) -> list[Op]:
    """The operations in a buffer file, in order (none if the file is missing)."""
    if not path.is_file():
        return []
    ops: list[Op] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            op = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d is not JSON; skipped", path, number)
            continue
        if isinstance(op, dict) and "op" in op:
            ops.append(op)
    return ops


def save_ops(path: Path, ops: Sequence[Op]) -> None:
    """Replace the buffer file with ``ops`` (atomically); remove it when there are none."""
    if not ops:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(op, default=str) + "\n" for op in ops))


def read_run_ids(folder: Path) -> dict[str, str]:
    """Placeholder run id -> MLflow run id, as recorded in ``folder``."""
    try:
        data = json.loads((folder / RUN_IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def remember_run_id(folder: Path, placeholder: str, run_id: str) -> None:
    """Record that ``placeholder`` stands for the MLflow run ``run_id``."""
    ids = {**read_run_ids(folder), placeholder: run_id}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / RUN_IDS_FILE, json.dumps(ids, indent=2) + "\n")
