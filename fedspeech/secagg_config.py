"""Secure aggregation settings (the ``secagg`` section of the run config).

With ``secure-aggregation = true`` a round runs Flower's SecAgg+ protocol (Bell et al. 2020, the
``SecAggPlusWorkflow`` / ``secaggplus_mod`` pair): every client masks its quantized update, and the
server can unmask only the sum over the clients that finished the protocol. See
``fedspeech_server.secagg`` (server side), ``fedspeech_client.secagg`` (client side) and docs/privacy.md.

``secagg-num-shares`` and ``secagg-reconstruction-threshold`` follow Flower's convention: an
integer is a count, a float in (0, 1] a share (of the clients sampled, resp. of the shares).
"""

from __future__ import annotations

from dataclasses import dataclass

# Flower's default modulus (2^32): the masked sums live in Z_(2^32).
MODULUS_RANGE = 2**32


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation settings.

    Attributes:
        secure_aggregation: run every training round through SecAgg+ (the server sees only the
            sum of the clients' updates).
        secagg_num_shares: neighbours each client secret-shares its keys with, itself included:
            an integer > 2, or a float share of the clients sampled (1.0: all of them, i.e. the
            original SecAgg). More shares tolerate more dropouts and cost more.
        secagg_reconstruction_threshold: shares needed to reconstruct a key: an integer below
            ``secagg-num-shares``, or a float share of them. Higher is safer against a server that
            also controls some clients; lower tolerates more dropouts.
        secagg_max_weight: the largest aggregation weight (``num-examples``) a client may have;
            larger ones are capped (with user-level DP every client weighs 1 and this is unused).
            Too large a value costs precision: weights are quantized relative to it.
        secagg_clipping_range: updates (client weights minus the global ones) are clipped to
            [-r, r] per coordinate before quantization (a client logs a warning when it clips).
        secagg_quantization_range: number of quantization levels over [-r, r]; the sum of the
            clients sampled must stay below 2^32, i.e. clients x levels < 2^32 (2^24: at most
            255 clients a round).

    The unmasked mean is off by at most ``m * 2 r / levels / sum_i(w_i / max_weight)`` per
    coordinate (m contributors with weights w_i; stochastic rounding: zero on average).
    """

    secure_aggregation: bool = False
    secagg_num_shares: int | float = 1.0
    secagg_reconstruction_threshold: int | float = 0.67
    secagg_max_weight: float = 1000.0
    secagg_clipping_range: float = 1.0
    secagg_quantization_range: int = 2**24

    def __post_init__(self) -> None:
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if isinstance(shares, float) and not 0 < shares <= 1:
            raise ValueError("secagg-num-shares as a float must be in (0, 1]")
        if isinstance(shares, int) and shares != 1 and shares <= 2:
            raise ValueError("secagg-num-shares as an integer must be > 2")
        if isinstance(threshold, float) and not 0 < threshold <= 1:
            raise ValueError("secagg-reconstruction-threshold as a float must be in (0, 1]")
        if isinstance(threshold, int) and threshold < 1:
            raise ValueError("secagg-reconstruction-threshold must be >= 1")
        if (
            isinstance(shares, int)
            and isinstance(threshold, int)
            and shares != 1
            and threshold >= shares
        ):
            raise ValueError("secagg-reconstruction-threshold must be below secagg-num-shares")
        if self.secagg_max_weight <= 0 or self.secagg_clipping_range <= 0:
            raise ValueError("secagg-max-weight and secagg-clipping-range must be > 0")
        if not 1 < self.secagg_quantization_range < MODULUS_RANGE // 2:
            raise ValueError(f"secagg-quantization-range must be in (1, {MODULUS_RANGE // 2})")

    def max_clients(self) -> int:
        """The most clients a round may sum before the 2^32 modulus overflows."""
        return MODULUS_RANGE // self.secagg_quantization_range - 1
