"""Screening of the clients' replies to a training round: what may be aggregated, and why not.

Every reply becomes one ``ClientReport``: ``ok`` (weights that may be averaged in), ``declined``
(the client's privacy budget said no: metrics only, never averaged in), ``failed`` (an error
reply, a reply without arrays, or no reply before the round timeout) or ``rejected`` (an update
that does not fit the global model it was sent: other tensor names, shapes or dtypes, NaN/Inf
values, an undecodable array, or a ``num-examples`` that is not a positive finite count). Under
secure aggregation only the unmasked aggregate can be checked (``screen_sum``); a bad one rejects
every contributor, as nobody can tell whose update spoiled it.

Plain functions on the replies' records and NumPy arrays: no Flower strategy here, so the rules
read (and are tested) on their own; ``fedspeech_server.strategy`` applies them before Flower's
aggregation and ``fedspeech_server.rounds`` counts the reports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

import fedspeech.metric_keys as mk
from fedspeech_server.rounds import ClientReport

WEIGHT_KEY = mk.NUM_EXAMPLES  # Flower's default weight key; every training reply carries it

ArraySpec = dict[str, tuple[tuple[int, ...], np.dtype]]
"""Names -> (shape, dtype) of the weights a round sent (``array_spec``)."""


@dataclass(frozen=True)
class ScreenedReplies:
    """A round's replies, sorted by ``screen_replies``.

    Attributes:
        reports: one per reply, in the replies' order.
        accepted: the ``ok`` replies (the only ones that may be aggregated), in order.
    """

    reports: list[ClientReport]
    accepted: list[Message]


def screen_replies(replies: Iterable[Message], sent: ArraySpec | None) -> ScreenedReplies:
    """Report every reply (``client_report``) and keep the accepted ones."""
    replies = list(replies)
    reports = [client_report(m, sent) for m in replies]
    accepted = [m for m, r in zip(replies, reports, strict=True) if r.status == "ok"]
    return ScreenedReplies(reports, accepted)


def client_report(msg: Message, sent: ArraySpec | None = None) -> ClientReport:
    """One reply as ``ok`` / ``declined`` / ``failed`` / ``rejected``, with its metrics.

    Args:
        msg: the reply.
        sent: names -> (shape, dtype) of the weights the client was sent (``array_spec``); a
            trained reply must return exactly these. None: not checked.
    """
    node = msg.metadata.src_node_id
    name = f"node-{node}"
    if msg.has_error():
        reason = f"error {msg.error.code}: {msg.error.reason}"
        return ClientReport(name, "failed", {}, reason, node=node)
    content = msg.content
    metrics_record = content.get("metrics")
    metrics = (
        {k: float(v) for k, v in metrics_record.items() if isinstance(v, int | float)}
        if isinstance(metrics_record, MetricRecord)
        else {}
    )
    if mk.PARTITION_ID in metrics:
        name = f"partition-{int(metrics[mk.PARTITION_ID])}"
    if metrics.get(mk.DECLINED):
        decline = content.get("decline")
        reason = str(decline.get("reason", "")) if isinstance(decline, ConfigRecord) else ""
        return ClientReport(name, "declined", metrics, reason or "declined", node=node)
    arrays = content.get("arrays")
    if not isinstance(arrays, ArrayRecord) or WEIGHT_KEY not in metrics:
        return ClientReport(
            name, "failed", metrics, "reply without arrays or num-examples", node=node
        )
    examples = metrics[WEIGHT_KEY]
    if not (math.isfinite(examples) and examples > 0):
        return ClientReport(
            name, "rejected", metrics, f"num-examples {examples!r} is not > 0", node=node
        )
    problem = None if sent is None else screen_arrays(arrays, sent)
    if problem is not None:
        return ClientReport(name, "rejected", metrics, problem, node=node)
    return ClientReport(name, "ok", metrics, node=node)


def array_spec(arrays: ArrayRecord) -> ArraySpec:
    """Names -> (shape, dtype) of the arrays in a record (decoded, not the declared header)."""
    spec: ArraySpec = {}
    for key, array in arrays.items():
        value = array.numpy()
        spec[key] = (tuple(value.shape), value.dtype)
    return spec


def screen_arrays(
    arrays: ArrayRecord, sent: Mapping[str, tuple[tuple[int, ...], np.dtype]]
) -> str | None:
    """Why an update cannot be averaged into the weights ``sent`` describes (None: it can).

    Refused: missing or unexpected tensor names, another shape or dtype, an array that does not
    decode as a plain NumPy array (never unpickled), NaN or infinite values.
    """
    missing, unexpected = sorted(set(sent) - set(arrays)), sorted(set(arrays) - set(sent))
    if missing or unexpected:
        return (
            f"tensor names differ from the global model: missing {missing}, unexpected {unexpected}"
        )
    for key, (shape, dtype) in sent.items():
        try:
            value = arrays[key].numpy()
        except Exception as exc:  # TypeError (not a NumPy array), ValueError (bad bytes)...
            return f"{key}: undecodable array ({type(exc).__name__}: {exc})"
        if tuple(value.shape) != shape:
            return f"{key}: shape {tuple(value.shape)} != {shape} of the global model"
        if value.dtype != dtype:
            return f"{key}: dtype {value.dtype} != {dtype} of the global model"
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            return f"{key}: non-finite values (NaN/Inf)"
    return None


def screen_sum(mean: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> str | None:
    """Why a secure aggregate cannot update the float weights ``base`` (None: it can)."""
    missing, unexpected = sorted(set(base) - set(mean)), sorted(set(mean) - set(base))
    if missing or unexpected:
        return f"tensor names differ: missing {missing}, unexpected {unexpected}"
    for key, like in base.items():
        if np.shape(mean[key]) != like.shape:
            return f"{key}: shape {np.shape(mean[key])} != {like.shape} of the global model"
        if not np.isfinite(mean[key]).all():
            return f"{key}: non-finite values (NaN/Inf)"
    return None


def reject_contributors(reports: Sequence[ClientReport], problem: str) -> list[ClientReport]:
    """The reports of a round whose secure aggregate ``screen_sum`` refused: every ``ok``
    contributor becomes ``rejected`` (the server cannot tell whose update spoiled the sum)."""
    return [
        ClientReport(
            r.client, "rejected", r.metrics, f"secure aggregate rejected: {problem}", node=r.node
        )
        if r.status == "ok"
        else r
        for r in reports
    ]


def missing_reports(sent: Iterable[Message], replies: Iterable[Message]) -> list[ClientReport]:
    """A ``failed`` report for every node that was sent a message but did not reply in time."""
    answered = {m.metadata.src_node_id for m in replies}
    return [
        ClientReport(
            f"node-{m.metadata.dst_node_id}",
            "failed",
            {},
            "no reply before the timeout",
            node=m.metadata.dst_node_id,
        )
        for m in sent
        if m.metadata.dst_node_id not in answered
    ]


def successes_needed(min_successful_clients: int, contacted: int, *, poisson: bool) -> int:
    """Accepted updates a round needs: ``min-successful-clients`` (at least 1); with Poisson
    sampling at most the number of clients contacted (a small draw is a legitimate outcome of
    the mechanism, and an empty one releases noise only)."""
    needed = max(1, min_successful_clients)
    return min(needed, contacted) if poisson else needed
