"""A client's privacy ledger: the Opacus accountant history, serialisable across rounds.

Every epsilon here comes from the real Opacus accountant (RDP or PRV) over the full history; nothing
is estimated any other way.

>>> state = PrivacyState(mechanism="rdp", history=((1.0, 0.01, 1000),))
>>> PrivacyState.from_json(state.to_json()) == state
True
>>> round(state.epsilon(1e-5), 2)
2.1
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import get_args

from opacus.accountants import IAccountant, create_accountant

from fedspeech.train_config import AccountantName

# (noise_multiplier, sample_rate, num_steps): the entry format of Opacus's accountant history.
HistoryEntry = tuple[float, float, int]
# Opacus's get_noise_multiplier bisects sigma starting from [0, 10], doubling the upper end.
_SIGMA_START = 10.0
_SIGMA_MAX = 1e6


class PrivacyBudgetError(ValueError):
    """The requested guarantee cannot be met (budget already spent or too small)."""


@dataclass(frozen=True)
class PrivacyState:
    """Immutable accountant state: mechanism name and the (sigma, q, steps) history."""

    mechanism: AccountantName = "rdp"
    history: tuple[HistoryEntry, ...] = ()

    def __post_init__(self) -> None:
        if self.mechanism not in get_args(AccountantName):
            raise ValueError(f"accountant must be one of {get_args(AccountantName)}")
        for sigma, q, steps in self.history:
            if not (sigma > 0 and 0 < q <= 1 and steps >= 0):
                raise ValueError(f"invalid history entry {(sigma, q, steps)}")

    @property
    def num_steps(self) -> int:
        """DP-SGD steps recorded so far."""
        return sum(steps for _, _, steps in self.history)

    def epsilon(self, delta: float) -> float:
        """Total epsilon spent at ``delta`` (0.0 for an empty history)."""
        return _epsilon(self.mechanism, self.history, delta)

    def would_exceed(
        self,
        budget: float,
        delta: float,
        next_noise: float,
        next_sample_rate: float,
        next_steps: int,
    ) -> bool:
        """Whether ``next_steps`` more steps at (noise, sample rate) would spend over ``budget``."""
        extra = ((next_noise, next_sample_rate, next_steps),) if next_steps > 0 else ()
        return _epsilon(self.mechanism, self.history + extra, delta) > budget

    def to_accountant(self) -> IAccountant:
        """A fresh Opacus accountant holding this history."""
        accountant = create_accountant(mechanism=self.mechanism)
        self.restore_into(accountant)
        return accountant

    def restore_into(self, accountant: IAccountant) -> None:
        """Load this history into an accountant (e.g. ``PrivacyEngine().accountant``)."""
        accountant.load_state_dict({"history": list(self.history), "mechanism": self.mechanism})

    @classmethod
    def from_accountant(cls, accountant: IAccountant) -> PrivacyState:
        """Snapshot an accountant's state."""
        state = accountant.state_dict()
        history = tuple((float(s), float(q), int(n)) for s, q, n in state["history"])
        return cls(mechanism=state["mechanism"], history=history)

    def to_json(self) -> str:
        """Compact JSON; floats round-trip exactly (shortest repr)."""
        return json.dumps({"mechanism": self.mechanism, "history": [list(h) for h in self.history]})

    @classmethod
    def from_json(cls, text: str) -> PrivacyState:
        """Inverse of ``to_json``. Raises ValueError on malformed input."""
        try:
            data = json.loads(text)
            history = tuple((float(s), float(q), int(n)) for s, q, n in data["history"])
            return cls(mechanism=data["mechanism"], history=history)
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a privacy state: {exc}") from exc


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: PrivacyState,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to ``epsilon_tolerance``) keeping the total within budget.

    The total is the accountant's epsilon over ``prior.history`` plus ``steps`` new steps at
    ``sample_rate``. This is Opacus's ``get_noise_multiplier`` bisection, extended with the prior
    history (which Opacus's function cannot take); with an empty history both give the same sigma.

    Raises:
        PrivacyBudgetError: the prior history alone already spends ``target_epsilon``, or no sigma
            up to 1e6 meets it.
    """
    if steps < 1:
        raise PrivacyBudgetError(f"no steps left to plan for (steps={steps})")
    if prior.epsilon(delta) >= target_epsilon:
        raise PrivacyBudgetError(
            f"epsilon {prior.epsilon(delta):.3f} already spent >= target {target_epsilon}"
        )

    def total(sigma: float) -> float:
        return _epsilon(prior.mechanism, (*prior.history, (sigma, sample_rate, steps)), delta)

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


def _epsilon(mechanism: str, history: Sequence[HistoryEntry], delta: float) -> float:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not any(steps for _, _, steps in history):
        return 0.0
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = [h for h in history if h[2] > 0]
    return float(accountant.get_epsilon(delta=delta))
