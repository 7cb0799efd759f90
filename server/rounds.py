"""Per-round bookkeeping of the server: client replies -> one round summary (no Flower here).

The summary's keys are the stable per-round metric names the run folder, the console and the
tracker report: ``train_loss`` (mean over trained clients, weighted by examples), ``wer``, ``cer``
(central evaluation), ``epsilon_max`` / ``epsilon_mean`` (each reporting client's total so far),
``clients_ok`` / ``clients_declined`` / ``clients_failed`` / ``clients_rejected``, ``retries``
(re-sends of a round that fell short of ``min-successful-clients``), ``num_examples``,
``update_norm`` (L2 norm of the change of the global weights), ``train_seconds`` (sending to aggregating),
``round_seconds`` (the whole round, evaluation and checkpoint included), ``client_seconds`` (sum of
the replies' ``seconds``: the clients' own work), ``client_cpu_seconds`` (sum of their
``cpu-seconds``: the CPU time of that work), ``eval_seconds`` (central evaluation),
``clients_sampled`` (clients the round's last attempt sampled: with Poisson sampling, the draw),
``exchanged_weights`` (weights sent to each client and accepted back: only the trained ones,
``fedspeech.exchange``).
With user-level DP (``fedspeech_server.user_dp``): ``user_epsilon`` (the run's user-level epsilon so far, at
``user-delta``), ``user_clip_norm`` (the clipping norm of the round), ``user_noise_std`` (std of the
noise on the averaged update), ``user_sample_rate`` (clients sampled / connected) and, with
adaptive clipping, ``user_unclipped_share`` (the noisy share of unclipped updates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

import torch
from torch import Tensor

import fedspeech.metric_keys as mk

ReplyStatus = Literal["ok", "declined", "failed", "rejected"]
_STATUSES: tuple[ReplyStatus, ...] = get_args(ReplyStatus)


@dataclass(frozen=True)
class ClientReport:
    """One client's reply to a training round, as the server saw it.

    Attributes:
        client: ``partition-<i>`` for simulated nodes, else ``node-<node id>``.
        status: ``ok`` (weights aggregated), ``declined`` (budget), ``failed`` (error reply, no
            reply before the timeout) or ``rejected`` (a reply whose update the server refused:
            non-finite values, wrong names/shapes/dtypes, a bad example count).
        metrics: the reply's metrics (empty for failures).
        reason: why it declined, failed or was rejected.
        node: the Flower node id it came from, or was sent to (None: not known). A failure
            carries no partition id: ``update_clients`` files it under the partition this node
            replied as before (or after).
    """

    client: str
    status: ReplyStatus
    metrics: Mapping[str, float] = field(default_factory=dict)
    reason: str = ""
    node: int | None = None


@dataclass(frozen=True)
class RoundSummary:
    """One round, summarised (see the module docstring for the keys)."""

    round: int
    clients_ok: int
    clients_declined: int
    clients_failed: int
    num_examples: int
    train_loss: float | None
    epsilon_max: float | None
    epsilon_mean: float | None
    train_seconds: float
    clients_rejected: int = 0
    retries: int = 0
    update_norm: float | None = None
    wer: float | None = None
    cer: float | None = None
    round_seconds: float | None = None
    client_seconds: float | None = None
    client_cpu_seconds: float | None = None
    eval_seconds: float | None = None
    user_epsilon: float | None = None
    user_clip_norm: float | None = None
    user_noise_std: float | None = None
    user_sample_rate: float | None = None
    user_unclipped_share: float | None = None
    clients_sampled: int | None = None
    exchanged_weights: int | None = None

    def metrics(self) -> dict[str, float]:
        """The numeric metrics that are set (for a tracker's ``log_round``)."""
        return {
            k: float(v)
            for k, v in asdict(self).items()
            if k != "round" and v is not None and math.isfinite(float(v))
        }

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form (non-finite numbers as null)."""
        return {k: _finite(v) for k, v in asdict(self).items()}

    def line(self) -> str:
        """One console line."""
        eps = (
            f"eps max {self.epsilon_max:.3f} mean {self.epsilon_mean:.3f}"
            if self.epsilon_max is not None and self.epsilon_mean is not None
            else "eps -"
        )
        if self.user_epsilon is not None:
            eps += f", user eps {self.user_epsilon:.3f}"
        return (
            f"round {self.round}: loss {_fmt(self.train_loss)}, WER {_fmt(self.wer)}, "
            f"CER {_fmt(self.cer)}, {eps}, clients ok {self.clients_ok} / declined "
            f"{self.clients_declined} / failed {self.clients_failed} / rejected "
            f"{self.clients_rejected}, {_fmt(self.round_seconds, '.1f')} s"
        )


def summarize_round(
    server_round: int, reports: Sequence[ClientReport], train_seconds: float
) -> RoundSummary:
    """Count the replies, average the loss over trained clients, collect epsilon."""
    ok = [r for r in reports if r.status == "ok"]
    weights = [r.metrics.get(mk.NUM_EXAMPLES, 0.0) for r in ok]
    losses = [r.metrics.get(mk.TRAIN_LOSS, math.nan) for r in ok]
    pairs = [(w, x) for w, x in zip(weights, losses, strict=True) if math.isfinite(x) and w > 0]
    total = sum(w for w, _ in pairs)
    loss = sum(w * x for w, x in pairs) / total if total else None
    eps = [
        r.metrics[mk.EPSILON] for r in reports if r.status != "failed" and mk.EPSILON in r.metrics
    ]
    seconds = [r.metrics[mk.SECONDS] for r in reports if mk.SECONDS in r.metrics]
    cpu = [r.metrics[mk.CPU_SECONDS] for r in reports if mk.CPU_SECONDS in r.metrics]
    return RoundSummary(
        round=server_round,
        clients_ok=len(ok),
        clients_declined=sum(r.status == "declined" for r in reports),
        clients_failed=sum(r.status == "failed" for r in reports),
        clients_rejected=sum(r.status == "rejected" for r in reports),
        num_examples=int(sum(weights)),
        train_loss=loss,
        epsilon_max=max(eps) if eps else None,
        epsilon_mean=sum(eps) / len(eps) if eps else None,
        train_seconds=train_seconds,
        client_seconds=sum(seconds) if seconds else None,
        client_cpu_seconds=sum(cpu) if cpu else None,
    )


def shortfall(reports: Sequence[ClientReport], minimum: int) -> str | None:
    """Why a round's replies are too few to aggregate (None: at least ``minimum`` are ``ok``).

    The text counts every status and names each client that did not train, with its reason.
    """
    ok = sum(r.status == "ok" for r in reports)
    if ok >= minimum:
        return None
    others = "; ".join(f"{r.client} {r.status}: {r.reason}" for r in reports if r.status != "ok")
    return (
        f"{ok} of {len(reports)} sampled clients trained, fewer than min-successful-clients "
        f"{minimum}" + (f" ({others})" if others else "")
    )


def retry_may_help(reports: Sequence[ClientReport]) -> bool:
    """Whether re-sending a short round can help: some client failed or was rejected.

    Clients that declined (privacy budget spent) decline again; a retry only spends time.
    """
    return any(r.status in ("failed", "rejected") for r in reports)


def with_evaluation(
    summary: RoundSummary,
    *,
    wer: float | None,
    cer: float | None,
    update_norm: float | None,
    eval_seconds: float | None = None,
) -> RoundSummary:
    """The summary with the central evaluation and the update norm filled in."""
    return replace(
        summary,
        wer=_finite(wer),
        cer=_finite(cer),
        update_norm=update_norm,
        eval_seconds=eval_seconds,
    )


def update_norm(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> float:
    """L2 norm of ``after - before`` over all tensors (0.0: the global model did not change)."""
    squares = sum(float(torch.sum((after[k].double() - before[k].double()) ** 2)) for k in before)
    return math.sqrt(squares)


def update_clients(
    table: dict[str, dict[str, Any]], server_round: int, reports: Sequence[ClientReport]
) -> None:
    """Fold a round's replies into the per-client table (in place).

    A report named by its node only (``node-<id>``: a failure, which carries no partition id)
    goes to the row of the client that node replied as before; a named report takes over an
    earlier ``node-<id>`` row of its node. Rows remember their node id (``node``).
    """
    for r in reports:
        name = r.client
        if r.node is not None:
            anonymous = f"node-{r.node}"
            if name == anonymous:
                name = next((k for k, v in table.items() if v.get("node") == r.node), name)
            elif anonymous in table:
                _fold_row(table, table.pop(anonymous), name)
        row = table.setdefault(name, _new_row())
        if r.node is not None:
            row["node"] = r.node
        row[f"rounds_{r.status}"] = row.get(f"rounds_{r.status}", 0) + 1  # older rows lack some
        row["last_round"] = server_round
        if mk.EPSILON in r.metrics:
            row["epsilon"] = _finite(r.metrics[mk.EPSILON])
        if mk.EPSILON_BUDGET in r.metrics:
            row["epsilon_budget"] = _finite(r.metrics[mk.EPSILON_BUDGET])
        if r.metrics.get(mk.RECHARGED):
            row["rounds_recharged"] = row.get("rounds_recharged", 0) + 1
        if r.metrics.get(mk.NUM_EXAMPLES):
            row["num_examples"] = int(r.metrics[mk.NUM_EXAMPLES])
        if r.reason:
            row["last_reason"] = r.reason


def _new_row() -> dict[str, Any]:
    return {**{f"rounds_{s}": 0 for s in _STATUSES}, "epsilon": None}


def _fold_row(table: dict[str, dict[str, Any]], old: Mapping[str, Any], name: str) -> None:
    """Add ``old``'s round counts to row ``name``; its last reason stays if ``name`` has none."""
    row = table.setdefault(name, _new_row())
    for key, value in old.items():
        if key.startswith("rounds_"):
            row[key] = row.get(key, 0) + value
    row.setdefault("last_reason", old.get("last_reason", ""))
    row["last_round"] = max(row.get("last_round", 0), old.get("last_round", 0))


def clients_tsv(table: Mapping[str, Mapping[str, Any]]) -> str:
    """The per-client table as TSV text (one row per client, sorted)."""
    columns = ["client", *(f"rounds_{s}" for s in _STATUSES), "num_examples"]
    columns += ["epsilon", "last_round", "last_reason"]
    return _tsv(table, columns)


PRIVACY_COLUMNS = (
    "client",
    "epsilon",
    "epsilon_budget",
    "budget_left",
    "rounds_ok",
    "rounds_declined",
    "rounds_recharged",
)


def privacy_summary(table: Mapping[str, Mapping[str, Any]]) -> str:
    """Per client: epsilon spent (its last report), budget, budget left, rounds trained and
    declined, and rounds charged twice (a rerun of an attempt cut off by an interruption, or a
    retry), as TSV; clients that never reported an epsilon show ``-``."""
    rows: dict[str, dict[str, Any]] = {}
    for client, row in table.items():
        eps, budget = row.get("epsilon"), row.get("epsilon_budget")
        left = None if eps is None or budget is None else max(0.0, budget - eps)
        rows[client] = {
            **row,
            "epsilon": None if eps is None else f"{eps:.4f}",
            "epsilon_budget": budget,
            "budget_left": None if left is None else f"{left:.4f}",
            "rounds_recharged": row.get("rounds_recharged", 0),
        }
    return _tsv(rows, list(PRIVACY_COLUMNS), missing="-")


def _tsv(table: Mapping[str, Mapping[str, Any]], columns: Sequence[str], missing: str = "") -> str:
    lines = ["\t".join(columns)]
    for client in sorted(table):
        row = {"client": client, **{f"rounds_{s}": 0 for s in _STATUSES}, **table[client]}
        lines.append("\t".join(missing if row.get(c) is None else str(row.get(c)) for c in columns))
    return "\n".join(lines) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)
