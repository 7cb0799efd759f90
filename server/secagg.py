"""Server side of secure aggregation: one training round through Flower's SecAgg+ workflow.

Flower 1.42 has SecAgg+ only as a legacy workflow (``flwr.server.workflow.SecAggPlusWorkflow``,
driven with a ``LegacyContext`` and a legacy ``Strategy``). ``run_secure_round`` drives that
workflow for one round from our ServerApp and Grid, unchanged but for two adapters:

* the train messages the strategy built (``configure_train``: global weights, ``server-round``,
  FedProx's ``proximal-mu``, the user-level clipping norm) are what the clients receive in the
  masked-input stage, instead of legacy ``FitIns``, so the ClientApp handles the same message
  with and without secure aggregation (``fedspeech_client.secagg`` wraps it);
* a legacy ``Strategy`` stand-in (``_Capture``) samples nothing (the strategy already did) and
  keeps the unmasked aggregate and the clients' cleartext metrics instead of averaging.

Four request/reply exchanges with the sampled nodes: setup (public keys), share keys (encrypted
Shamir shares of each client's mask seed and secret key, routed through the server), masked
input (each client trains, quantizes its update and adds pairwise and private masks), unmask (the
survivors send the shares that remove the masks: the private-mask seed of every client that sent
an input, the secret key of every client that dropped out after sharing its keys). The server
thereby learns the (weighted) sum of the inputs it received and nothing else about any one of
them; a round halts when some client keeps fewer than ``reconstruction threshold`` live
neighbours.

What the server sees per client: its public keys, encrypted shares, the masked vector (uniform
noise modulo 2^32 on its own), its cleartext metrics (``num-examples``, loss, epsilon, the
aggregation weight) and whether it dropped out. What it learns in the end: the weighted mean of
the inputs, i.e. FedAvg's update (or, with user-level DP, the sum of the clipped updates, which it
then noises: ``fedspeech_server.user_dp``). Per-client screening is therefore impossible; the server checks
the sum (shapes, finite values) and the clients refuse to mask non-finite updates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

import fedspeech.metric_keys as mk
from fedspeech.config import RunConfig
from fedspeech.secagg_config import MODULUS_RANGE
from fedspeech_server.grid import ForwardingGrid
from fedspeech_server.rounds import ClientReport

log = logging.getLogger("fedspeech.server")

_MAIN_CONFIGS, _MAIN_PARAMS, _CURRENT_ROUND = "config", "parameters", "current_round"
MIN_CLIENTS = 3  # fewer: a client can subtract its own update from the sum of two


@dataclass(frozen=True)
class SecureRound:
    """What one SecAgg+ round revealed to the server.

    Attributes:
        mean: the weighted mean of the contributors' updates (trained - global weights), per
            float tensor; None when the protocol halted.
        total_weight: the sum of the contributors' aggregation weights (cleartext): the number
            of contributing clients with user-level DP (each weighs 1), else their examples.
        unclipped_share: with adaptive user-level clipping, the share of contributors whose
            update was not clipped (from the securely summed indicator); else None.
        reports: one per sampled client: ``ok``, ``declined`` (contributed zeros, weight 0) or
            ``failed`` (dropped out, or the round halted).
        stage_seconds: wall time of each protocol stage.
        bytes_sent: payload bytes the server sent per stage (all clients together).
        bytes_received: payload bytes the server received per stage.
    """

    mean: dict[str, np.ndarray] | None
    total_weight: float
    unclipped_share: float | None
    reports: list[ClientReport]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)
    bytes_received: dict[str, int] = field(default_factory=dict)


def run_secure_round(
    grid: Grid,
    messages: Sequence[Message],
    cfg: RunConfig,
    *,
    server_round: int,
    float_names: Sequence[str],
) -> SecureRound:
    """Run one training round through SecAgg+ with the strategy's train ``messages``.

    Args:
        grid: the ServerApp's grid.
        messages: one train message per sampled node (``Strategy.configure_train``).
        cfg: the run config (``secagg`` settings, ``round-timeout`` per stage, user-level DP).
        server_round: the round (the messages' group id).
        float_names: names of the global model's float tensors: the update's order is sorted.
    """
    if len(messages) < MIN_CLIENTS:
        reason = (
            f"secure aggregation needs at least {MIN_CLIENTS} sampled clients, {len(messages)} "
            "were sampled (with 2, each learns the other's update from the sum)"
        )
        log.error("round %d: %s", server_round, reason)
        reports = [
            ClientReport(f"node-{m.metadata.dst_node_id}", "failed", {}, reason) for m in messages
        ]
        return SecureRound(mean=None, total_weight=0.0, unclipped_share=None, reports=reports)
    user_level = cfg.user_level_dp
    indicator = user_level and cfg.privacy.adaptive_clipping
    capture = _Capture()
    tracer = _TracingGrid(grid)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=capture,
    )
    context.state.config_records[_MAIN_CONFIGS] = ConfigRecord({_CURRENT_ROUND: server_round})
    context.state.array_records[_MAIN_PARAMS] = ArrayRecord()
    capture.sampled = [m.metadata.dst_node_id for m in messages]
    sa = cfg.secagg
    workflow = _Workflow(
        # one RecordDict per node (Flower's strategies share one): the workflow adds each
        # node's own SecAgg+ record to it
        {m.metadata.dst_node_id: RecordDict(dict(m.content)) for m in messages},
        num_shares=sa.secagg_num_shares,
        reconstruction_threshold=sa.secagg_reconstruction_threshold,
        # with user-level DP every client weighs 1: quantize relative to 1, not to the cap
        max_weight=1.0 if user_level else sa.secagg_max_weight,
        clipping_range=sa.secagg_clipping_range,
        quantization_range=sa.secagg_quantization_range,
        modulus_range=MODULUS_RANGE,
        timeout=cfg.fed.round_timeout,
    )
    workflow(tracer, context)
    reports = _reports(capture, tracer)
    mean, share = None, None
    if capture.aggregate is not None:
        arrays = parameters_to_ndarrays(capture.aggregate)
        names = sorted(float_names)
        if indicator:
            # the clients send r 1[unclipped] (r: the clipping range, which quantization keeps)
            share = float(arrays[-1].reshape(-1)[0]) / sa.secagg_clipping_range
            arrays = arrays[:-1]
        if len(arrays) == len(names):
            mean = dict(zip(names, arrays, strict=True))
        else:
            log.error("secure aggregate has %d tensors, expected %d", len(arrays), len(names))
    log.info(
        "secure aggregation round %d: %s; stages %s s",
        server_round,
        ", ".join(
            f"{s} {sum(r.status == s for r in reports)}" for s in ("ok", "declined", "failed")
        ),
        {k: round(v, 2) for k, v in tracer.stage_seconds.items()},
    )
    return SecureRound(
        mean=mean,
        total_weight=float(sum(res.num_examples for _, res in capture.results)),
        unclipped_share=share,
        reports=reports,
        stage_seconds=dict(tracer.stage_seconds),
        bytes_sent=dict(tracer.bytes_sent),
        bytes_received=dict(tracer.bytes_received),
    )


class _Workflow(SecAggPlusWorkflow):
    """``SecAggPlusWorkflow`` whose masked-input stage sends our train messages' content."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._contents = contents

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Flower's setup stage; then the nodes' legacy FitIns become our train contents."""
        ok = bool(super().setup_stage(grid, context, state))
        # Flower keeps each node's legacy FitIns here and sends it in the masked-input stage.
        state.nid_to_fitins = {nid: self._contents[nid] for nid in state.nid_to_fitins}
        return ok


@dataclass(frozen=True)
class _Proxy:
    """What the workflow needs of a legacy ClientProxy: the node id."""

    node_id: int


class _Capture(LegacyStrategy):
    """A legacy ``Strategy`` for the workflow: samples the given nodes, keeps the aggregate."""

    def __init__(self) -> None:
        self.sampled: list[int] = []
        self.results: list[tuple[Any, FitRes]] = []
        self.aggregate: Parameters | None = None

    def initialize_parameters(self, client_manager: Any) -> None:
        """Unused: the ServerApp holds the global weights."""
        return None

    def configure_fit(
        self, server_round: int, parameters: Any, client_manager: Any
    ) -> list[tuple[Any, FitIns]]:
        """The nodes the strategy sampled (their train content is swapped in by ``_Workflow``)."""
        empty = FitIns(Parameters(tensors=[], tensor_type=""), {})
        return [(_Proxy(nid), empty) for nid in self.sampled]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[Any, FitRes]], failures: list[Any]
    ) -> tuple[None, dict[str, Any]]:
        """Keep the unmasked aggregate (the workflow put it into every result) and the results."""
        self.results = list(results)
        self.aggregate = results[0][1].parameters if results else None
        return None, {}

    def configure_evaluate(self, *args: Any) -> list[Any]:
        """No client-side evaluation."""
        return []

    def aggregate_evaluate(self, *args: Any) -> tuple[None, dict[str, Any]]:
        """No client-side evaluation."""
        return None, {}

    def evaluate(self, *args: Any) -> None:
        """Central evaluation runs in ``fedspeech_server.run``."""
        return None


class _TracingGrid(ForwardingGrid):
    """The ServerApp's grid, recording per protocol stage: time, bytes, each node's failure."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.stage_seconds: dict[str, float] = {}
        self.bytes_sent: dict[str, int] = {}
        self.bytes_received: dict[str, int] = {}
        self.failures: dict[int, str] = {}  # node -> why it left the protocol (first failure)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        stage = _stage_of(messages)
        self.bytes_sent[stage] = self.bytes_sent.get(stage, 0) + sum(
            payload_bytes(m.content) for m in messages
        )
        start = time.perf_counter()
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + (
            time.perf_counter() - start
        )
        # Replies are matched to nodes by the message they answer: the SuperLink's own error
        # reply for a node that stopped sending heartbeats comes from the SuperLink's node id.
        # (The grid sets each message's id when it pushes it.)
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        destination.pop("", None)  # a message no grid has pushed has no id yet
        answered = set()
        for reply in replies:
            node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error():
                self.failures.setdefault(
                    node, f"error in SecAgg+ stage {stage}: {reply.error.reason}"
                )
            else:
                self.bytes_received[stage] = self.bytes_received.get(stage, 0) + payload_bytes(
                    reply.content
                )
        for message in messages:
            if message.metadata.dst_node_id not in answered:
                self.failures.setdefault(
                    message.metadata.dst_node_id,
                    f"no reply in SecAgg+ stage {stage} before the timeout",
                )
        return replies


def payload_bytes(content: RecordDict) -> int:
    """Approximate payload size of a message: array bytes plus bytes/str values of configs."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(a.data) for a in record.values())
        elif isinstance(record, ConfigRecord):
            for value in record.values():
                items = value if isinstance(value, list) else [value]
                total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in items)
        else:
            total += 8 * len(record)
    return total


def _stage_of(messages: Sequence[Message]) -> str:
    for message in messages:
        record = message.content.config_records.get(RECORD_KEY_CONFIGS)
        if record is not None and Key.STAGE in record:
            return str(record[Key.STAGE])
    return "other"


def _reports(capture: _Capture, tracer: _TracingGrid) -> list[ClientReport]:
    reports = []
    contributed = set()
    for proxy, res in capture.results:
        node = int(proxy.node_id)
        contributed.add(node)
        reports.append(_report(node, res))
    for node in capture.sampled:
        if node in contributed:
            continue
        reason = tracer.failures.get(node)
        if reason is None:
            reason = (
                "secure aggregation halted: too few clients finished a stage to reconstruct "
                "the masks (reconstruction threshold not met)"
            )
        reports.append(ClientReport(f"node-{node}", "failed", {}, reason))
    return reports


def _report(node: int, res: FitRes) -> ClientReport:
    metrics = {
        k: float(v)
        for k, v in res.metrics.items()
        if isinstance(v, int | float) and k != mk.DECLINED
    }
    metrics[mk.DECLINED] = float(bool(res.metrics.get(mk.DECLINED)))
    name = f"node-{node}"
    if mk.PARTITION_ID in metrics:
        name = f"partition-{int(metrics[mk.PARTITION_ID])}"
    if metrics[mk.DECLINED]:
        reason = str(res.metrics.get(mk.DECLINE_REASON, "")) or "declined"
        return ClientReport(name, "declined", metrics, reason)
    if res.num_examples <= 0:
        return ClientReport(name, "rejected", metrics, "masked input with aggregation weight 0")
    return ClientReport(name, "ok", metrics)


__all__ = ["SecureRound", "payload_bytes", "run_secure_round"]
