"""Empirical epsilon lower bound of a one-run privacy audit (Steinke, Nasr & Jagielski 2023).

"Privacy Auditing with One (1) Training Run", NeurIPS 2023, arXiv:2305.08846. In the audit, m
canaries are each included in the training data independently with probability 1/2; after one
training run the auditor guesses "in" or "out" for r of them (abstaining on the rest) and gets v
right. Their main theorem: if the training is (epsilon, delta)-DP, then for every v

    P[V >= v] <= f(v) + 2 m delta max_{i = 1..v} (f(v - i) - f(v)) / i,
    f(k) = P[W >= k],  W ~ Binomial(r, e^eps / (1 + e^eps)),

i.e. the number of correct guesses is (up to the delta term) no better than r independent
guesses that are each right with probability e^eps / (1 + e^eps), randomized response at
epsilon. That right-hand side is a p-value for the hypothesis "the training is (epsilon,
delta)-DP"; ``epsilon_lower_bound`` returns the largest epsilon that the observation rejects at
the given confidence, by bisection over epsilon as in their Appendix D. The p-value grows with
epsilon, so every smaller epsilon is rejected too. Pure math (scipy), no training here.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

__all__ = ["audit_p_value", "epsilon_lower_bound"]

_BISECTION_STEPS = 30  # as in the paper's code: the bracket [k, k + 1] shrinks to ~1e-9
_EPSILON_CAP = 1_000.0  # beyond this e^eps / (1 + e^eps) is 1 in float64: nothing to bound


def _check(m: int, r: int, v: int, delta: float) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of at least ``v`` correct guesses out of ``r`` if the training is (eps, delta)-DP.

    The right-hand side of Steinke et al.'s main theorem (module docstring), capped at 1.

    Args:
        m: canaries, each included with probability 1/2.
        r: guesses made (abstentions excluded).
        v: correct guesses.
        epsilon: the hypothesised epsilon (>= 0).
        delta: the hypothesised delta.

    >>> round(audit_p_value(100, 10, 10, 0.0, 0.0), 6)  # ten coin flips all right: 2^-10
    0.000977
    """
    _check(m, r, v, delta)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    tail = float(binom.sf(v - 1, r, q))  # f(v) = P[W >= v]
    alpha = 0.0
    if v > 0 and delta > 0:
        below = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[W = v - i], i = 1..v
        # (f(v - i) - f(v)) / i = P[v - i <= W < v] / i
        alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The empirical epsilon lower bound: the largest epsilon rejected at ``confidence``.

    With probability at least ``confidence`` (over the canaries' coin flips), a training that
    is (epsilon, delta)-DP does not produce ``v`` correct guesses out of ``r`` with an epsilon
    above the returned one. 0.0 when the guesses are no evidence against epsilon = 0.

    Args:
        m: canaries, each included with probability 1/2.
        r: guesses made (abstentions excluded).
        v: correct guesses.
        delta: the delta of the guarantee under audit.
        confidence: e.g. 0.95.

    >>> round(epsilon_lower_bound(1000, 10, 5, 1e-5), 6)  # chance level: no evidence
    0.0
    >>> round(epsilon_lower_bound(1000, 40, 40, 0.0), 3)  # ln(x / (1 - x)), x = 0.05^(1/40)
    2.554
    """
    _check(m, r, v, delta)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    p = 1.0 - confidence
    low, high = 0.0, 1.0  # keep audit_p_value(low) < p <= audit_p_value(high)
    if audit_p_value(m, r, v, low, delta) >= p:
        return 0.0
    while audit_p_value(m, r, v, high, delta) < p:
        high += 1.0
        if high > _EPSILON_CAP:
            return _EPSILON_CAP
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        if audit_p_value(m, r, v, mid, delta) < p:
            low = mid
        else:
            high = mid
    return low
