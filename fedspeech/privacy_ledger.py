"""The privacy ledger: what a DP mechanism did, and the epsilon an accountant puts on it.

One type for both privacy units: a client's DP-SGD steps (sample level, ``client/``) and the
server's aggregation rounds (user level, ``server/``). A ledger is only the recorded history,
``(noise multiplier, sample rate, steps)`` entries in Opacus's accountant format, plus the delta its
guarantee is stated at; an accountant (Opacus RDP or PRV) only *evaluates* it. Switching the
accountant therefore never loses or resets spend, and a ledger's delta can only go down
(``at_delta``): a setting can make the reported epsilon larger, never smaller.

>>> ledger = PrivacyLedger(delta=1e-5).record(1.0, 0.01, 1000)
>>> PrivacyLedger.from_json(ledger.to_json()) == ledger
True
>>> round(ledger.epsilon("rdp"), 2)
2.1
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, get_args

import numpy as np

from fedspeech.rdp_store import CurveStore, cache_dir, source_digest

__all__ = [
    "AccountantName",
    "HistoryEntry",
    "PrivacyBudgetError",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "epsilon_of",
]

log = logging.getLogger(__name__)

AccountantName = Literal["rdp", "prv"]
# (noise_multiplier, sample_rate, num_steps): the entry format of Opacus's accountant history.
HistoryEntry = tuple[float, float, int]
# Opacus's get_noise_multiplier bisects sigma starting from [0, 10], doubling the upper end.
_SIGMA_START = 10.0
_SIGMA_MAX = 1e6


class PrivacyBudgetError(ValueError):
    """The requested guarantee cannot be met (budget already spent or too small)."""


@dataclass(frozen=True)
class PrivacyLedger:
    """Immutable record of a Gaussian mechanism's runs: the history and its delta.

    Attributes:
        delta: the delta every epsilon of this ledger is stated at.
        history: ``(noise multiplier, sample rate, steps)`` entries in the order recorded;
            consecutive steps with the same (noise, rate) share one entry, as in Opacus.
    """

    delta: float
    history: tuple[HistoryEntry, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        for sigma, q, steps in self.history:
            if not (sigma > 0 and 0 < q <= 1 and steps >= 0):
                raise ValueError(f"invalid history entry {(sigma, q, steps)}")

    @property
    def num_steps(self) -> int:
        """Steps (DP-SGD steps, or user-level rounds) recorded so far."""
        return sum(steps for _, _, steps in self.history)

    def record(self, noise: float, sample_rate: float, steps: int = 1) -> PrivacyLedger:
        """The ledger with ``steps`` more runs at (noise, sample rate) appended."""
        if steps < 1:
            return self
        history = list(self.history)
        if history and history[-1][:2] == (noise, sample_rate):
            history[-1] = (noise, sample_rate, history[-1][2] + steps)
        else:
            history.append((noise, sample_rate, steps))
        return PrivacyLedger(self.delta, tuple(history))

    def at_delta(self, delta: float) -> PrivacyLedger:
        """This history stated at the smaller of its delta and ``delta`` (never a larger one)."""
        if delta >= self.delta:
            return self
        log.info("privacy ledger: delta %.3g -> %.3g (the smaller one holds)", self.delta, delta)
        return PrivacyLedger(delta, self.history)

    def merge(self, other: PrivacyLedger) -> PrivacyLedger:
        """Both histories (disjoint runs of the mechanism, composed) at the smaller delta."""
        return PrivacyLedger(min(self.delta, other.delta), self.history + other.history)

    def epsilon(self, accountant: AccountantName = "rdp") -> float:
        """Total epsilon spent at ``self.delta`` (0.0 for an empty history)."""
        return epsilon_of(self.history, self.delta, accountant)

    def would_exceed(
        self,
        budget: float,
        accountant: AccountantName,
        noise: float,
        sample_rate: float,
        steps: int,
    ) -> bool:
        """Whether ``steps`` more runs at (noise, sample rate) would spend more than ``budget``."""
        return self.record(noise, sample_rate, steps).epsilon(accountant) > budget

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; floats round-trip exactly (shortest repr)."""
        return {"delta": self.delta, "history": [list(h) for h in self.history]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, delta: float | None = None) -> PrivacyLedger:
        """Inverse of ``to_dict``.

        Also reads the files of fedspeech before the one-ledger format, which named their
        accountant (``mechanism``) and kept no delta: ``delta`` supplies it for them.

        Raises:
            ValueError: malformed input, or no delta in it and none given.
        """
        try:
            history = tuple((float(s), float(q), int(n)) for s, q, n in data["history"])
            stated = data.get("delta", delta)
            if stated is None:
                raise ValueError("the ledger states no delta")
            return cls(float(stated), history)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a privacy ledger: {exc!r}") from exc

    def to_json(self) -> str:
        """Compact JSON of ``to_dict``."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str, *, delta: float | None = None) -> PrivacyLedger:
        """Inverse of ``to_json`` (see ``from_dict``). Raises ValueError on malformed input."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a privacy ledger: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("not a privacy ledger: not a JSON object")
        return cls.from_dict(data, delta=delta)


def epsilon_of(history: Sequence[HistoryEntry], delta: float, accountant: AccountantName) -> float:
    """Opacus's epsilon of ``history`` at ``delta``.

    PRV's numerical composition can fail on some histories (``RuntimeError("Discrete mean differs
    significantly ...")``, ``"Cannot compute epsilon"``: opacus#601, #604); the RDP bound of the
    same history is then used instead, with a warning that names the history. RDP is a valid
    (looser) bound of the same mechanism, so the claim stays true.
    """
    if accountant not in get_args(AccountantName):
        raise ValueError(f"accountant must be one of {get_args(AccountantName)}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    steps = [h for h in history if h[2] > 0]
    if not steps:
        return 0.0
    if accountant == "prv":
        # Lazy: importing opacus takes ~2 s, which runs without PRV need not pay (RDP: below).
        from opacus.accountants import create_accountant

        try:
            return _prv_epsilon(create_accountant(mechanism="prv"), steps, delta)
        except (RuntimeError, ValueError, OverflowError) as exc:
            log.warning(
                "PRV accountant failed on history %s at delta %g (%s: %s); reporting the RDP "
                "bound of the same history instead (valid, and at least as large)",
                steps,
                delta,
                type(exc).__name__,
                exc,
            )
    return _rdp_epsilon(steps, delta)


def _prv_epsilon(accountant: Any, history: list[HistoryEntry], delta: float) -> float:
    accountant.history = list(history)
    eps = float(accountant.get_epsilon(delta=delta))
    if math.isnan(eps):
        raise RuntimeError("the accountant returned NaN")
    return eps


def _rdp_epsilon(history: list[HistoryEntry], delta: float) -> float:
    """Opacus ``RDPAccountant.get_epsilon`` of ``history``, the same arithmetic in the same order.

    Opacus computes the RDP curve of every entry afresh (``compute_rdp(q, sigma, steps) =
    steps * curve(q, sigma)``): 0.28 s per (sigma, q < 1) here, paid every round by a server
    that reports its user-level epsilon (2000 rounds: 9 min). The curve of one step is memoised
    per (sigma, q) (``_rdp_curve``); the result is bit-identical (tests/test_user_dp.py).
    """
    rdp = sum(_rdp_curve(sigma, q) * steps for sigma, q, steps in history)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": more orders could give a tighter bound; the one
        # returned is still a valid upper bound, and the warning filled every client's log.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps, _ = rdp_analysis().get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=4096)  # a pure function of its arguments: no state leaks through
def _rdp_curve(sigma: float, q: float) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism at Opacus's default orders (read-only).

    Also kept on disk for the other processes and runs of this user (``fedspeech.rdp_store``).
    """
    store = curve_store()
    curve = store.get(sigma, q) if store is not None else None
    if curve is None:
        curve = np.asarray(
            rdp_analysis().compute_rdp(
                q=q, noise_multiplier=sigma, steps=1, orders=list(RDP_ORDERS)
            ),
            dtype=np.float64,
        )
        if store is not None:
            store.put(sigma, q, curve)
    curve.setflags(write=False)
    return curve


_STORES: dict[Path, CurveStore] = {}


def curve_store() -> CurveStore | None:
    """The on-disk RDP curves of this user's cache folder (None: ``FEDSPEECH_CACHE_DIR=""``)."""
    root = cache_dir()
    if root is None:
        return None
    if root not in _STORES:
        code = source_digest(Path(str(rdp_analysis().__file__)))
        _STORES[root] = CurveStore(root, RDP_ORDERS, code)
    return _STORES[root]


# Opacus's ``RDPAccountant.DEFAULT_ALPHAS`` (tests/test_privacy.py holds them equal).
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
_RDP_MODULE = "opacus.accountants.analysis.rdp"


@functools.cache
def rdp_analysis() -> ModuleType:
    """Opacus's RDP analysis module (``opacus.accountants.analysis.rdp``), without Opacus's package.

    ``import opacus`` runs the package's ``__init__`` (privacy engine, optimizers, the GDP
    accountant with scipy.stats, torch.distributed): ~2 s here, which the simulation's pre-flight
    privacy plan and the server paid for epsilon alone (docs/benchmarks.md, federation
    overhead). The module itself needs only numpy and scipy.special, so its file is loaded on its
    own: the same code, the same arithmetic. Where Opacus is already imported, its module is
    used as it is.
    """
    loaded = sys.modules.get(_RDP_MODULE)
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("opacus")  # finds the package without importing it
    if package is None or package.origin is None:
        raise ImportError("opacus is not installed")
    path = Path(package.origin).parent / "accountants" / "analysis" / "rdp.py"
    spec = importlib.util.spec_from_file_location("fedspeech._opacus_rdp_analysis", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    prior: PrivacyLedger,
    accountant: AccountantName = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to ``epsilon_tolerance``) keeping the total within the target.

    The total is the accountant's epsilon over ``prior.history`` plus ``steps`` new steps at
    ``sample_rate``, at ``prior.delta``. This is Opacus's ``get_noise_multiplier`` bisection,
    extended with the prior history (which Opacus's function cannot take); with an empty history
    both give the same sigma.

    Raises:
        PrivacyBudgetError: the prior history alone already spends ``target_epsilon``, or no sigma
            up to 1e6 meets it.
    """
    if steps < 1:
        raise PrivacyBudgetError(f"no steps left to plan for (steps={steps})")
    spent = prior.epsilon(accountant)
    if spent >= target_epsilon:
        raise PrivacyBudgetError(f"epsilon {spent:.3f} already spent >= target {target_epsilon}")

    def total(sigma: float) -> float:
        return prior.record(sigma, sample_rate, steps).epsilon(accountant)

    sigma_low, sigma_high, eps_high = 0.0, _SIGMA_START, math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2
        if sigma_high > _SIGMA_MAX:
            raise PrivacyBudgetError(f"target epsilon {target_epsilon} is too low")
        eps_high = total(sigma_high)
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = total(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high
