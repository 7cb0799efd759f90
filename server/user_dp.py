"""User-level differential privacy at the server: clip every client's update, add noise once, account.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models") with
optional quantile-based adaptive clipping (Andrew et al. 2021, "Differentially Private Learning
with Adaptive Clipping"). One round, for the cohort that Poisson sampling drew (``fedspeech_server.sampling``:
each of the N connected nodes joins with probability q)::

    delta_i = w_i - w                                 client i's update (its weights - the global)
    c_i     = delta_i * min(1, C / ||delta_i||)        ||c_i|| <= C (one L2 norm over all tensors)
    mean    = (sum_i c_i + N(0, (z_u C)^2 I)) / (q N)  noise on the SUM: std z_u C; fixed denominator
    w'      = w + mean

Every client weighs the same (not its number of examples) and the denominator is q N, the
*expected* cohort, fixed before any client is drawn: neither the number drawn nor the number that
replied enters the release, and a client that failed, declined or was rejected adds a zero update.
Adding or removing one client changes the sum by at most C, so each round is the sampled Gaussian
mechanism with multiplier z_u and rate q (noise std on the mean z_u C / (q N)).

Adaptive clipping also releases the noisy share of unclipped updates
``b = (sum_i (1[||delta_i|| <= C] - 1/2) + N(0, sigma_b^2)) / (q N) + 1/2`` and moves
``C <- C exp(-eta (b - gamma))``, so C drifts to the gamma-quantile of the update norms. Centred
indicators give the count sensitivity 1/2, and the pair (update sum with noise z_u C, count with
noise sigma_b) is a Gaussian mechanism with multiplier z, ``z^-2 = z_u^-2 + (2 sigma_b)^-2``
(Andrew et al., Theorem 1): for the configured total z the update gets the larger
``z_u = (z^-2 - (2 sigma_b)^-2)^-1/2`` and the accountant charges z. The clipping norm is then a
function of earlier noisy releases only.

Accounting: one step per released round of the sampled Gaussian mechanism with multiplier z and
rate q, recorded in the run's ``fedspeech.privacy_ledger.PrivacyLedger`` (``UserDPState``) and
evaluated by Opacus's RDP accountant, which is exact for Poisson sampling. Nothing here imports
Flower.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedspeech.privacy_config import PrivacyConfig
from fedspeech.privacy_ledger import PrivacyLedger
from fedspeech_server.sampling import Cohort

__all__ = [
    "UserDPRelease",
    "UserDPState",
    "UserLevelDP",
    "clip_update",
    "count_noise_stddev",
    "flat_norm",
    "next_clip_norm",
    "noisy_unclipped_share",
    "update_noise_multiplier",
]

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]


def flat_norm(arrays: Arrays) -> float:
    """L2 norm of all arrays together, as one flat vector (in float64)."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in arrays.values()))


def clip_update(delta: Arrays, clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """``delta`` scaled to L2 norm at most ``clip_norm`` (float64), and its norm before clipping."""
    norm = flat_norm(delta)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, dtype=np.float64) * scale for k, v in delta.items()}, norm


def count_noise_stddev(cfg: PrivacyConfig, expected: float) -> float:
    """sigma_b: the configured one, else ``max(q N / 20, z)`` (Andrew et al.'s m/20, >= z).

    ``expected`` is the expected cohort q N, not the number drawn: the noise must not depend on
    who was sampled.
    """
    if cfg.user_clip_count_stddev is not None:
        return cfg.user_clip_count_stddev
    return max(expected / 20, cfg.user_noise_multiplier)


def update_noise_multiplier(noise_multiplier: float, count_stddev: float | None) -> float:
    """z_u, the update's share of a total multiplier z when the count gets noise sigma_b.

    ``(z^-2 - (2 sigma_b)^-2)^-1/2`` (Andrew et al. 2021); ``count_stddev`` None: z itself.

    >>> round(update_noise_multiplier(1.0, 1.0), 4)
    1.1547

    Raises:
        ValueError: ``2 sigma_b <= z`` (the count alone would spend the whole budget).
    """
    if count_stddev is None:
        return noise_multiplier
    if 2 * count_stddev <= noise_multiplier:
        raise ValueError(f"count noise {count_stddev} must exceed z / 2 = {noise_multiplier / 2}")
    return float((noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5)


def noisy_unclipped_share(
    unclipped: float,
    contributors: int,
    expected: float,
    count_stddev: float,
    rng: np.random.Generator,
) -> float:
    """Noisy share of an expected cohort of ``expected`` clients whose update was not clipped.

    ``unclipped`` of the ``contributors`` were not clipped. The indicators are centred (each
    contributes +-1/2: sensitivity 1/2); clients without an update contribute 0, i.e. count as
    half clipped.

    >>> round(noisy_unclipped_share(3, 4, 4.0, 1e-12, np.random.default_rng(0)), 6)
    0.75
    """
    centred = unclipped - contributors / 2
    return float((centred + rng.normal(0.0, count_stddev)) / expected + 0.5)


def next_clip_norm(clip_norm: float, unclipped_share: float, quantile: float, lr: float) -> float:
    """Andrew et al.'s geometric update ``C exp(-lr (share - quantile))``.

    >>> next_clip_norm(1.0, 0.5, 0.5, 0.2)
    1.0
    """
    return float(clip_norm * math.exp(-lr * (unclipped_share - quantile)))


def _float_arrays(arrays: Arrays) -> dict[str, np.ndarray]:
    """The floating-point arrays of ``arrays`` in float64 (the ones DP clips and noises)."""
    return {
        k: np.asarray(v, dtype=np.float64)
        for k, v in arrays.items()
        if np.asarray(v).dtype.kind == "f"
    }


@dataclass(frozen=True)
class UserDPRelease:
    """What one round's user-level DP aggregation did (no per-client information).

    Attributes:
        noise_multiplier: z, what the accountant charges for the round.
        update_noise_multiplier: z_u, the multiplier of the noise on the update sum (= z with
            fixed clipping, larger with adaptive clipping).
        sample_rate: q, each node's probability of joining the round.
        clip_norm: C used this round.
        next_clip_norm: C for the next round (= C with fixed clipping).
        sampled: clients the Poisson draw picked (recorded, never used by the release).
        population: N, nodes connected when the round was drawn.
        expected: q N, the mean's fixed denominator.
        noise_std: std of the noise on the mean, z_u C / (q N).
        unclipped_share: the noisy share of unclipped updates (adaptive clipping only).
    """

    noise_multiplier: float
    update_noise_multiplier: float
    sample_rate: float
    clip_norm: float
    next_clip_norm: float
    sampled: int
    population: int
    expected: float
    noise_std: float
    unclipped_share: float | None = None


class UserLevelDP:
    """The server's user-level DP mechanism, holding the current clipping norm.

    Args:
        cfg: the privacy settings.
        clip_norm: the clipping norm to continue from (a resumed run); None: ``user-clip-norm``.
        rng: noise source; None: a generator seeded from OS entropy (whoever knows a seed can
            subtract the noise, so fix one only in tests).
    """

    def __init__(
        self,
        cfg: PrivacyConfig,
        *,
        clip_norm: float | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.cfg = cfg
        self.clip_norm = clip_norm if clip_norm is not None else cfg.user_clip_norm
        self.rng = rng if rng is not None else np.random.default_rng()

    def release(
        self, global_arrays: Arrays, updates: Sequence[Arrays], *, cohort: Cohort
    ) -> tuple[dict[str, np.ndarray], UserDPRelease]:
        """The private aggregate: global weights + the noisy mean of clipped updates.

        Args:
            global_arrays: the weights the clients were sent (name -> array).
            updates: the accepted clients' returned weights (same names, shapes, dtypes); may be
                empty (nobody drawn, or nobody replied): the round then releases noise only.
            cohort: the round's Poisson draw (its expected size q N is the denominator).

        Returns:
            The new global weights (the template's dtypes; non-float arrays kept as they were)
            and the round's record. With adaptive clipping ``self.clip_norm`` moves on.
        """
        clip_norm = self.clip_norm
        base = _float_arrays(global_arrays)
        total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in base.items()}
        unclipped = 0
        for update in updates:
            delta = {k: np.asarray(update[k], dtype=np.float64) - base[k] for k in base}
            update_clipped, norm = clip_update(delta, clip_norm)
            for key, value in update_clipped.items():
                total[key] += value
            unclipped += norm <= clip_norm
        return self.release_sum(
            global_arrays, total, contributors=len(updates), unclipped=unclipped, cohort=cohort
        )

    def release_sum(
        self,
        global_arrays: Arrays,
        clipped_sum: Arrays,
        *,
        contributors: int,
        unclipped: float,
        cohort: Cohort,
    ) -> tuple[dict[str, np.ndarray], UserDPRelease]:
        """The private aggregate from the SUM of clipped updates (e.g. a secure aggregate).

        With secure aggregation the clients clip their own updates to ``self.clip_norm``
        (``fedspeech_client.secagg``) and the server only learns the sum; the noise, the fixed
        denominator and the accounting are the same as in ``release``.

        Args:
            global_arrays: the weights the clients were sent.
            clipped_sum: sum of the contributors' clipped updates, per float array of the global
                weights.
            contributors: clients whose clipped update is in the sum (0: noise only).
            unclipped: how many of them were not clipped (adaptive clipping; else unused).
            cohort: the round's Poisson draw (at least ``contributors`` nodes).
        """
        if not 0 <= contributors <= len(cohort.nodes) or cohort.expected <= 0:
            raise ValueError(
                f"need 0 <= contributors ({contributors}) <= drawn ({len(cohort.nodes)}) and an "
                f"expected cohort > 0 (q {cohort.sample_rate}, N {cohort.population})"
            )
        cfg, clip_norm, expected = self.cfg, self.clip_norm, cohort.expected
        base = _float_arrays(global_arrays)
        z = cfg.user_noise_multiplier
        count_stddev = count_noise_stddev(cfg, expected) if cfg.adaptive_clipping else None
        z_update = update_noise_multiplier(z, count_stddev)
        noise_std = z_update * clip_norm
        mean = {}
        for key, like in base.items():  # one draw per coordinate, in the global weights' order
            total = np.asarray(clipped_sum[key], dtype=np.float64).reshape(like.shape)
            mean[key] = (total + self.rng.normal(0.0, noise_std, size=like.shape)) / expected
        new = {
            k: (base[k] + mean[k]).astype(np.asarray(v).dtype) if k in mean else np.array(v)
            for k, v in global_arrays.items()
        }
        share, following = None, clip_norm
        if count_stddev is not None:
            share = noisy_unclipped_share(unclipped, contributors, expected, count_stddev, self.rng)
            following = next_clip_norm(clip_norm, share, cfg.user_clip_quantile, cfg.user_clip_lr)
            self.clip_norm = following
        release = UserDPRelease(
            noise_multiplier=z,
            update_noise_multiplier=z_update,
            sample_rate=cohort.sample_rate,
            clip_norm=clip_norm,
            next_clip_norm=following,
            sampled=len(cohort.nodes),
            population=cohort.population,
            expected=expected,
            noise_std=z_update * clip_norm / expected,
            unclipped_share=share,
        )
        log.info(
            "user-level DP: %d update(s) clipped to %.4g, mean over the expected cohort %.3g "
            "noised with std %.3g (z %.3g, q %.4g)",
            contributors,
            clip_norm,
            expected,
            release.noise_std,
            z_update,
            cohort.sample_rate,
        )
        return new, release


@dataclass(frozen=True)
class UserDPState:
    """The user-level privacy a run has spent, kept in the checkpoint so that it survives restarts.

    Attributes:
        ledger: one entry per released round: (z, q, rounds) at ``user-delta``.
        last_round: the last round charged (a round is charged once, when it is checkpointed).
        clip_norm: the clipping norm for the next round (None: ``user-clip-norm``).
    """

    ledger: PrivacyLedger
    last_round: int = 0
    clip_norm: float | None = None

    def record(self, server_round: int, release: UserDPRelease) -> UserDPState:
        """The state with ``server_round`` charged.

        Raises:
            ValueError: the round is not after the last one charged (it would count twice).
        """
        if server_round <= self.last_round:
            raise ValueError(
                f"round {server_round} is already accounted (ledger at round {self.last_round})"
            )
        ledger = self.ledger.record(release.noise_multiplier, release.sample_rate)
        return UserDPState(ledger, server_round, release.next_clip_norm)

    def epsilon(self) -> float:
        """User-level epsilon spent at the ledger's delta (Opacus RDP; 0.0 before any round)."""
        return self.ledger.epsilon("rdp")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (``RunState.user_privacy``)."""
        return {
            "ledger": self.ledger.to_dict(),
            "last_round": self.last_round,
            "clip_norm": self.clip_norm,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, delta: float) -> UserDPState:
        """Inverse of ``to_dict``; empty data (a run without user-level DP so far) is empty.

        Also reads checkpoints of earlier versions (history, accountant and last round at the
        top level, no delta: ``delta`` is then the run's ``user-delta``).

        Raises:
            ValueError: a malformed state.
        """
        if not data:
            return cls(PrivacyLedger(delta))
        try:
            ledger = PrivacyLedger.from_dict(data.get("ledger", data), delta=delta)
            clip = data.get("clip_norm")
            return cls(
                ledger.at_delta(delta),
                int(data["last_round"]),
                None if clip is None else float(clip),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a user-level privacy state: {exc!r}") from exc
