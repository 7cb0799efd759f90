"""Which privacy unit a federated run protects, and the server's user-level DP settings.

``privacy-unit`` picks the guarantee (see ``docs/privacy.md``): ``sample`` is the clients' DP-SGD
(one utterance's influence on what a client sends is bounded), ``user`` is central DP at the server
(one client's whole update is clipped and noised: everything a speaker or site contributed), and
``both`` runs the two. The ``dp`` key of the train section stays the master switch: ``dp = false``
is the non-private baseline and cannot be combined with a user-level unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

PrivacyUnit = Literal["sample", "user", "both"]


@dataclass(frozen=True)
class PrivacyConfig:
    """User-level DP settings (the ``privacy`` section of the run config).

    Attributes:
        privacy_unit: ``sample`` (clients' DP-SGD only), ``user`` (server-side clipping and noise
            only: clients train without DP-SGD), ``both``.
        user_noise_multiplier: z: noise std on the sum of clipped client updates / clipping norm.
            With adaptive clipping this is the noise multiplier of the combined mechanism (update
            and clipped-count noise together), the one the accountant charges.
        user_clip_norm: C, the L2 bound of one client's update (with adaptive clipping: its
            starting value).
        adaptive_clipping: move C each round towards the ``user-clip-quantile`` of the update
            norms (Andrew et al. 2021), from a noisy count of unclipped updates.
        user_clip_quantile: target share of updates left unclipped (adaptive clipping).
        user_clip_lr: geometric step of C per round (Andrew et al.'s eta_C; 0.2 in the paper).
        user_clip_count_stddev: sigma_b, the noise std on the count of unclipped updates; None:
            ``max(sampled clients / 20, z)`` (Andrew et al.'s m/20, but never below z so that the
            update noise grows by at most 15%). Must exceed ``z / 2``.
        user_delta: delta of the user-level guarantee (should be below 1 / number of clients).
    """

    privacy_unit: PrivacyUnit = "sample"
    user_noise_multiplier: float = 1.0
    user_clip_norm: float = 1.0
    adaptive_clipping: bool = False
    user_clip_quantile: float = 0.5
    user_clip_lr: float = 0.2
    user_clip_count_stddev: float | None = None
    user_delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.privacy_unit not in get_args(PrivacyUnit):
            raise ValueError(f"privacy-unit must be one of {get_args(PrivacyUnit)}")
        if self.user_noise_multiplier <= 0 or self.user_clip_norm <= 0:
            raise ValueError("user-noise-multiplier and user-clip-norm must be > 0")
        if not 0 < self.user_clip_quantile < 1 or self.user_clip_lr <= 0:
            raise ValueError("user-clip-quantile must be in (0, 1) and user-clip-lr > 0")
        if not 0 < self.user_delta < 1:
            raise ValueError("user-delta must be in (0, 1)")
        stddev = self.user_clip_count_stddev
        if stddev is not None and 2 * stddev <= self.user_noise_multiplier:
            raise ValueError(
                f"user-clip-count-stddev {stddev} must exceed user-noise-multiplier / 2 "
                f"({self.user_noise_multiplier / 2}): the clipped-count noise alone would spend "
                "the whole privacy budget"
            )

    @property
    def user_level(self) -> bool:
        """The unit includes users (``user`` or ``both``)."""
        return self.privacy_unit in ("user", "both")

    @property
    def sample_level(self) -> bool:
        """The unit includes samples (``sample`` or ``both``)."""
        return self.privacy_unit in ("sample", "both")
