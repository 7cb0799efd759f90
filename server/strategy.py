"""Flower strategies for fedspeech: FedAvg, FedAdam, FedProx, FedMedian that skip non-trainers.

Each is Flower's own strategy with one addition (``ScreeningStrategy``): before aggregating, the
replies are screened (``fedspeech_server.screening``: ``ok``, ``declined``, ``failed`` or
``rejected``, each with its reason). Only ``ok`` replies reach Flower's aggregation, rebuilt to
hold nothing but their weights and ``num-examples``, and only when at least
``min-successful-clients`` of them arrived (else the round aggregates nothing and the round loop
retries or stops: ``fedspeech_server.run``). The reports of the last round are kept for the
server's bookkeeping (``fedspeech_server.rounds``). Weighted averages use ``num-examples``
(Flower's default key), which every training reply carries.

With Poisson sampling (``fedspeech_server.sampling``; always under user-level DP) the strategy draws the
round's cohort itself (every connected node independently with probability q) and lets Flower's
strategy build the messages for exactly that cohort; a round may then draw fewer clients than
``min-successful-clients``, or none, and needs only as many accepted updates as it drew.
Without it Flower draws a fixed-size cohort; where the run config sets ``dp-seed`` the draw is
seeded instead (``fedspeech_server.sampling.seeded_cohort``: the same nodes, the same cohorts).
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
from collections.abc import Iterable, Mapping, Sequence
from typing import TypedDict

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
from flwr.app.message import make_message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

import fedspeech.metric_keys as mk
from fedspeech.config import FedConfig
from fedspeech_server.grid import ForwardingGrid
from fedspeech_server.rounds import ClientReport
from fedspeech_server.sampling import Cohort, PoissonSampler, seeded_cohort
from fedspeech_server.screening import (
    ArraySpec,
    array_spec,
    reject_contributors,
    screen_replies,
    screen_sum,
    successes_needed,
)
from fedspeech_server.secagg import MIN_CLIENTS, SecureRound
from fedspeech_server.user_dp import UserDPRelease, UserLevelDP

log = logging.getLogger("fedspeech.server")

_NEGLIGIBLE_FRACTION = 1e-12  # see clients-per-round in _make_strategy


class ScreeningStrategy(FedAvg):
    """Base of the screened strategies: aggregate only the ``ok`` replies.

    It comes first in their bases, before the Flower strategy (``ScreenedFedAdam(
    ScreeningStrategy, FedAdam)``), so its ``super()`` calls reach that strategy at run time
    (FedAdam's server step, FedProx's ``proximal-mu``, FedMedian's median). It derives from
    FedAvg, the common base of all four, so that those calls are type-checked against Flower's
    signatures. ``configure_train`` remembers the names, shapes and dtypes of the weights it
    sends; replies must match them. Fewer accepted replies than ``successes_needed`` aggregate
    nothing. ``make_strategy`` sets the attributes below.
    """

    last_reports: Sequence[ClientReport] = ()  # one per sampled client, of the last round
    min_successful_clients: int = 1
    user_dp: UserLevelDP | None = None
    secure: bool = False
    sampler: PoissonSampler | None = None
    cohort_seed: int | None = None  # fixed-size draws from (seed, round) (None: Flower's own)
    min_connected: int = 1  # Poisson sampling: wait for this many connected nodes
    last_user_dp: UserDPRelease | None = None
    last_cohort: Cohort | None = None
    last_sampled: int = 0  # clients the round sampled (the cohort, with Poisson sampling)
    _contacted: int = 0
    _left_out: Sequence[ClientReport] = ()
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
        self.last_cohort, self._left_out = None, ()
        if self.sampler is not None:
            _, connected = sample_nodes(grid, self.min_connected, 0)  # waits for min-clients
            self.last_cohort = self.sampler.draw(connected, server_round)
            grid = _CohortGrid(grid, self.last_cohort.nodes)
        if self.sampler is None and self.cohort_seed is not None and self.fraction_train > 0:
            messages = self._seeded_round(self.cohort_seed, server_round, arrays, config, grid)
        else:
            messages = list(super().configure_train(server_round, arrays, config, grid))
        self.last_sampled = len(messages)
        if self.secure and self.sampler is not None and 0 < len(messages) < MIN_CLIENTS:
            # SecAgg+ cannot hide an update in a sum of fewer than 3. The draw stands (the
            # accountant assumes it): its clients are left out, as if they had dropped.
            reason = (
                f"left out: secure aggregation needs {MIN_CLIENTS} a round, {len(messages)} drawn"
            )
            log.warning("round %d: %s; the round releases noise only", server_round, reason)
            self._left_out = [
                ClientReport(
                    f"node-{m.metadata.dst_node_id}",
                    "failed",
                    {},
                    reason,
                    node=m.metadata.dst_node_id,
                )
                for m in messages
            ]
            messages = []
        self._contacted = len(messages)
        if self.user_dp is not None or self.secure:
            self._sent_arrays = {k: v.numpy() for k, v in arrays.items()}
        return messages

    def _seeded_round(
        self, seed: int, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Flower's fixed-size draw (same size, same wait for connected nodes), but from
        ``seeded_cohort``: Flower's strategy then builds the messages for exactly that cohort."""
        size = max(int(len(list(grid.get_node_ids())) * self.fraction_train), self.min_train_nodes)
        _, connected = sample_nodes(grid, max(self.min_available_nodes, size), 0)
        cohort = _CohortGrid(grid, seeded_cohort(connected, size, seed, server_round))
        kept = self.fraction_train, self.min_train_nodes, self.min_available_nodes
        self.fraction_train, self.min_train_nodes, self.min_available_nodes = 1.0, 0, 0
        try:  # Flower's sampler takes every node of the cohort
            return list(super().configure_train(server_round, arrays, config, cohort))
        finally:
            self.fraction_train, self.min_train_nodes, self.min_available_nodes = kept

    def successes_needed(self) -> int:
        """Accepted updates this round needs (``fedspeech_server.screening.successes_needed``)."""
        return successes_needed(
            self.min_successful_clients, self._contacted, poisson=self.sampler is not None
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, keep their reports, aggregate the accepted ones (if enough)."""
        self.last_user_dp = None
        screened = screen_replies(replies, self._sent)
        ok = screened.accepted
        self.last_reports = [*screened.reports, *self._left_out]
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
        return self._in_sent_dtypes(super().aggregate_train(server_round, to_average))

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
            self.last_reports = reject_contributors(self.last_reports, problem)
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
        aggregated = super().aggregate_train(server_round, [_aggregate_reply(new, server_round)])
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


class ScreenedFedAvg(ScreeningStrategy, FedAvg):
    """FedAvg (weighted by ``num-examples``) over the clients that trained."""


class ScreenedFedAdam(ScreeningStrategy, FedAdam):
    """FedAdam (server-side Adam on the averaged update) over the clients that trained."""


class ScreenedFedProx(ScreeningStrategy, FedProx):
    """FedProx: FedAvg that sends ``proximal-mu``; clients pull towards the global weights."""


class ScreenedFedMedian(ScreeningStrategy, FedMedian):
    """Coordinate-wise median of the trained clients' weights."""


def make_strategy(
    cfg: FedConfig,
    *,
    user_dp: UserLevelDP | None = None,
    secure: bool = False,
    sampler: PoissonSampler | None = None,
    cohort_seed: int | None = None,
) -> ScreeningStrategy:
    """The strategy ``cfg.strategy`` names, sampling ``fraction-train`` (at least ``min-clients``)
    of the connected nodes, or exactly ``clients-per-round`` of them, or (``sampler``) each node
    independently with the sampler's probability once ``min-clients`` are connected.

    It aggregates a round only when ``successes_needed`` updates were accepted; with ``user_dp``
    it aggregates them with that mechanism (clipping, uniform weights, noise, the expected
    cohort as denominator: ``user_dp`` needs ``sampler``); ``secure``: the rounds run through
    SecAgg+ (``aggregate_secure``). ``cohort_seed`` (the run config's ``dp-seed``): without
    ``sampler``, round r's fixed-size cohort is ``seeded_cohort(nodes, size, cohort_seed, r)``
    instead of Flower's unseeded draw.
    """
    if user_dp is not None and sampler is None:
        raise ValueError("user-level DP needs Poisson sampling (its accountant assumes it)")
    strategy = _make_strategy(cfg)
    strategy.min_successful_clients = cfg.min_successful_clients
    strategy.user_dp = user_dp
    strategy.secure = secure
    strategy.cohort_seed = cohort_seed
    if sampler is not None:
        # Flower's sampler then takes every node of the drawn cohort (_CohortGrid), in any order.
        strategy.sampler = sampler
        strategy.min_connected = cfg.min_clients
        strategy.fraction_train = 1.0
        strategy.min_train_nodes = 0
        strategy.min_available_nodes = 0
    return strategy


class _Sampling(TypedDict):
    """The keyword arguments (FedAvg's) that every strategy of ``_make_strategy`` takes."""

    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    weighted_by_key: str


def _make_strategy(cfg: FedConfig) -> ScreeningStrategy:
    common: _Sampling = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0,  # unused: the server runs no client-side evaluation rounds
        "min_train_nodes": cfg.min_clients,
        "min_evaluate_nodes": cfg.min_clients,
        "min_available_nodes": cfg.min_clients,
        "weighted_by_key": mk.NUM_EXAMPLES,
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
        return ScreenedFedAdam(eta=cfg.server_lr, **common)
    if cfg.strategy == "fedprox":
        # The clients apply the proximal term (fedspeech_client.proximal) with the mu this sends them.
        return ScreenedFedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.strategy == "fedmedian":
        return ScreenedFedMedian(**common)
    return ScreenedFedAvg(**common)


def _aggregate_reply(arrays: Mapping[str, np.ndarray], server_round: int) -> Message:
    """A reply carrying an already aggregated model (weight 1) for Flower's strategy."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord({mk.NUM_EXAMPLES: 1.0}),
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
    # Message's public constructors make instructions or replies to one; Flower builds a
    # message with given metadata (as this reply needs) with its own typed make_message.
    return make_message(metadata=metadata, content=content)


class _CohortGrid(ForwardingGrid):
    """The round's Grid as Flower's ``configure_train`` sees it: only the drawn cohort is
    connected, so Flower's sampler with fraction 1 and no minimum takes exactly those nodes.
    Everything else is the wrapped Grid's."""

    def __init__(self, grid: Grid, nodes: Iterable[int]) -> None:
        super().__init__(grid)
        self._nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        """The cohort's node ids."""
        return list(self._nodes)


def _weights_only(msg: Message) -> Message:
    """The reply as Flower's aggregation sees it: the weights and ``num-examples``, no more.

    Flower refuses to aggregate replies whose metric names differ; the server keeps its own
    metrics (``fedspeech_server.screening.client_report``), so a client's extra or missing
    metrics never stop a round.
    """
    metrics = msg.content.metric_records["metrics"]
    content = RecordDict(
        {
            "arrays": msg.content.array_records["arrays"],
            "metrics": MetricRecord({mk.NUM_EXAMPLES: metrics[mk.NUM_EXAMPLES]}),
        }
    )
    # A reply with the original's metadata (sender, reply-to): Flower's make_message (see
    # _aggregate_reply).
    return make_message(metadata=msg.metadata, content=content)


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
