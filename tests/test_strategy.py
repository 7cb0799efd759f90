"""Server pieces without a federation: reply screening, round summaries, checkpoints, tracking."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app import Error as FlowerError

from fedspeech.config import ConfigError, FedConfig, RunConfig
from fedspeech.model import BiGRUCTC
from fedspeech.model_config import ModelConfig
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.text import CharTokenizer
from fedspeech_server.checkpoint import RunState, find_checkpoint, load_checkpoint, save_checkpoint
from fedspeech_server.rounds import ClientReport, summarize_round, update_norm
from fedspeech_server.screening import (
    client_report,
    reject_contributors,
    screen_replies,
    successes_needed,
)
from fedspeech_server.strategy import (
    ScreenedFedAdam,
    ScreenedFedAvg,
    ScreenedFedMedian,
    export_state,
    import_state,
    make_strategy,
)
from fedspeech_server.tracking import LocalTracker, read_rounds


def _reply(node: int, content: RecordDict | None = None, error: str | None = None) -> Message:
    meta = Metadata(
        run_id=1,
        message_id="",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    if error is not None:
        return Message(error=FlowerError(code=1, reason=error), metadata=meta)
    assert content is not None
    return Message(content=content, metadata=meta)


def _trained(node: int, value: float, n: int) -> Message:
    arrays = ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))})
    metrics = MetricRecord(
        {"num-examples": n, "train-loss": value, "epsilon": value, "declined": 0}
    )
    return _reply(node, RecordDict({"arrays": arrays, "metrics": metrics}))


def _declined(node: int) -> Message:
    metrics = MetricRecord({"num-examples": 50, "epsilon": 9.0, "declined": 1})
    reason = ConfigRecord({"reason": "budget"})
    return _reply(node, RecordDict({"metrics": metrics, "decline": reason}))


def test_declined_and_failed_replies_are_not_averaged_in() -> None:
    # Prepare
    strategy = ScreenedFedAvg(min_train_nodes=1, min_available_nodes=1)
    replies = [_trained(1, 1.0, 10), _trained(2, 4.0, 30), _declined(3), _reply(4, error="boom")]
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: weighted by num-examples over the two trainers only
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, (10 * 1.0 + 30 * 4.0) / 40))
    statuses = [r.status for r in strategy.last_reports]
    assert statuses == ["ok", "ok", "declined", "failed"]
    assert strategy.last_reports[2].reason == "budget"
    assert "boom" in strategy.last_reports[3].reason


def test_a_round_where_nobody_trained_keeps_the_model() -> None:
    strategy = ScreenedFedMedian(min_train_nodes=1, min_available_nodes=1)
    assert strategy.aggregate_train(1, [_declined(1), _reply(2, error="x")]) == (None, None)


def test_reply_without_arrays_counts_as_failed() -> None:
    msg = _reply(5, RecordDict({"metrics": MetricRecord({"num-examples": 3, "declined": 0})}))
    assert client_report(msg).status == "failed"


def test_screening_sorts_replies_without_a_strategy() -> None:
    # Execute
    screened = screen_replies([_declined(1), _trained(2, 1.0, 10), _reply(3, error="x")], None)
    # Assert: one report per reply, in order; only the trained reply is accepted
    assert [r.status for r in screened.reports] == ["declined", "ok", "failed"]
    assert [m.metadata.src_node_id for m in screened.accepted] == [2]


def test_a_rejected_secure_aggregate_rejects_only_the_contributors() -> None:
    reports = [ClientReport("a", "ok", {"x": 1.0}), ClientReport("b", "failed", {}, "timeout")]
    a, b = reject_contributors(reports, "w: non-finite values (NaN/Inf)")
    assert (a.status, a.metrics) == ("rejected", {"x": 1.0})
    assert a.reason == "secure aggregate rejected: w: non-finite values (NaN/Inf)"
    assert b == reports[1]


def test_successes_needed_is_capped_by_a_poisson_draw_only() -> None:
    assert successes_needed(3, 2, poisson=False) == 3
    assert successes_needed(0, 5, poisson=False) == 1  # at least one update, always
    assert successes_needed(3, 2, poisson=True) == 2
    assert successes_needed(3, 0, poisson=True) == 0  # an empty draw releases noise only


def test_strategy_names_map_to_screened_flower_strategies() -> None:
    # Execute
    adam = make_strategy(FedConfig(strategy="fedadam", server_lr=0.05, min_clients=3))
    # Assert
    assert isinstance(adam, ScreenedFedAdam) and adam.eta == 0.05
    assert adam.min_train_nodes == 3 and adam.weighted_by_key == "num-examples"
    assert isinstance(make_strategy(FedConfig()), ScreenedFedAvg)
    assert type(make_strategy(FedConfig(strategy="fedmedian"))) is ScreenedFedMedian


def test_fedadam_moments_survive_export_and_import() -> None:
    # Prepare
    adam = make_strategy(FedConfig(strategy="fedadam"))
    adam.m_t = {"w": np.ones(2)}  # type: ignore[attr-defined]
    adam.v_t = {"w": np.full(2, 3.0)}  # type: ignore[attr-defined]
    # Execute
    fresh = make_strategy(FedConfig(strategy="fedadam"))
    import_state(fresh, export_state(adam))
    # Assert
    np.testing.assert_array_equal(fresh.v_t["w"], np.full(2, 3.0))  # type: ignore[attr-defined]
    assert export_state(make_strategy(FedConfig())) == {}


def test_round_summary_weights_loss_and_collects_epsilon() -> None:
    # Prepare
    reports = [
        ClientReport("a", "ok", {"num-examples": 10, "train-loss": 1.0, "epsilon": 2.0}),
        ClientReport("b", "ok", {"num-examples": 30, "train-loss": 3.0, "epsilon": 4.0}),
        ClientReport("e", "ok", {"num-examples": 0, "seconds": 2.0, "cpu-seconds": 1.5}),
        ClientReport("f", "ok", {"num-examples": 0, "seconds": 1.0, "cpu-seconds": 0.5}),
        ClientReport("c", "declined", {"num-examples": 5, "epsilon": 6.0}),
        ClientReport("d", "failed", {}, "timeout"),
    ]
    # Execute
    summary = summarize_round(2, reports, train_seconds=1.5)
    # Assert
    assert (summary.clients_ok, summary.clients_declined, summary.clients_failed) == (4, 1, 1)
    assert summary.train_loss == pytest.approx(2.5) and summary.num_examples == 40
    assert summary.epsilon_max == 6.0 and summary.epsilon_mean == pytest.approx(4.0)
    assert (summary.client_seconds, summary.client_cpu_seconds) == (3.0, 2.0)
    assert "wer" not in summary.metrics()  # unset metrics are not reported


def test_update_norm_is_the_l2_norm_of_the_change() -> None:
    before = {"a": torch.zeros(2), "b": torch.ones(1)}
    after = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([5.0])}
    assert update_norm(before, after) == pytest.approx(5.0)


def _tiny_model() -> tuple[BiGRUCTC, FeatureConfig]:
    features = FeatureConfig(n_mfcc=4, n_mels=8, stack=1, subsample=1)
    model_cfg = ModelConfig(input_dim=features.frame_dim, hidden_size=4, num_layers=1)
    return BiGRUCTC(model_cfg), features


def test_checkpoint_round_trip_and_crash_mid_swap(tmp_path: Path) -> None:
    # Prepare
    model, features = _tiny_model()
    state = RunState(round=3, history=[{"round": 3, "wer": 0.5}], tracking_run_id="abc")
    kwargs = {"model_config": model.cfg, "feature_config": features, "tokenizer": CharTokenizer()}
    save_checkpoint(tmp_path, model.state_dict(), RunState(round=2), provenance={}, **kwargs)
    # Execute
    save_checkpoint(
        tmp_path,
        model.state_dict(),
        state,
        provenance={"mode": "test"},
        strategy_arrays={"m_t/w": np.ones(2)},
        **kwargs,
    )
    loaded = load_checkpoint(tmp_path)
    # Assert
    assert loaded is not None and loaded.state == state
    assert torch.equal(loaded.state_dict["head.weight"], model.state_dict()["head.weight"])
    np.testing.assert_array_equal(loaded.strategy_arrays["m_t/w"], np.ones(2))
    assert not list(tmp_path.glob(".checkpoint.*"))  # no temporary folders left
    # A crash between the two renames leaves only the old checkpoint: it is found.
    old = tmp_path / ".checkpoint.old-x"
    old.mkdir()
    os.replace(tmp_path / "checkpoint", old / "checkpoint")
    assert find_checkpoint(tmp_path) == old / "checkpoint"


def test_local_tracker_appends_rounds_and_resumes_its_run(tmp_path: Path) -> None:
    # Prepare
    first = LocalTracker(tmp_path)
    first.log_params({"num-server-rounds": 2})
    first.log_round(1, {"wer": 0.9, "epsilon_max": math.inf})
    # Execute
    second = LocalTracker(tmp_path, run_id=first.run_id)
    second.log_round(2, {"wer": 0.8})
    second.finish(tmp_path / "model")
    # Assert
    assert [r["round"] for r in read_rounds(tmp_path)] == [1, 2]
    assert read_rounds(tmp_path)[0]["epsilon_max"] is None  # JSON has no infinity
    info = json.loads((tmp_path / "tracking.json").read_text())
    assert info["run_id"] == first.run_id and info["model_dir"].endswith("model")


def test_partition_budgets_parse_and_reject_garbage() -> None:
    fed = FedConfig(epsilon_budget=8.0, partition_budgets="1=0.5, 3=2")
    assert [fed.budget_for_partition(i) for i in range(4)] == [8.0, 0.5, 8.0, 2.0]
    with pytest.raises(ConfigError, match="partition-budgets"):
        RunConfig.from_flat({"partition-budgets": "1:0.5"})
    with pytest.raises(ConfigError, match="fraction-train"):
        RunConfig.from_flat({"fraction-train": 0})
