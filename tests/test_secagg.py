"""Secure aggregation (SecAgg+, issue 8 part 2).

In-process: the ServerApp's round (``fedspeech_server.secagg`` + the strategy) talks to ClientApps through a
grid that delivers copies of every message to ClientApps in this process, each with its own
``Context`` as the simulation engine keeps one per node (``benchmarks.inprocess``). The ClientApps
run ``fedspeech_client.secagg``'s mod around a stand-in training handler that returns a fixed update per
node, so the secure aggregate can be compared with plain FedAvg on the very same updates. The
slow test runs the real app through ``fedspeech simulate`` with a client that crashes after
sharing its keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray

from benchmarks.inprocess import InProcessGrid
from fedspeech.config import ConfigError, RunConfig
from fedspeech_client.secagg import (
    NonFiniteUpdate,
    SecureAggregationRequired,
    masked_input,
    quantization_safe_norm,
    secure_aggregation_mod,
)
from fedspeech_server.sampling import Cohort, PoissonSampler
from fedspeech_server.secagg import run_secure_round
from fedspeech_server.strategy import make_strategy
from fedspeech_server.user_dp import UserLevelDP
from tests.conftest import TINY_SIMULATION

pytestmark = pytest.mark.usefixtures("flower_server_identity")

SHAPES = {"enc.weight": (6, 5), "enc.bias": (6,), "out.weight": (3, 6), "out.bias": (3,)}
GLOBAL = {
    k: np.random.default_rng(99).normal(0, 0.5, s).astype(np.float32) for k, s in SHAPES.items()
}
GLOBAL["steps"] = np.array([7], dtype=np.int64)  # a non-float tensor: kept, never summed
EXAMPLES = [10, 30, 20, 40]  # num-examples of nodes 0..3 (node ids are 100 + partition id)
MASKED = "masked_params"  # Flower's key of the masked vector in the SecAgg+ record


def _update(partition: int, scale: float) -> dict[str, np.ndarray]:
    """Node ``partition``'s trained weights: the global ones + its own fixed random step."""
    rng = np.random.default_rng(partition)
    out = {k: (v + scale * rng.normal(0, 1, v.shape)).astype(v.dtype) for k, v in GLOBAL.items()}
    out["steps"] = GLOBAL["steps"] + 1
    return out


app = ClientApp()


@app.train(mods=[secure_aggregation_mod])
def _train(msg: Message, context: Context) -> Message:
    """Stand-in for fedspeech_client.app's handler; ``node_config`` says how this node behaves."""
    partition = int(str(context.node_config["partition-id"]))
    behaviour = str(context.node_config.get("behaviour", "ok"))
    if behaviour == "crash":
        raise RuntimeError("injected crash after training")
    metrics = MetricRecord(
        {"num-examples": EXAMPLES[partition], "train-loss": 1.0, "partition-id": partition}
    )
    if behaviour == "decline":
        metrics["declined"] = 1
        content = RecordDict({"metrics": metrics, "decline": ConfigRecord({"reason": "budget"})})
        return Message(content, reply_to=msg)
    metrics["declined"] = 0
    scale = float(str(context.node_config.get("scale", 0.01)))
    arrays = ArrayRecord({k: Array(v) for k, v in _update(partition, scale).items()})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _run_config(**overrides: Any) -> dict[str, Any]:
    flat = RunConfig().to_flat()
    flat.update({"min-clients": 4, "secagg-num-shares": 1.0})
    flat.update({"secagg-reconstruction-threshold": 0.67, "round-timeout": 60.0})
    flat.update(overrides)
    return flat


def _grid(
    flat: dict[str, Any], behaviour: dict[int, str] | None = None, scale: float = 0.01
) -> InProcessGrid:
    contexts = {}
    for partition in range(4):
        node_config: dict[str, Any] = {"partition-id": partition, "num-partitions": 4}
        node_config.update({"behaviour": (behaviour or {}).get(partition, "ok"), "scale": scale})
        contexts[100 + partition] = Context(
            run_id=1, node_id=100 + partition, node_config=node_config, state=RecordDict(),
            run_config=flat,
        )  # fmt: skip
    return InProcessGrid(app, contexts)


def _round(
    flat: dict[str, Any], grid: InProcessGrid, user_dp: UserLevelDP | None = None
) -> tuple[dict[str, np.ndarray] | None, Any]:
    """One training round as fedspeech_server.app runs it (secure or plain, as ``flat`` says)."""
    cfg = RunConfig.from_flat(flat)
    sampler = PoissonSampler(cfg.fed, seed=0) if cfg.poisson_sampling else None  # q = 1 here
    strategy: Any = make_strategy(
        cfg.fed, user_dp=user_dp, secure=cfg.secure_aggregation, sampler=sampler
    )
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    if cfg.secure_aggregation:
        floats = [k for k, v in GLOBAL.items() if v.dtype.kind == "f"]
        secure = run_secure_round(grid, messages, cfg, server_round=1, float_names=floats)
        new, _ = strategy.aggregate_secure(1, secure)
    else:
        new, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))
    result = None if new is None else {k: v.numpy() for k, v in new.items()}
    return result, strategy


def _quantization_bound(weighted: list[int], zero_weight: int = 0) -> float:
    """Largest error of the unmasked weighted mean per weight (SecAggConfig's docstring).

    ``weighted``: the partitions in the mean; ``zero_weight``: contributors of weight 0.
    """
    sa = RunConfig().secagg
    step = 2 * sa.secagg_clipping_range / sa.secagg_quantization_range
    ratio = sum(EXAMPLES[p] / sa.secagg_max_weight for p in weighted)
    return (len(weighted) + zero_weight) * step / ratio + 1e-6  # + float32 rounding


def _fedavg(partitions: list[int]) -> dict[str, np.ndarray]:
    total = sum(EXAMPLES[p] for p in partitions)
    return {
        k: sum(EXAMPLES[p] * _update(p, 0.01)[k].astype(np.float64) for p in partitions) / total
        for k in SHAPES
    }


@pytest.fixture()
def quiet_flower(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Flower logs every protocol stage; keep the test output to warnings."""
    caplog.set_level("WARNING")
    yield


# ------------------------------------------------------------------------------------- (a), (b)


def test_secure_aggregate_equals_fedavg_and_the_server_sees_only_masked_vectors(
    quiet_flower: None,
) -> None:
    # Prepare: the same four client updates, aggregated plainly and through SecAgg+
    plain_grid, secure_grid = (
        _grid(_run_config()),
        _grid(_run_config(**{"secure-aggregation": True})),
    )
    # Execute
    plain, _ = _round(_run_config(), plain_grid)
    secure, strategy = _round(_run_config(**{"secure-aggregation": True}), secure_grid)
    # Assert (a): equal within the quantization error
    assert plain is not None and secure is not None
    expected = _fedavg([0, 1, 2, 3])
    bound = _quantization_bound([0, 1, 2, 3])
    for key in SHAPES:
        np.testing.assert_allclose(plain[key], expected[key], atol=1e-6)
        np.testing.assert_allclose(secure[key], plain[key], atol=bound, rtol=0)
        assert np.abs(secure[key] - plain[key]).max() > 0  # it did go through quantization
        assert secure[key].dtype == np.float32
    assert secure["steps"].tolist() == GLOBAL["steps"].tolist()  # not summed, kept as sent
    assert [r.status for r in strategy.last_reports] == ["ok"] * 4
    assert {r.metrics["train-loss"] for r in strategy.last_reports} == {1.0}  # metrics in clear
    # Assert (b): no reply the server received holds an array or a client's update in any form
    stages = [d.stage for d in secure_grid.deliveries]
    assert (
        stages
        == ["setup"] * 4 + ["share_keys"] * 4 + ["collect_masked_vectors"] * 4 + ["unmask"] * 4
    )
    updates = [_update(p, 0.01) for p in range(4)]
    needles = [u[k].tobytes()[:32] for u in updates for k in SHAPES]  # float32 weights
    needles += [
        (u[k].astype(np.float64) - GLOBAL[k]).tobytes()[:32] for u in updates for k in SHAPES
    ]  # float64 updates
    masked_vectors = 0
    for reply in secure_grid.replies:
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        payload = b"".join(_bytes_in(reply.content))
        assert not any(needle in payload for needle in needles)
        record = reply.content.config_records["secaggplus_configs"]
        if MASKED in record:
            masked_vectors += 1
            vectors = [bytes_to_ndarray(b) for b in record[MASKED]]  # type: ignore[union-attr]
            flat = np.concatenate([v.reshape(-1) for v in vectors[1:]]).astype(np.float64)
            assert all(v.dtype.kind in "iu" for v in vectors)  # integers mod 2^32, no floats
            assert flat.min() >= 0 and flat.max() < 2**32
            assert 0.35 < flat.mean() / 2**32 < 0.65  # masked: spread over the whole ring
    assert masked_vectors == 4


def _bytes_in(content: RecordDict) -> Iterator[bytes]:
    for record in content.values():
        if isinstance(record, ArrayRecord):
            yield from (a.data for a in record.values())
        elif isinstance(record, ConfigRecord):
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes):
                        yield item


# ------------------------------------------------------------------------------------------- (c)


def test_a_client_dropping_after_sharing_keys_leaves_the_sum_of_the_others(
    quiet_flower: None,
) -> None:
    # Prepare: partition 3 crashes in the masked-input stage, after setup and key sharing
    flat = _run_config(**{"secure-aggregation": True, "min-successful-clients": 3})
    grid = _grid(flat, behaviour={3: "crash"})
    # Execute
    secure, strategy = _round(flat, grid)
    # Assert: node 103 took part in the first two stages, failed in the third
    assert {(d.stage, d.ok) for d in grid.deliveries if d.node == 103} == {
        ("setup", True),
        ("share_keys", True),
        ("collect_masked_vectors", False),
    }
    # Assert: the round completed with the other three's FedAvg (their masks were removed with
    # the dropped client's reconstructed key)
    assert secure is not None
    expected = _fedavg([0, 1, 2])
    for key in SHAPES:
        np.testing.assert_allclose(
            secure[key], expected[key], atol=_quantization_bound([0, 1, 2]), rtol=0
        )
    statuses = {r.client: (r.status, r.reason) for r in strategy.last_reports}
    assert [statuses[f"partition-{p}"][0] for p in range(3)] == ["ok"] * 3
    assert statuses["node-103"][0] == "failed"
    assert "collect_masked_vectors" in statuses["node-103"][1]
    assert "injected crash" in statuses["node-103"][1]


def test_too_many_dropouts_halt_the_round_without_an_aggregate(quiet_flower: None) -> None:
    # Prepare: 2 of 4 crash; a key needs 3 shares (0.67 x 4)
    flat = _run_config(**{"secure-aggregation": True})
    grid = _grid(flat, behaviour={2: "crash", 3: "crash"})
    # Execute
    secure, strategy = _round(flat, grid)
    # Assert: nothing aggregated; every client failed (the survivors because the round halted)
    assert secure is None
    assert [r.status for r in strategy.last_reports] == ["failed"] * 4
    reasons = " ".join(r.reason for r in strategy.last_reports)
    assert "injected crash" in reasons and "reconstruction threshold" in reasons


def test_fewer_than_three_clients_are_refused(quiet_flower: None) -> None:
    # Prepare: a federation of 2 (the sum of two reveals each to the other)
    flat = _run_config(**{"secure-aggregation": True, "min-clients": 2})
    grid = _grid(flat)
    grid.contexts = {k: v for k, v in grid.contexts.items() if k < 102}
    # Execute
    secure, strategy = _round(flat, grid)
    # Assert: nothing sent, nothing aggregated, the reason reported
    assert secure is None and grid.deliveries == []
    assert [r.status for r in strategy.last_reports] == ["failed"] * 2
    assert "at least 3 sampled clients" in strategy.last_reports[0].reason


class _TwoDrawn(PoissonSampler):
    """A Poisson draw that happened to pick 2 of the 4 nodes (q = 0.5)."""

    def draw(self, node_ids: Any, server_round: int) -> Cohort:
        return Cohort((100, 101), population=len(node_ids), sample_rate=0.5)


def test_a_poisson_draw_below_three_is_left_out_and_releases_noise_only(
    quiet_flower: None,
) -> None:
    # Prepare: user-level DP over SecAgg+, a draw of 2 (too few to hide an update in a sum)
    flat = _run_config(**{"secure-aggregation": True, "privacy-unit": "user"})
    cfg = RunConfig.from_flat(flat)
    grid = _grid(flat)
    user_dp = UserLevelDP(cfg.privacy, rng=np.random.default_rng(0))
    strategy: Any = make_strategy(cfg.fed, user_dp=user_dp, secure=True, sampler=_TwoDrawn(cfg.fed))
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    # Execute
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    new, _ = strategy.aggregate_train(1, [])
    # Assert: nobody was contacted; both drawn are reported left out; the round released noise
    # over the expected cohort q N = 2 and needs no successes
    assert messages == [] and grid.deliveries == [] and strategy.successes_needed() == 0
    assert [r.status for r in strategy.last_reports] == ["failed", "failed"]
    assert "left out: secure aggregation needs 3" in strategy.last_reports[0].reason
    release = strategy.last_user_dp
    assert new is not None and release.sampled == 2 and release.expected == 2.0
    assert any(not np.array_equal(new[k].numpy(), GLOBAL[k]) for k in SHAPES)


def test_a_declining_client_adds_nothing_and_is_reported_declined(quiet_flower: None) -> None:
    flat = _run_config(**{"secure-aggregation": True})
    secure, strategy = _round(flat, _grid(flat, behaviour={1: "decline"}))
    assert secure is not None
    expected = _fedavg([0, 2, 3])
    for key in SHAPES:
        np.testing.assert_allclose(
            secure[key], expected[key], atol=_quantization_bound([0, 2, 3], 1), rtol=0
        )
    reports = {r.client: r for r in strategy.last_reports}
    assert reports["partition-1"].status == "declined" and reports["partition-1"].reason == "budget"


# ------------------------------------------------------------------------- user-level DP + SecAgg


@pytest.mark.parametrize("adaptive", [False, True])
def test_user_level_dp_with_secagg_equals_server_side_clipping(
    quiet_flower: None, adaptive: bool
) -> None:
    # Prepare: updates of norm ~4-5 against C = 1 (clipped), two of them small (unclipped)
    overrides = {"privacy-unit": "user", "user-clip-norm": 1.0, "adaptive-clipping": adaptive}
    overrides["user-noise-multiplier"] = 1.0
    plain_flat = _run_config(**overrides)
    secure_flat = _run_config(
        **overrides, **{"secure-aggregation": True, "secagg-clipping-range": 0.5}
    )
    behaviour_scale = 0.6

    def mechanism(flat: dict[str, Any]) -> UserLevelDP:
        return UserLevelDP(RunConfig.from_flat(flat).privacy, rng=np.random.default_rng(5))

    # Execute: the same noise draws (same seed): the results differ only by quantization
    plain, plain_strategy = _round(
        plain_flat, _grid(plain_flat, scale=behaviour_scale), mechanism(plain_flat)
    )
    secure, secure_strategy = _round(
        secure_flat, _grid(secure_flat, scale=behaviour_scale), mechanism(secure_flat)
    )
    # Assert
    assert plain is not None and secure is not None
    for key in SHAPES:
        np.testing.assert_allclose(secure[key], plain[key], atol=1e-4, rtol=0)
    a, b = plain_strategy.last_user_dp, secure_strategy.last_user_dp
    assert a is not None and b is not None
    assert (b.clip_norm, b.sampled, b.noise_std) == (a.clip_norm, a.sampled, a.noise_std)
    if adaptive:
        assert b.unclipped_share == pytest.approx(a.unclipped_share, abs=1e-9)
        assert b.next_clip_norm == pytest.approx(a.next_clip_norm, rel=1e-9)


def test_quantization_cannot_push_a_clipped_update_past_the_clipping_norm() -> None:
    # Prepare: a clipped update at the quantization-safe norm, quantized as SecAgg+ does
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    size, r, levels = 5000, 1.0, 2**16  # coarse on purpose: a margin of ~0.0022
    bound = quantization_safe_norm(1.0, size, r, levels)
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(20):
        vector = rng.normal(0, 1, size)
        vector *= bound / np.linalg.norm(vector)
        back = dequantize(quantize([vector], r, levels), r, levels)[0]
        worst = max(worst, float(np.linalg.norm(back)))
    # Assert
    assert bound < 1.0 and worst <= 1.0
    with pytest.raises(ValueError, match="quantization error"):
        quantization_safe_norm(0.001, size, r, levels)


# ---------------------------------------------------------------------------- client-side guards


def test_a_client_refuses_plain_train_messages_when_the_run_requires_secagg() -> None:
    flat = _run_config(**{"secure-aggregation": True})
    grid = _grid(flat)
    message = Message(
        RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})}),
        dst_node_id=100,
        message_type="train",
    )
    (reply,) = grid.send_and_receive([message])
    assert reply.has_error() and "refusing to send weights in the clear" in reply.error.reason
    with pytest.raises(SecureAggregationRequired):
        secure_aggregation_mod(message, grid.contexts[100], lambda m, c: m)


def test_a_non_finite_update_is_never_masked() -> None:
    cfg = RunConfig.from_flat(_run_config(**{"secure-aggregation": True}))
    sent = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    bad = _update(0, 0.01)
    bad["enc.bias"][2] = np.nan
    reply = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in bad.items()}),
            "metrics": MetricRecord({"num-examples": 10, "declined": 0}),
        }
    )
    with pytest.raises(NonFiniteUpdate, match=r"enc\.bias"):
        masked_input(sent, reply, cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "fedmedian"}, "median"),
        ({"clients-per-round": 2}, "at least 3"),
        ({"clients-per-round": 2000}, "overflow"),
    ],
)
def test_secure_aggregation_config_is_checked(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_flat({"secure-aggregation": True, **overrides})


# ----------------------------------------------------------------------- real processes (slow)


@pytest.mark.slow
def test_simulation_with_secagg_completes_when_a_client_crashes_mid_protocol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedspeech.app.simulate import simulate

    # Prepare: 4 simulated clients; partition 3 crashes in round 2's masked-input stage
    # (fedspeech_client.faults: after local training, i.e. after it shared its keys)
    monkeypatch.setenv("FEDSPEECH_FAULT", "3:raise@2")
    run_dir = tmp_path / "run"
    overrides: dict[str, Any] = {
        **TINY_SIMULATION,
        **{"data-dir": str(tmp_path / "data"), "num-server-rounds": 2, "round-retries": 0},
        **{"secure-aggregation": True, "min-successful-clients": 3},
        "tracking-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    # Execute
    outcome = simulate(
        overrides=overrides,
        num_supernodes=4,
        out=run_dir,
        output=tmp_path / "sim.log",
        engine="flower",
    )
    log = (tmp_path / "sim.log").read_text(errors="replace")
    # Assert: both rounds aggregated; in round 2 three clients' sum, the crashed one failed
    assert outcome.finished and outcome.rounds == 2, log[-4000:]
    first, second = outcome.history
    assert (first["clients_ok"], first["clients_failed"]) == (4, 0)
    assert (second["clients_ok"], second["clients_failed"]) == (3, 1)
    assert all(h["update_norm"] > 0 for h in outcome.history)
    assert "Secure aggregation completed" in log
    clients = (run_dir / "report" / "clients.tsv").read_text()
    assert "collect_masked_vectors" in clients and "InjectedFault" in clients
    assert outcome.model_dir is not None
    provenance = (outcome.model_dir / "config.json").read_text()
    assert '"secure_aggregation": true' in provenance
