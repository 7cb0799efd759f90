"""Which clients take part in a round: Poisson sampling, as the user-level accountant assumes.

Under user-level DP (``privacy-unit = user | both``) every connected node joins a round
independently with probability q, and the clipped sum is divided by the *expected* cohort q N
(``Cohort.expected``), never by the number of nodes drawn or of replies. This is the sampled
Gaussian mechanism of Mironov, Talwar & Zhang 2019 ("Renyi Differential Privacy of the Sampled
Gaussian Mechanism") that Opacus's ``RDPAccountant`` evaluates, so the user-level epsilon is that
accountant's, with no approximation. Flower's own sampling (a fixed-size sample without
replacement) is a different mechanism, for which Poisson accounting understates epsilon; it is kept
for runs without user-level DP (sample-level DP charges each client's own DP-SGD, which does not
depend on how the server picks clients).

q comes from ``client-sample-rate``, or, when that is 0, from ``clients-per-round`` (q = m / N for
the N nodes connected) or ``fraction-train`` (q = fraction); the derivation is logged. The
population N is treated as public (the size of the fleet), as in McMahan et al. 2018. No Flower
here.

Without Poisson sampling Flower draws a fixed-size cohort from Python's unseeded ``random``;
``seeded_cohort`` replaces that draw where the run config sets ``dp-seed``
(``fedspeech_server.strategy``), so two runs over the same nodes train the same clients each round
(a benchmark comparing DP with non-DP on the same cohorts, a reproducible experiment).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from fedspeech.config import FedConfig

log = logging.getLogger("fedspeech.server")


@dataclass(frozen=True)
class Cohort:
    """One round's draw.

    Attributes:
        nodes: the node ids that joined the round (possibly none).
        population: N, the nodes connected when the round was drawn.
        sample_rate: q, each node's probability of joining.
    """

    nodes: tuple[int, ...]
    population: int
    sample_rate: float

    @property
    def expected(self) -> float:
        """q N: the expected cohort size, the fixed denominator of the user-level mean."""
        return self.sample_rate * self.population


class PoissonSampler:
    """Draws each round's cohort: every node independently with probability q.

    Args:
        cfg: federation settings (``client-sample-rate``, ``clients-per-round``,
            ``fraction-train``).
        seed: None (default): draws from OS entropy (who joins a round must stay unpredictable
            to whoever would exploit it). An int (the run's ``dp-seed``, for tests): round r
            draws from a generator seeded with (seed, r), so a resumed run continues the
            sequence instead of repeating it.
    """

    def __init__(self, cfg: FedConfig, seed: int | None = None) -> None:
        self.cfg = cfg
        self.seed = seed
        self._entropy = np.random.default_rng()
        self._explained: tuple[float, int] | None = None

    def rate(self, population: int) -> float:
        """q for a population of ``population`` connected nodes (the derivation is logged)."""
        cfg = self.cfg
        if cfg.client_sample_rate > 0:
            q, why = cfg.client_sample_rate, "client-sample-rate"
        elif cfg.clients_per_round > 0:
            q = min(1.0, cfg.clients_per_round / population)
            why = f"clients-per-round {cfg.clients_per_round} / {population} connected nodes"
        else:
            q, why = cfg.fraction_train, "fraction-train"
        if self._explained != (q, population):
            log.info(
                "Poisson client sampling: each of the %d connected nodes joins a round with "
                "probability q = %.4g (from %s); expected cohort %.3g",
                population,
                q,
                why,
                q * population,
            )
            self._explained = (q, population)
        return q

    def draw(self, node_ids: Sequence[int], server_round: int) -> Cohort:
        """Round ``server_round``'s cohort out of the connected ``node_ids``.

        Raises:
            ValueError: no node is connected.
        """
        if not node_ids:
            raise ValueError("no connected nodes to sample from")
        q = self.rate(len(node_ids))
        rng = (
            self._entropy if self.seed is None else np.random.default_rng((self.seed, server_round))
        )
        joins = rng.random(len(node_ids)) < q  # (N,) one independent coin per node
        return Cohort(
            nodes=tuple(int(n) for n, j in zip(node_ids, joins, strict=True) if j),
            population=len(node_ids),
            sample_rate=q,
        )


def seeded_cohort(
    node_ids: Iterable[int], size: int, seed: int, server_round: int
) -> tuple[int, ...]:
    """``size`` of ``node_ids`` without replacement (all of them if fewer), drawn for round
    ``server_round`` from a generator seeded with ``(seed, server_round)`` over the sorted ids:
    the same nodes, seed and round give the same cohort in any run, whatever order the ids come in.
    """
    pool = sorted(int(n) for n in node_ids)  # (N,)
    rng = np.random.default_rng((seed, server_round))
    chosen = rng.choice(len(pool), size=min(size, len(pool)), replace=False)  # (m,) indices
    return tuple(pool[i] for i in chosen)
