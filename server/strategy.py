"""Flower strategies for fedspeech: FedAvg, FedAdam, FedProx, FedMedian that skip non-trainers.

Each is Flower's own strategy with one addition (``_ScreenReplies``): before aggregating, replies
are sorted into ``ok`` (weights to aggregate), ``declined`` (the client's privacy budget said
no: metrics only, never averaged in) and ``failed`` (an error reply, or no arrays); the reports
of the last round are kept for the server's bookkeeping (``server.rounds``). Weighted averages
use ``num-examples`` (Flower's default key), which every training reply carries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Strategy

from fedspeech.config import FedConfig
from server.rounds import ClientReport

log = logging.getLogger("fedspeech.server")

WEIGHT_KEY = "num-examples"


class _ScreenReplies:
    """Mixin (before a Flower strategy in the bases): aggregate only the ``ok`` replies."""

    last_reports: list[ClientReport]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sort the replies, keep their reports, aggregate the trained ones."""
        replies = list(replies)
        self.last_reports = [client_report(m) for m in replies]
        ok = [m for m, r in zip(replies, self.last_reports, strict=True) if r.status == "ok"]
        if not ok:
            log.warning(
                "round %d: no client trained; the global model stays as it was", server_round
            )
            return None, None
        aggregated: tuple[ArrayRecord | None, MetricRecord | None] = super().aggregate_train(  # type: ignore[misc]
            server_round, ok
        )
        return aggregated


class ScreenedFedAvg(_ScreenReplies, FedAvg):
    """FedAvg (weighted by ``num-examples``) over the clients that trained."""


class ScreenedFedAdam(_ScreenReplies, FedAdam):
    """FedAdam (server-side Adam on the averaged update) over the clients that trained."""


class ScreenedFedProx(_ScreenReplies, FedProx):
    """FedProx: FedAvg that sends ``proximal-mu``; clients pull towards the global weights."""


class ScreenedFedMedian(_ScreenReplies, FedMedian):
    """Coordinate-wise median of the trained clients' weights."""


def make_strategy(cfg: FedConfig) -> Strategy:
    """The strategy ``cfg.strategy`` names, sampling ``fraction-train`` (at least ``min-clients``)."""
    common = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0,  # unused: the server runs no client-side evaluation rounds
        "min_train_nodes": cfg.min_clients,
        "min_evaluate_nodes": cfg.min_clients,
        "min_available_nodes": cfg.min_clients,
        "weighted_by_key": WEIGHT_KEY,
    }
    if cfg.strategy == "fedadam":
        # eta_l is only reported by Flower; the clients' lr is the run config's lr.
        return ScreenedFedAdam(eta=cfg.server_lr, **common)  # type: ignore[arg-type]
    if cfg.strategy == "fedprox":
        # The clients apply the proximal term (client.proximal) with the mu this sends them.
        return ScreenedFedProx(proximal_mu=cfg.proximal_mu, **common)  # type: ignore[arg-type]
    if cfg.strategy == "fedmedian":
        return ScreenedFedMedian(**common)  # type: ignore[arg-type]
    return ScreenedFedAvg(**common)  # type: ignore[arg-type]


def client_report(msg: Message) -> ClientReport:
    """One reply as ``ok`` / ``declined`` / ``failed``, with its metrics."""
    name = f"node-{msg.metadata.src_node_id}"
    if msg.has_error():
        return ClientReport(name, "failed", {}, f"error {msg.error.code}: {msg.error.reason}")
    content = msg.content
    metrics_record = content.get("metrics")
    metrics = (
        {k: float(v) for k, v in metrics_record.items() if isinstance(v, int | float)}
        if isinstance(metrics_record, MetricRecord)
        else {}
    )
    if "partition-id" in metrics:
        name = f"partition-{int(metrics['partition-id'])}"
    if metrics.get("declined"):
        decline = content.get("decline")
        reason = str(decline.get("reason", "")) if isinstance(decline, ConfigRecord) else ""
        return ClientReport(name, "declined", metrics, reason or "declined")
    if not isinstance(content.get("arrays"), ArrayRecord) or WEIGHT_KEY not in metrics:
        return ClientReport(name, "failed", metrics, "reply without arrays or num-examples")
    return ClientReport(name, "ok", metrics)


def missing_reports(sent: Iterable[Message], replies: Iterable[Message]) -> list[ClientReport]:
    """A ``failed`` report for every node that was sent a message but did not reply in time."""
    answered = {m.metadata.src_node_id for m in replies}
    return [
        ClientReport(f"node-{m.metadata.dst_node_id}", "failed", {}, "no reply before the timeout")
        for m in sent
        if m.metadata.dst_node_id not in answered
    ]


def export_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Server-optimizer state worth checkpointing (FedAdam's moments), by name."""
    out: dict[str, np.ndarray] = {}
    for moment in ("m_t", "v_t"):
        for key, value in (getattr(strategy, moment, None) or {}).items():
            out[f"{moment}/{key}"] = np.asarray(value)
    return out


def import_state(strategy: Strategy, arrays: dict[str, np.ndarray]) -> None:
    """Restore what ``export_state`` saved (ignored by strategies without such state)."""
    for moment in ("m_t", "v_t"):
        values = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{moment}/")}
        if values and hasattr(strategy, moment):
            setattr(strategy, moment, values)
