"""Flower strategies for fedspeech: FedAvg, FedAdam, FedProx, FedMedian that skip non-trainers.

Each is Flower's own strategy with one addition (``_ScreenReplies``): before aggregating, replies
are sorted into ``ok`` (weights to aggregate), ``declined`` (the client's privacy budget said
no: metrics only, never averaged in), ``failed`` (an error reply, or no arrays) and ``rejected``
(an update that does not fit the global model it was sent: other tensor names, shapes or dtypes,
NaN/Inf values, an undecodable array, or a ``num-examples`` that is not a positive finite count).
Only ``ok`` replies reach Flower's aggregation, rebuilt to hold nothing but their weights and
``num-examples``, and only when at least ``min-successful-clients`` of them arrived (else the
round aggregates nothing and the server retries or stops: ``fedspeech_server.app``). The reports of the last
round are kept for the server's bookkeeping (``fedspeech_server.rounds``). Weighted averages use
``num-examples`` (Flower's default key), which every training reply carries.

With Poisson sampling (``fedspeech_server.sampling``; always under user-level DP) the strategy draws the
round's cohort itself (every connected node independently with probability q) and lets Flower's
strategy build the messages for exactly that cohort; a round may then draw fewer clients than
``min-successful-clients``, or none, and needs only as many accepted updates as it drew.
With user-level DP (``fedspeech_server.user_dp``) the accepted updates are clipped, summed, noised and
divided by the expected cohort q N; that private aggregate then enters Flower's strategy as the
one reply it averages, so FedAdam's server step and FedProx work on it unchanged
(post-processing). A round that drew nobody releases noise only, and is charged like any other.
Flower's own ``DifferentialPrivacyServerSide*Clipping`` wrappers do not fit this loop: they clip
before the screening (NaN updates included), average with the ``num-examples`` weights, skip a
round in which any client failed, and keep their accountant in memory only (docs/privacy.md).

With secure aggregation (``fedspeech_server.secagg``) the server never holds a client's update: replies
cannot be screened one by one, and ``aggregate_secure`` takes the unmasked mean (or, with
user-level DP, the sum of the clients' own clipped updates, which it noises), screens only that
(shapes, finite values) and hands the result to Flower's strategy in the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedspeech.config import FedConfig
from fedspeech_server.rounds import ClientReport
from fedspeech_server.sampling import Cohort, PoissonSampler
from fedspeech_server.secagg import MIN_CLIENTS, SecureRound
from fedspeech_server.user_dp import UserDPRelease, UserLevelDP

log = logging.getLogger("fedspeech.server")

WEIGHT_KEY = "num-examples"
_NEGLIGIBLE_FRACTION = 1e-12  # see clients-per-round in _make_strategy


ArraySpec = dict[str, tuple[tuple[int, ...], np.dtype]]


class _ScreenReplies:
    """Mixin (before a Flower strategy in the bases): aggregate only the ``ok`` replies.

    ``configure_train`` remembers the names, shapes and dtypes of the weights it sends; replies
    must match them. ``min_successful_clients``: fewer ``ok`` replies aggregate nothing.
    """

    last_reports: list[ClientReport]
    min_successful_clients: int = 1
    user_dp: UserLevelDP | None = None
    secure: bool = False
    sampler: PoissonSampler | None = None
    min_connected: int = 1  # Poisson sampling: wait for this many connected nodes
    last_user_dp: UserDPRelease | None = None
    last_cohort: Cohort | None = None
    last_sampled: int = 0  # clients the round sampled (the cohort, with Poisson sampling)
    _contacted: int = 0
    _left_out: list[ClientReport] | None = None
    _sent: ArraySpec | None = None
    _sent_arrays: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the round's clients and build their messages; keep what screening needs.

        With Poisson sampling the cohort is this strategy's own draw (``last_cohort``) and
        Flower's strategy builds one message per drawn node; otherwise Flower samples. The sent
        weights' layout is kept for screening, and the weights themselves (the updates'
        reference) with user-level DP or secure aggregation; with user-level DP the messages
        carry the round's clipping norm (``user-clip-norm``: clients clip their own updates
        under secure aggregation).
        """
        self._sent = array_spec(arrays)
        if self.user_dp is not None:
            config = ConfigRecord({**config, "user-clip-norm": float(self.user_dp.clip_norm)})
        self.last_cohort, self._left_out = None, []
        if self.sampler is not None:
            _, connected = sample_nodes(grid, self.min_connected, 0)  # waits for min-clients
            self.last_cohort = self.sampler.draw(connected, server_round)
            grid = _CohortGrid(self.last_cohort.nodes)  # type: ignore[assignment]
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self.last_sampled = len(messages)
        if self.secure and self.sampler is not None and 0 < len(messages) < MIN_CLIENTS:
            # SecAgg+ cannot hide an update in a sum of fewer than 3. The draw stands (the
            # accountant assumes it): its clients are left out, as if they had dropped.
            reason = (
                f"left out: secure aggregation needs {MIN_CLIENTS} a round, {len(messages)} drawn"
            )
            log.warning("round %d: %s; the round releases noise only", server_round, reason)
            self._left_out = [
                ClientReport(f"node-{m.metadata.dst_node_id}", "failed", {}, reason)
                for m in messages
            ]
            messages = []
        self._contacted = len(messages)
        if self.user_dp is not None or self.secure:
            self._sent_arrays = {k: v.numpy() for k, v in arrays.items()}
        return messages

    def successes_needed(self) -> int:
        """Accepted updates this round needs: ``min-successful-clients``; with Poisson sampling
        at most the number of clients contacted (a small draw is a legitimate outcome of the
        mechanism, and an empty one releases noise only)."""
        needed = max(1, self.min_successful_clients)
        return min(needed, self._contacted) if self.sampler is not None else needed

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sort the replies, keep their reports, aggregate the accepted ones (if enough)."""
        replies = list(replies)
        self.last_user_dp = None
        reports = [client_report(m, self._sent) for m in replies]
        ok = [m for m, r in zip(replies, reports, strict=True) if r.status == "ok"]
        self.last_reports = [*reports, *(self._left_out or [])]
        needed = self.successes_needed()
        if len(ok) < needed:
            log.warning(
                "round %d: %d client update(s) accepted, %d needed; nothing aggregated",
                server_round,
                len(ok),
                needed,
            )
            return None, None
        if self.user_dp is not None:
            to_average = [self._private_aggregate(ok, server_round)]
        elif ok:
            to_average = [_weights_only(m) for m in ok]
        else:
            return None, None  # nobody drawn, no user-level noise: nothing to aggregate
        aggregated: tuple[ArrayRecord | None, MetricRecord | None] = super().aggregate_train(  # type: ignore[misc]
            server_round, to_average
        )
        return self._in_sent_dtypes(aggregated)

    def _in_sent_dtypes(
        self, aggregated: tuple[ArrayRecord | None, MetricRecord | None]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global weights in the dtypes that were sent: Flower's FedAdam computes in
        float64, and a float64 global model would make every float32 reply of the next round
        a dtype mismatch (rejected)."""
        arrays, metrics = aggregated
        if arrays is None or self._sent is None:
            return aggregated
        cast = ArrayRecord(
            {
                k: Array(np.ascontiguousarray(v.numpy().astype(self._sent[k][1], copy=False)))
                if k in self._sent
                else v
                for k, v in arrays.items()
            }
        )
        return cast, metrics

    def aggregate_secure(
        self, server_round: int, secure: SecureRound
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate what a SecAgg+ round revealed: the mean of the clients' updates.

        Only the aggregate can be screened (names, shapes, finite values); a bad one turns every
        contributor's report into ``rejected`` (nobody can tell whose update spoiled it).
        """
        self.last_user_dp = None
        self.last_reports = list(secure.reports)
        ok = sum(r.status == "ok" for r in self.last_reports)
        needed = self.successes_needed()
        if ok < needed or secure.mean is None:
            log.warning(
                "round %d: %d secure contribution(s), %d needed; nothing aggregated",
                server_round,
                ok if secure.mean is not None else 0,
                needed,
            )
            return None, None
        assert self._sent_arrays is not None
        base = {k: v for k, v in self._sent_arrays.items() if v.dtype.kind == "f"}
        problem = screen_sum(secure.mean, base)
        if problem is not None:
            log.warning("round %d: secure aggregate rejected: %s", server_round, problem)
            self.last_reports = [
                ClientReport(
                    r.client, "rejected", r.metrics, f"secure aggregate rejected: {problem}"
                )
                if r.status == "ok"
                else r
                for r in self.last_reports
            ]
            return None, None
        if self.user_dp is not None:
            assert self.last_cohort is not None  # user-level DP always samples by Poisson
            contributors = round(secure.total_weight)  # every contributor weighs 1
            share = secure.unclipped_share
            new, self.last_user_dp = self.user_dp.release_sum(
                self._sent_arrays,
                {k: v * contributors for k, v in secure.mean.items()},
                contributors=contributors,
                unclipped=(share or 0.0) * contributors,
                cohort=self.last_cohort,
            )
        else:
            new = {
                k: (v + secure.mean[k]).astype(v.dtype) if k in base else v
                for k, v in self._sent_arrays.items()
            }
        aggregated: tuple[ArrayRecord | None, MetricRecord | None] = super().aggregate_train(  # type: ignore[misc]
            server_round, [_aggregate_reply(new, server_round)]
        )
        return self._in_sent_dtypes(aggregated)

    def _private_aggregate(self, ok: list[Message], server_round: int) -> Message:
        """One reply carrying the user-level DP aggregate of the accepted updates (weight 1)."""
        assert self.user_dp is not None and self._sent_arrays is not None
        assert self.last_cohort is not None  # user-level DP always samples by Poisson
        updates = [{k: v.numpy() for k, v in m.content.array_records["arrays"].items()} for m in ok]
        new, self.last_user_dp = self.user_dp.release(
            self._sent_arrays, updates, cohort=self.last_cohort
        )
        return _aggregate_reply(new, server_round)


class ScreenedFedAvg(_ScreenReplies, FedAvg):
    """FedAvg (weighted by ``num-examples``) over the clients that trained."""


class ScreenedFedAdam(_ScreenReplies, FedAdam):
    """FedAdam (server-side Adam on the averaged update) over the clients that trained."""


class ScreenedFedProx(_ScreenReplies, FedProx):
    """FedProx: FedAvg that sends ``proximal-mu``; clients pull towards the global weights."""


class ScreenedFedMedian(_ScreenReplies, FedMedian):
    """Coordinate-wise median of the trained clients' weights."""


def make_strategy(
    cfg: FedConfig,
    *,
    user_dp: UserLevelDP | None = None,
    secure: bool = False,
    sampler: PoissonSampler | None = None,
) -> Strategy:
    """The strategy ``cfg.strategy`` names, sampling ``fraction-train`` (at least ``min-clients``)
    of the connected nodes, or exactly ``clients-per-round`` of them, or (``sampler``) each node
    independently with the sampler's probability once ``min-clients`` are connected.

    It aggregates a round only when ``successes_needed`` updates were accepted; with ``user_dp``
    it aggregates them with that mechanism (clipping, uniform weights, noise, the expected
    cohort as denominator: ``user_dp`` needs ``sampler``); ``secure``: the rounds run through
    SecAgg+ (``aggregate_secure``).
    """
    if user_dp is not None and sampler is None:
        raise ValueError("user-level DP needs Poisson sampling (its accountant assumes it)")
    strategy = _make_strategy(cfg)
    strategy.min_successful_clients = cfg.min_successful_clients  # type: ignore[attr-defined]
    strategy.user_dp = user_dp  # type: ignore[attr-defined]
    strategy.secure = secure  # type: ignore[attr-defined]
    if sampler is not None:
        # Flower's sampler then takes every node of the drawn cohort (_CohortGrid), in any order.
        strategy.sampler = sampler  # type: ignore[attr-defined]
        strategy.min_connected = cfg.min_clients  # type: ignore[attr-defined]
        strategy.fraction_train = 1.0  # type: ignore[attr-defined]
        strategy.min_train_nodes = 0  # type: ignore[attr-defined]
        strategy.min_available_nodes = 0  # type: ignore[attr-defined]
    return strategy


def _make_strategy(cfg: FedConfig) -> Strategy:
    common = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0,  # unused: the server runs no client-side evaluation rounds
        "min_train_nodes": cfg.min_clients,
        "min_evaluate_nodes": cfg.min_clients,
        "min_available_nodes": cfg.min_clients,
        "weighted_by_key": WEIGHT_KEY,
    }
    if cfg.clients_per_round:
        # Flower samples max(int(connected x fraction_train), min_train_nodes) nodes, once at
        # least min_available_nodes are connected: a fraction that rounds to 0 nodes and a
        # minimum of K sample exactly K, however large the population.
        common["fraction_train"] = _NEGLIGIBLE_FRACTION
        common["min_train_nodes"] = cfg.clients_per_round
        common["min_available_nodes"] = max(cfg.min_clients, cfg.clients_per_round)
    if cfg.strategy == "fedadam":
        # eta_l is only reported by Flower; the clients' lr is the run config's lr.
        return ScreenedFedAdam(eta=cfg.server_lr, **common)  # type: ignore[arg-type]
    if cfg.strategy == "fedprox":
        # The clients apply the proximal term (fedspeech_client.proximal) with the mu this sends them.
        return ScreenedFedProx(proximal_mu=cfg.proximal_mu, **common)  # type: ignore[arg-type]
    if cfg.strategy == "fedmedian":
        return ScreenedFedMedian(**common)  # type: ignore[arg-type]
    return ScreenedFedAvg(**common)  # type: ignore[arg-type]


def client_report(msg: Message, sent: ArraySpec | None = None) -> ClientReport:
    """One reply as ``ok`` / ``declined`` / ``failed`` / ``rejected``, with its metrics.

    Args:
        msg: the reply.
        sent: names -> (shape, dtype) of the weights the client was sent (``array_spec``); a
            trained reply must return exactly these. None: not checked.
    """
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
    arrays = content.get("arrays")
    if not isinstance(arrays, ArrayRecord) or WEIGHT_KEY not in metrics:
        return ClientReport(name, "failed", metrics, "reply without arrays or num-examples")
    examples = metrics[WEIGHT_KEY]
    if not (math.isfinite(examples) and examples > 0):
        return ClientReport(name, "rejected", metrics, f"num-examples {examples!r} is not > 0")
    problem = None if sent is None else screen_arrays(arrays, sent)
    if problem is not None:
        return ClientReport(name, "rejected", metrics, problem)
    return ClientReport(name, "ok", metrics)


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


def _aggregate_reply(arrays: Mapping[str, np.ndarray], server_round: int) -> Message:
    """A reply carrying an already aggregated model (weight 1) for Flower's strategy."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord({WEIGHT_KEY: 1.0}),
        }
    )
    metadata = Metadata(
        run_id=0,
        message_id="",
        src_node_id=0,
        dst_node_id=0,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=0.0,
        ttl=3600.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)  # type: ignore[call-overload]


class _CohortGrid:
    """What Flower's ``configure_train`` asks of a Grid (the connected nodes), answered with a
    drawn cohort: Flower's sampler with fraction 1 and no minimum then takes exactly them."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self._nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        """The cohort's node ids."""
        return list(self._nodes)


def _weights_only(msg: Message) -> Message:
    """The reply as Flower's aggregation sees it: the weights and ``num-examples``, no more.

    Flower refuses to aggregate replies whose metric names differ; the server keeps its own
    metrics (``client_report``), so a client's extra or missing metrics never stop a round.
    """
    metrics = msg.content.metric_records["metrics"]
    content = RecordDict(
        {
            "arrays": msg.content.array_records["arrays"],
            "metrics": MetricRecord({WEIGHT_KEY: metrics[WEIGHT_KEY]}),
        }
    )
    # A reply with the original's metadata (sender, reply-to): Flower's internal constructor.
    return Message(content=content, metadata=msg.metadata)  # type: ignore[call-overload]


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
