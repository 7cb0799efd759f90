"""Where a client node's data, feature cache and privacy ledger live; its node config; the ledger on disk.

A node's ``node_config`` says where its data is:

* ``manifest = "/data/site-a/manifest.tsv"`` (a real node): the node's own manifest; its folder
  (or ``data-dir`` if given) holds the feature cache and the privacy ledger, so a restarted node
  keeps its history across rounds *and* runs: the budget is a lifetime budget.
* ``data-dir = "/data/site-a"`` alone: the manifest is ``<data-dir>/manifest.tsv``.
* neither (a simulated node): ``partition-id`` / ``num-partitions`` (set by Flower's simulation
  engine) pick a partition of the run config's corpus under the run's ``data-dir``, and the ledger
  lives in the run folder (``<out-dir>/client-state/``), so ``resume`` continues it and a fresh run
  starts a fresh one.

Optional per-node keys: ``epsilon-budget`` (overrides the run config) and ``threads``. Any other
key, or a value of the wrong type, is refused when the ClientApp first reads the node config
(``NodeConfig.parse``): a mistyped ``epsilon-bugdet`` must not silently drop a node's budget.

One ledger file per node, whatever accountant a run uses (``ledger.json``, or
``partition-<i>.json`` for a simulated node): the accountant is the server's choice and must not
choose which history a node's budget counts. Files of earlier versions, one per accountant
(``ledger-rdp.json``, ``ledger-prv.json``), are merged into it on first read (``load_ledger``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedspeech.config import ConfigError, RunConfig
from fedspeech.privacy_ledger import PrivacyLedger
from fedspeech.strict import StrictError, kebab, parse_dataclass
from fedspeech_features.files import atomic_write

log = logging.getLogger(__name__)

LEDGER_DIR = ".fedspeech-privacy"  # inside a real node's data folder
LEDGER_FILE = "ledger.json"
CLIENT_STATE_DIR = "client-state"  # inside a simulation's run folder
_LEGACY_ACCOUNTANTS = ("rdp", "prv")  # earlier versions kept one ledger file per accountant


@dataclass(frozen=True)
class NodeConfig:
    """A node's ``node_config``, checked: every key known, every value of its type.

    Attributes:
        manifest: the node's manifest (a real node).
        data_dir: the node's data folder (its ``manifest.tsv`` unless ``manifest`` is given).
        partition_id: a simulated node's partition (set by Flower's simulation engine).
        num_partitions: the number of partitions (set by Flower's simulation engine).
        epsilon_budget: this node's lifetime epsilon budget (overrides the run config).
        threads: torch threads for local training (None: the run config's ``client-threads``).
    """

    manifest: str | None = None
    data_dir: str | None = None
    partition_id: int | None = None
    num_partitions: int | None = None
    epsilon_budget: float | None = None
    threads: int | None = None

    @classmethod
    def parse(cls, node_config: Mapping[str, object]) -> NodeConfig:
        """Check ``node_config`` (Flower's flat mapping) and build the config.

        Values follow ``fedspeech.strict`` (as the run config's do: an int is a float, ``""``
        leaves an optional number unset).

        Raises:
            ConfigError: an unknown key (named, with the known ones listed) or a wrong type.
        """
        try:
            parsed = parse_dataclass(cls, node_config, what="node-config", key=kebab)
        except StrictError as exc:
            if exc.unknown:
                raise ConfigError(
                    f"unknown node-config key(s) {', '.join(map(repr, exc.unknown))}; known keys: "
                    f"{', '.join(exc.known)}"
                ) from None
            raise ConfigError(f"node-config {exc}") from None
        if parsed.epsilon_budget is not None and parsed.epsilon_budget <= 0:
            raise ConfigError(
                f"node-config epsilon-budget must be > 0, got {parsed.epsilon_budget}"
            )
        if parsed.threads is not None and parsed.threads < 0:
            raise ConfigError(f"node-config threads must be >= 0, got {parsed.threads}")
        return parsed


@dataclass(frozen=True)
class NodeData:
    """One node's data location and privacy settings.

    Attributes:
        label: short name for logs (``partition 3`` or the manifest path).
        manifest: the node's manifest (None: a simulated partition, prepared by the simulation).
        partition: ``(partition-id, num-partitions)`` of a simulated node, else None.
        cache_dir: feature cache folder.
        ledger_file: JSON file of the node's privacy ledger (one per node, any accountant).
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
        ConfigError: an unknown key or a wrong type (``NodeConfig.parse``), or neither
            ``manifest``/``data-dir`` nor ``partition-id``/``num-partitions``.
    """
    node = NodeConfig.parse(node_config)
    threads = cfg.fed.client_threads if node.threads is None else node.threads
    if node.manifest is not None or node.data_dir is not None:
        manifest = Path(node.manifest or Path(str(node.data_dir)) / "manifest.tsv")
        folder = Path(node.data_dir) if node.data_dir else manifest.parent
        budget = node.epsilon_budget
        return NodeData(
            label=str(manifest),
            manifest=manifest,
            partition=None,
            cache_dir=folder / ".fedspeech-cache",
            ledger_file=folder / LEDGER_DIR / LEDGER_FILE,
            epsilon_budget=budget if budget is not None else cfg.fed.epsilon_budget,
            threads=threads,
        )
    if node.partition_id is None or node.num_partitions is None:
        raise ConfigError(
            "node_config needs `manifest` or `data-dir` (a real node) or "
            "`partition-id` and `num-partitions` (set by the simulation engine)"
        )
    pid, num = node.partition_id, node.num_partitions
    ledgers = Path(cfg.fed.out_dir) / CLIENT_STATE_DIR
    budget = node.epsilon_budget
    return NodeData(
        label=f"partition {pid}/{num}",
        manifest=None,
        partition=(pid, num),
        cache_dir=Path(cfg.fed.data_dir) / "features",
        ledger_file=ledgers / f"partition-{pid}.json",
        epsilon_budget=budget if budget is not None else cfg.fed.budget_for_partition(pid),
        threads=threads,
    )


def load_ledger(path: Path, delta: float) -> PrivacyLedger | None:
    """The node's ledger at ``path`` (None if it has none), with earlier per-accountant files merged.

    ``delta`` is the delta to state a ledger at that was written without one (earlier
    versions). Per-accountant files beside ``path`` (``<stem>-rdp.json``, ``<stem>-prv.json``)
    hold disjoint runs: their histories are appended to the ledger, which is saved, and they are
    renamed ``*.migrated``. The ledger lists what it merged, so a crash between the two steps
    never counts a file twice.

    Raises:
        ValueError: a file that exists but is not a ledger, named (a privacy history is never
            silently reset).
    """
    ledger, merged = _read_ledger_file(path, delta)
    legacy = [path.with_name(f"{path.stem}-{name}.json") for name in _LEGACY_ACCOUNTANTS]
    legacy = [p for p in legacy if p.is_file()]
    if not legacy:
        return ledger
    for old in legacy:
        if old.name in merged:
            continue
        spent, _ = _read_ledger_file(old, delta)
        assert spent is not None
        ledger = spent if ledger is None else ledger.merge(spent)
        merged = (*merged, old.name)
        log.warning(
            "%s: merged the per-accountant ledger %s (%d steps) into the node's one ledger",
            path,
            old.name,
            spent.num_steps,
        )
    assert ledger is not None
    save_ledger(path, ledger, merged=merged)
    for old in legacy:
        os.replace(old, old.with_name(old.name + ".migrated"))
    return ledger


def last_charged(path: Path) -> tuple[str, int] | None:
    """``(run key, server round)`` of the last round charged to the ledger at ``path``, if known.

    Raises:
        ValueError: a damaged ledger file (named).
    """
    return _read_file(path).get("last_charged")


def _read_ledger_file(path: Path, delta: float) -> tuple[PrivacyLedger | None, tuple[str, ...]]:
    """(ledger, names of the legacy files merged into it) at ``path``; (None, ()) if absent."""
    data = _read_file(path)
    if not data:
        return None, ()
    try:
        return PrivacyLedger.from_dict(data["raw"], delta=delta), data["migrated"]
    except ValueError as exc:
        raise ValueError(_damaged(path, exc)) from exc


def _read_file(path: Path) -> dict[str, Any]:
    """The raw ledger object, what it merged and its last charge ({} if there is no file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        raw = json.loads(text)
        charged = raw.get("last_charged")
        return {
            "raw": raw,
            "migrated": tuple(str(name) for name in raw.get("migrated", ())),
            "last_charged": None if charged is None else (str(charged[0]), int(charged[1])),
        }
    except (ValueError, AttributeError, TypeError, IndexError) as exc:
        raise ValueError(_damaged(path, exc)) from exc


def _damaged(path: Path, exc: Exception) -> str:
    return (
        f"{path}: damaged privacy ledger ({exc}); refusing to start over (repair or restore the "
        "file: deleting it would reset this node's privacy budget)"
    )


def save_ledger(
    path: Path,
    ledger: PrivacyLedger,
    *,
    merged: tuple[str, ...] = (),
    charged: tuple[str, int] | None = None,
) -> None:
    """Write the ledger atomically and durably (``fedspeech_features.files.atomic_write``).

    Args:
        path: the ledger file.
        ledger: the history to write.
        merged: names of earlier per-accountant files already folded into it.
        charged: ``(run key, server round)`` of the round this save charges.
    What the file already records of either is kept unless given anew.
    """
    before = _read_file(path)
    merged = merged or before.get("migrated", ())
    charged = charged or before.get("last_charged")
    data: dict[str, Any] = ledger.to_dict()
    if merged:
        data["migrated"] = list(merged)
    if charged:
        data["last_charged"] = list(charged)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data) + "\n", mode=0o600)  # durable: a charge is never lost


def newest_ledger(*ledgers: PrivacyLedger | None) -> PrivacyLedger | None:
    """The ledger with the most recorded steps (the conservative choice when copies disagree)."""
    known = [s for s in ledgers if s is not None]
    return max(known, key=lambda s: s.num_steps) if known else None
