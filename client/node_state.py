"""Where a client node's data, feature cache and privacy ledger live, and the ledger on disk.

A node's ``node_config`` says where its data is:

* ``manifest = "/data/site-a/manifest.tsv"`` (a real node): the node's own manifest; its folder
  (or ``data-dir`` if given) holds the feature cache and the privacy ledger, so a restarted node
  keeps its history across rounds *and* runs: the budget is a lifetime budget.
* ``data-dir = "/data/site-a"`` alone: the manifest is ``<data-dir>/manifest.tsv``.
* neither (a simulated node): ``partition-id`` / ``num-partitions`` (set by Flower's simulation
  engine) pick a partition of the run config's corpus under the run's ``data-dir``, and the ledger
  lives in the run folder (``<out-dir>/client-state/``), so ``resume`` continues it and a fresh run
  starts a fresh one.

Optional per-node keys: ``epsilon-budget`` (overrides the run config) and ``threads``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from client.privacy import PrivacyState
from fedspeech.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

LEDGER_DIR = ".fedspeech-privacy"  # inside a real node's data folder
CLIENT_STATE_DIR = "client-state"  # inside a simulation's run folder


@dataclass(frozen=True)
class NodeData:
    """One node's data location and privacy settings.

    Attributes:
        label: short name for logs (``partition 3`` or the manifest path).
        manifest: the node's manifest (None: a simulated partition, made on demand).
        partition: ``(partition-id, num-partitions)`` of a simulated node, else None.
        cache_dir: feature cache folder.
        ledger_file: JSON file of the node's privacy ledger.
        epsilon_budget: the node's lifetime epsilon budget (None: no limit).
        threads: torch threads for local training (0: torch's default).
    """

    label: str
    manifest: Path | None
    partition: tuple[int, int] | None
    cache_dir: Path
    ledger_file: Path
    epsilon_budget: float | None
    threads: int


def resolve_node_data(node_config: Mapping[str, object], cfg: RunConfig) -> NodeData:
    """Read a node's data location from its ``node_config`` (see the module docstring).

    Raises:
        ConfigError: neither ``manifest``/``data-dir`` nor ``partition-id``/``num-partitions``.
    """
    budget = _optional_float(node_config.get("epsilon-budget"))
    threads = int(str(node_config.get("threads", cfg.fed.client_threads)))
    mechanism = cfg.train.accountant
    if "manifest" in node_config or "data-dir" in node_config:
        data_dir = node_config.get("data-dir")
        manifest = Path(str(node_config.get("manifest") or Path(str(data_dir)) / "manifest.tsv"))
        folder = Path(str(data_dir)) if data_dir else manifest.parent
        return NodeData(
            label=str(manifest),
            manifest=manifest,
            partition=None,
            cache_dir=folder / ".fedspeech-cache",
            ledger_file=folder / LEDGER_DIR / f"ledger-{mechanism}.json",
            epsilon_budget=budget if budget is not None else cfg.fed.epsilon_budget,
            threads=threads,
        )
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ConfigError(
            "node_config needs `manifest` or `data-dir` (a real node) or "
            "`partition-id` and `num-partitions` (set by the simulation engine)"
        )
    pid, num = int(str(node_config["partition-id"])), int(str(node_config["num-partitions"]))
    ledgers = Path(cfg.fed.out_dir) / CLIENT_STATE_DIR
    return NodeData(
        label=f"partition {pid}/{num}",
        manifest=None,
        partition=(pid, num),
        cache_dir=Path(cfg.fed.data_dir) / "features",
        ledger_file=ledgers / f"partition-{pid}-{mechanism}.json",
        epsilon_budget=budget if budget is not None else cfg.fed.budget_for_partition(pid),
        threads=threads,
    )


def load_ledger(path: Path) -> PrivacyState | None:
    """The ledger stored at ``path``; None if there is none.

    Raises:
        ValueError: the file exists but is not a ledger (never silently reset a privacy history).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return PrivacyState.from_json(text)
    except ValueError as exc:
        raise ValueError(f"{path}: damaged privacy ledger ({exc}); refusing to start over") from exc


def save_ledger(path: Path, state: PrivacyState) -> None:
    """Write the ledger atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(state.to_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def newest_ledger(*states: PrivacyState | None) -> PrivacyState | None:
    """The ledger with the most recorded steps (the conservative choice when copies disagree)."""
    known = [s for s in states if s is not None]
    return max(known, key=lambda s: s.num_steps) if known else None


def _optional_float(value: object) -> float | None:
    if value is None or value == "":
        return None
    return float(str(value))
