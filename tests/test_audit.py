"""Privacy audit: the one-run epsilon lower bound (Steinke et al. 2023) and ``fedspeech audit``,
which catches the leak of non-private training and stays below the accountant's epsilon with
DP-SGD at epsilon 8.
"""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedspeech.app.cli import main as cli_main
from fedspeech.audit_bound import audit_p_value, epsilon_lower_bound
from fedspeech_client.audit import AuditSettings, guess_membership
from fedspeech_server.tracking import read_rounds

DELTA = 1e-5

# ---------------------------------------------------------------- the bound


def test_perfect_guesses_give_a_bound_that_grows_with_the_number_of_correct_guesses() -> None:
    # Execute: r = v perfect guesses out of 1000 canaries, for growing r
    bounds = [epsilon_lower_bound(1000, r, r, DELTA) for r in (10, 20, 50, 100, 200)]
    # Assert: positive and growing
    assert bounds[0] > 0
    assert all(b > a for a, b in pairwise(bounds))
    # ... and with r fixed, more right is more evidence
    fixed = [epsilon_lower_bound(1000, 100, v, DELTA) for v in (60, 70, 80, 90, 100)]
    assert all(b > a for a, b in pairwise(fixed))


def test_without_delta_perfect_guesses_give_the_closed_form() -> None:
    # P[Binomial(r, q) >= r] = q^r = 1 - confidence  =>  eps = ln(q / (1 - q))
    for r in (5, 40, 300):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(10_000, r, r, 0.0) == pytest.approx(
            math.log(q / (1 - q)), abs=1e-6
        )


def test_random_guesses_give_no_evidence() -> None:
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(200):  # 200 audits whose 40 guesses are coin flips
        v = int(rng.binomial(40, 0.5))
        bounds.append(epsilon_lower_bound(200, 40, v, DELTA))
    # At 95% confidence, at most ~5% of chance-level audits may show any bound, and small ones
    assert np.mean(np.array(bounds) > 0) <= 0.08
    assert np.median(bounds) == 0.0 and max(bounds) < 1.0


def test_the_delta_term_only_weakens_the_evidence() -> None:
    for eps in (0.0, 1.0, 3.0):
        assert audit_p_value(1000, 50, 45, eps, 1e-3) >= audit_p_value(1000, 50, 45, eps, 0.0)
    p = [audit_p_value(1000, 50, 45, eps, DELTA) for eps in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(b >= a for a, b in pairwise(p))  # larger eps explains more
    assert epsilon_lower_bound(1000, 50, 50, 1e-3) < epsilon_lower_bound(1000, 50, 50, 0.0)


@pytest.mark.parametrize(("m", "r", "v"), [(10, 20, 5), (10, 5, 6), (10, 5, -1)])
def test_impossible_counts_are_refused(m: int, r: int, v: int) -> None:
    with pytest.raises(ValueError, match="guesses"):
        epsilon_lower_bound(m, r, v, DELTA)


def test_guesses_are_the_top_and_bottom_scores() -> None:
    scores = np.array([0.3, 5.0, -2.0, 1.0, 0.0, 4.0])
    assert guess_membership(scores, 2).tolist() == [0, 1, -1, 0, -1, 1]
    with pytest.raises(ValueError, match="guesses"):
        AuditSettings(canaries=10, guesses=6)


# ---------------------------------------------------------------- fedspeech audit

# A 1-layer GRU-32 on 64 synthetic utterances + 200 canaries (4 letters, 30 frames), 20 epochs.
AUDIT: dict[str, Any] = {
    **{"synthetic-utterances": 64, "n-mfcc": 13, "n-mels": 40, "hidden-size": 32},
    **{"num-layers": 1, "dropout": 0.0, "epochs": 20, "batch-size": 16, "lr": 0.01},
    **{"delta": DELTA, "dp-seed": 0, "client-threads": 1, "experiment-name": "audit"},
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One corpus, feature cache and MLflow database for the module's audits."""
    return tmp_path_factory.mktemp("audit")


def _audit(shared: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    settings = {
        **AUDIT,
        "data-dir": str(shared / "data"),
        "tracking-uri": f"sqlite:///{shared / 'mlflow.db'}",
        **overrides,
    }
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
    assert cli_main(["audit", "--run-dir", str(out), "--run-config", run_config]) == 0
    return json.loads((out / "report" / "audit.json").read_text())


def _mlflow_metrics(shared: Path, out: Path) -> dict[str, float]:
    from mlflow import MlflowClient

    run_id = json.loads((out / "tracking.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{shared / 'mlflow.db'}")
    return dict(client.get_run(run_id).data.metrics)


def test_audit_detects_the_leak_of_training_without_dp(
    shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    result = _audit(shared, tmp_path / "off", dp=False)
    # Assert: every guess right, a clearly positive lower bound, no accountant epsilon
    assert result["canaries"] == 200 and result["guesses"] == 40
    assert result["correct"] >= 38, result
    assert result["epsilon_lower"] > 2.0 and result["epsilon"] is None
    printed = capsys.readouterr().out
    assert f"empirical epsilon lower bound: {result['epsilon_lower']:.3f}" in printed
    assert "accountant epsilon: none" in printed
    # Assert: recorded in the audit folder and in MLflow
    (row,) = read_rounds(tmp_path / "off")
    assert row["audit_epsilon_lower"] == pytest.approx(result["epsilon_lower"])
    metrics = _mlflow_metrics(shared, tmp_path / "off")
    assert metrics["audit_epsilon_lower"] == pytest.approx(result["epsilon_lower"])
    assert "epsilon" not in metrics
    print(f"\naudit without DP: {result['correct']}/{result['guesses']} right, "
          f"epsilon >= {result['epsilon_lower']:.3f}, {result['seconds']:.1f} s")  # fmt: skip


def test_audit_with_dp_sgd_at_epsilon_8_stays_below_the_accountant(
    shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    result = _audit(shared, tmp_path / "on", **{"target-epsilon": 8.0})
    # Assert: the accountant spent at most 8, and the audit proves less
    assert result["epsilon"] is not None and 7.5 < result["epsilon"] <= 8.0
    assert result["epsilon_lower"] < result["epsilon"]
    assert result["epsilon_lower"] < 1.0  # far from the perfect 40/40 of training without DP
    printed = capsys.readouterr().out
    assert f"accountant epsilon: {result['epsilon']:.3f}" in printed
    metrics = _mlflow_metrics(shared, tmp_path / "on")
    assert metrics["epsilon"] == pytest.approx(result["epsilon"])
    assert metrics["audit_epsilon_lower"] == pytest.approx(result["epsilon_lower"])
    print(f"\naudit with DP-SGD (eps {result['epsilon']:.2f}): {result['correct']}/"
          f"{result['guesses']} right, epsilon >= {result['epsilon_lower']:.3f}, "
          f"{result['seconds']:.1f} s")  # fmt: skip
