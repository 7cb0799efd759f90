"""Reliability and security without Flower processes (issue 7; the slow, multi-process checks are
in tests/test_faults.py): bad client updates are rejected, short rounds are retried and then stop
the run, damaged checkpoints are detected, a client's reply carries weights and aggregate numbers
only, bad data is skipped and counted, DP settings without privacy are refused, and a restarted
node keeps its privacy budget.

The server tests drive the real ServerApp round loop (``fedspeech_server.app.main``) with a fake Grid that
answers each train message the way a healthy, crashing, silent or hostile client would.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app import Error as FlowerError
from opacus.accountants import PRVAccountant

from fedspeech.config import ConfigError, FedConfig, RunConfig
from fedspeech.model import BiGRUCTC, plain_state_dict
from fedspeech.model_config import ModelConfig
from fedspeech_client.faults import InjectedFault, apply_faults, parse_faults
from fedspeech_client.node_state import load_ledger, resolve_node_data
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.manifest import Utterance, read_manifest, write_manifest
from fedspeech_features.text import CharTokenizer
from fedspeech_server.app import main as server_main
from fedspeech_server.checkpoint import (
    CheckpointError,
    RunState,
    load_checkpoint,
    save_checkpoint,
)
from fedspeech_server.rounds import ClientReport, clients_tsv, update_clients
from fedspeech_server.run import FederatedRun, RoundAttempt, RoundFailedError
from fedspeech_server.screening import array_spec, client_report
from fedspeech_server.strategy import ScreenedFedAvg, make_strategy
from fedspeech_server.tracking import read_rounds, read_start, read_tracking_info

pytestmark = pytest.mark.usefixtures("one_thread", "flower_server_identity")

TINY: dict[str, Any] = {
    **{"n-mfcc": 6, "n-mels": 8, "stack": 1, "subsample": 1},
    **{"hidden-size": 4, "num-layers": 1, "dropout": 0.0, "batch-size": 4, "dp-seed": 0},
    **{"noise-multiplier": 1.0, "delta": 1e-5, "client-threads": 1, "server-threads": 1},
}


# ---------------------------------------------------------------------- server: screening


def _global_arrays() -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array(np.zeros((2, 3), dtype=np.float32)),
            "b": Array(np.zeros(3, dtype=np.float32)),
        }
    )


def _train_message(node: int, arrays: ArrayRecord) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    return Message(content, dst_node_id=node, message_type="train")


def _update(
    sent: Message, change: Callable[[dict[str, np.ndarray]], None], n: float = 10.0, **extra: float
) -> Message:
    """A reply whose weights are the sent ones + 1, then ``change``d in place."""
    arrays = {k: v.numpy() + 1.0 for k, v in sent.content.array_records["arrays"].items()}
    change(arrays)
    metrics = MetricRecord({"num-examples": n, "train-loss": 1.0, "declined": 0.0, **extra})
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=sent)


def _set(key: str, value: Any) -> Callable[[dict[str, np.ndarray]], None]:
    def change(arrays: dict[str, np.ndarray]) -> None:
        arrays[key] = value

    return change


def _nothing(arrays: dict[str, np.ndarray]) -> None:
    pass


HOSTILE_UPDATES: dict[str, tuple[Callable[[dict[str, np.ndarray]], None], float, str]] = {
    "NaN": (lambda a: a["w"].__setitem__((0, 0), np.nan), 10.0, r"w: non-finite"),
    "Inf": (lambda a: a["b"].__setitem__(1, np.inf), 10.0, r"b: non-finite"),
    "wrong shape": (_set("w", np.ones((3, 3), np.float32)), 10.0, r"shape \(3, 3\) != \(2, 3\)"),
    "wrong dtype": (_set("b", np.ones(3, np.float64)), 10.0, "dtype float64 != float32"),
    "missing tensor": (lambda a: a.pop("b"), 10.0, r"missing \['b'\]"),
    "extra tensor": (_set("x", np.ones(1, np.float32)), 10.0, r"unexpected \['x'\]"),
    "zero examples": (_nothing, 0.0, "num-examples 0.0 is not > 0"),
    "NaN examples": (_nothing, math.nan, "num-examples nan is not > 0"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_UPDATES))
def test_hostile_update_is_rejected_and_never_averaged_in(case: str) -> None:
    # Prepare: the strategy sends the global weights to 3 nodes; 2 reply well, 1 is hostile
    strategy = make_strategy(FedConfig(min_clients=1))
    sent = {m.metadata.dst_node_id: m for m in _sent_by(strategy, _global_arrays(), nodes=3)}
    change, n, reason = HOSTILE_UPDATES[case]
    good = [_update(sent[1], _nothing, n=10.0), _update(sent[2], _nothing, n=30.0)]
    hostile = _update(sent[3], change, n=n)
    # Execute
    arrays, _ = strategy.aggregate_train(1, [*good, hostile])
    # Assert: the average is the two good updates' (all ones), the hostile one is reported
    assert arrays is not None
    np.testing.assert_array_equal(arrays["w"].numpy(), np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(arrays["b"].numpy(), np.ones(3, np.float32))
    statuses = [r.status for r in strategy.last_reports]
    assert statuses == ["ok", "ok", "rejected"]
    assert re.search(reason, strategy.last_reports[2].reason), strategy.last_reports[2].reason


def test_undecodable_array_is_rejected_not_unpickled() -> None:
    # Prepare: an array whose bytes claim to be a NumPy array but hold a pickle
    import pickle

    sent = _train_message(1, _global_arrays())
    reply = _update(sent, _nothing)
    bogus = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=pickle.dumps([1]))
    reply.content.array_records["arrays"]["w"] = bogus
    # Execute
    report = client_report(reply, array_spec(_global_arrays()))
    # Assert
    assert report.status == "rejected" and "w: undecodable array" in report.reason


def test_clients_with_different_metric_names_still_aggregate() -> None:
    # Flower refuses to aggregate replies whose MetricRecords differ; the screen strips them.
    strategy = ScreenedFedAvg(min_train_nodes=1, min_available_nodes=1)
    sent = _train_message(1, _global_arrays())
    replies = [_update(sent, _nothing), _update(sent, _nothing, extra_metric=1.0)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert [r.status for r in strategy.last_reports] == ["ok", "ok"]


def test_below_min_successful_clients_nothing_is_aggregated() -> None:
    # Prepare: FedAdam (server state that a discarded aggregation would corrupt)
    strategy = make_strategy(FedConfig(strategy="fedadam", min_clients=1, min_successful_clients=2))
    (sent,) = _sent_by(strategy, _global_arrays(), nodes=1)
    # Execute
    result = strategy.aggregate_train(1, [_update(sent, _nothing)])
    # Assert: no aggregate, and FedAdam's moments untouched
    assert result == (None, None)
    assert not getattr(strategy, "m_t", None)


def test_a_failure_is_filed_under_the_partition_its_node_replied_as() -> None:
    # Prepare: node 7 fails before it ever named its partition, then replies as partition-0,
    # then fails again; node 8 only ever fails (a real SuperNode without a partition id)
    table: dict[str, dict[str, Any]] = {}
    crash = ClientReport("node-7", "failed", {}, "error 2: crashed", node=7)
    # Execute
    update_clients(table, 1, [crash, ClientReport("node-8", "failed", {}, "timeout", node=8)])
    update_clients(table, 2, [ClientReport("partition-0", "ok", {"epsilon": 1.5}, node=7)])
    update_clients(table, 3, [ClientReport("node-7", "failed", {}, "timeout", node=7)])
    # Assert: one row per client; node 7's failures counted in partition-0's row
    assert sorted(table) == ["node-8", "partition-0"]
    row = table["partition-0"]
    assert (row["rounds_ok"], row["rounds_failed"], row["last_round"]) == (1, 2, 3)
    assert row["epsilon"] == 1.5 and row["last_reason"] == "timeout"
    assert table["node-8"]["rounds_failed"] == 1


def test_client_table_counts_rejections_next_to_failures() -> None:
    table: dict[str, dict[str, Any]] = {"old": {"rounds_ok": 1, "rounds_failed": 0}}  # older row
    update_clients(table, 2, [ClientReport("old", "rejected", {}, "w: non-finite")])
    lines = clients_tsv(table).splitlines()
    assert lines[0].split("\t")[:5] == [
        "client",
        "rounds_ok",
        "rounds_declined",
        "rounds_failed",
        "rounds_rejected",
    ]
    assert lines[1].split("\t")[:5] == ["old", "1", "0", "0", "1"]


class _FakeGrid:
    """A Grid whose nodes answer train messages with ``behaviour(message, call number)``."""

    def __init__(self, behaviours: dict[int, Callable[[Message, int], Message | None]]) -> None:
        self.behaviours = behaviours
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        return list(self.behaviours)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        self.calls += 1
        replies = [self.behaviours[m.metadata.dst_node_id](m, self.calls) for m in messages]
        return [r for r in replies if r is not None]


def _sent_by(strategy: Any, arrays: ArrayRecord, nodes: int) -> list[Message]:
    grid = _FakeGrid({i: lambda m, c: None for i in range(1, nodes + 1)})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)


def _ok(msg: Message, call: int) -> Message:
    return _update(msg, _nothing, n=10.0, epsilon=0.5)


def _nan(msg: Message, call: int) -> Message:
    return _update(msg, lambda a: next(iter(a.values())).reshape(-1).__setitem__(0, np.nan))


def _silent(msg: Message, call: int) -> None:
    return None  # no reply before the round timeout


def _crash(msg: Message, call: int) -> Message:
    return Message(FlowerError(code=0, reason="ClientApp raised RuntimeError"), reply_to=msg)


def _declined(msg: Message, call: int) -> Message:
    metrics = MetricRecord({"num-examples": 5.0, "declined": 1.0, "epsilon": 8.0})
    decline = ConfigRecord({"reason": "would exceed the epsilon budget 8"})
    return Message(RecordDict({"metrics": metrics, "decline": decline}), reply_to=msg)


Behaviour = Callable[[Message, int], Message | None]


def _first_then(first: Behaviour, later: Behaviour) -> Behaviour:
    """Answer the first round trip like ``first``, every later one like ``later``."""

    def behaviour(msg: Message, call: int) -> Message | None:
        return first(msg, call) if call == 1 else later(msg, call)

    return behaviour


def _server_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    eval_manifest = tmp_path / "eval.tsv"
    write_manifest(eval_manifest, [])  # no central evaluation: WER/CER are not the point here
    flat = RunConfig.from_flat(
        {
            **TINY,
            "eval-manifest": str(eval_manifest),
            "out-dir": str(tmp_path / "run"),
            "data-dir": str(tmp_path / "data"),
            "tracking-uri": "",
            "min-clients": 1,
            **overrides,
        }
    ).to_flat()
    return flat


def _context(run_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def _checkpoint_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint is not None
    return checkpoint.state_dict


def test_round_completes_with_the_healthy_clients_and_counts_the_rest(tmp_path: Path) -> None:
    # Prepare: one healthy client, one sending NaN, one crashing, one never answering
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    flat = _server_config(tmp_path, **{"num-server-rounds": 2, "tracking-uri": uri})
    grid = _FakeGrid({1: _ok, 2: _nan, 3: _crash, 4: _silent})
    initial = _initial_weights(flat)
    # Execute
    server_main(grid, _context(flat))  # type: ignore[arg-type]
    # Assert: both rounds ran; the global model is exactly the healthy client's (+1 per round)
    rounds = read_rounds(tmp_path / "run")
    assert [r["round"] for r in rounds] == [1, 2]
    for row in rounds:
        assert (row["clients_ok"], row["clients_rejected"], row["clients_failed"]) == (1, 1, 2)
    final = _checkpoint_weights(tmp_path / "run")
    for key, value in initial.items():
        torch.testing.assert_close(final[key], value + 2.0)
    # Assert: the per-client reasons and MLflow's failure counts
    clients = (tmp_path / "run" / "report" / "clients.tsv").read_text()
    assert "non-finite" in clients and "ClientApp raised" in clients and "timeout" in clients
    from mlflow import MlflowClient

    run_id = read_tracking_info(tmp_path / "run")["run_id"]
    client = MlflowClient(tracking_uri=uri)
    for key, value in (("clients_failed", 2.0), ("clients_rejected", 1.0)):
        history = client.get_metric_history(run_id, key)
        assert sorted((m.step, m.value) for m in history) == [(1, value), (2, value)]


def test_a_short_round_is_sent_again(tmp_path: Path) -> None:
    # Prepare: node 2 crashes on the first attempt only; two successes are required
    flat = _server_config(tmp_path, **{"num-server-rounds": 1, "min-successful-clients": 2})
    grid = _FakeGrid({1: _ok, 2: _first_then(_crash, _ok)})
    # Execute
    server_main(grid, _context(flat))  # type: ignore[arg-type]
    # Assert
    assert grid.calls == 2
    (row,) = read_rounds(tmp_path / "run")
    assert (row["clients_ok"], row["clients_failed"], row["retries"]) == (2, 0, 1)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_a_round_short_after_its_retries_stops_the_run_without_updating(tmp_path: Path) -> None:
    # Prepare: round 1 is fine; from round 2 on, two of three clients fail every attempt
    flat = _server_config(
        tmp_path,
        **{"num-server-rounds": 3, "min-successful-clients": 2, "round-retries": 2},
    )
    grid = _FakeGrid({1: _ok, 2: _first_then(_ok, _nan), 3: _first_then(_ok, _silent)})
    # Execute
    with pytest.raises(RoundFailedError) as caught:
        server_main(grid, _context(flat))  # type: ignore[arg-type]
    # Assert: 1 + 3 attempts; the message names the shortfall and each client's reason
    assert grid.calls == 1 + 3
    message = str(caught.value)
    assert "round 2" in message and "1 of 3 sampled clients trained" in message
    assert "min-successful-clients 2" in message
    assert "non-finite" in message and "no reply before the timeout" in message
    # Assert: the checkpoint holds round 1's model; no final model; the tracker knows why
    run_dir = tmp_path / "run"
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["round"] == 1 and not state["finished"]
    assert [r["round"] for r in read_rounds(run_dir)] == [1]
    assert not (run_dir / "model").exists()
    info = read_tracking_info(run_dir)
    assert info["status"] == "FAILED" and "min-successful-clients" in info["error"]
    initial = _initial_weights(flat)
    final = _checkpoint_weights(run_dir)
    for key, value in initial.items():
        torch.testing.assert_close(final[key], value + 1.0)


def test_clients_out_of_budget_stop_the_run_at_once(tmp_path: Path) -> None:
    flat = _server_config(tmp_path, **{"num-server-rounds": 1, "round-retries": 3})
    grid = _FakeGrid({1: _declined, 2: _declined})
    with pytest.raises(RoundFailedError, match="epsilon budget"):
        server_main(grid, _context(flat))  # type: ignore[arg-type]
    assert grid.calls == 1  # declining clients would decline again: no retry


def test_the_round_loop_retries_and_carries_the_aggregate_without_flower(tmp_path: Path) -> None:
    # Prepare: round 1's first attempt is short (a crash), every later attempt aggregates +1
    flat = _server_config(tmp_path, **{"num-server-rounds": 2, "round-retries": 1})
    run = FederatedRun.open(RunConfig.from_flat(flat))
    initial = dict(run.global_state)
    sent: list[tuple[int, dict[str, torch.Tensor]]] = []

    def send(server_round: int, weights: Any) -> RoundAttempt:
        sent.append((server_round, dict(weights)))
        if len(sent) == 1:
            return RoundAttempt([ClientReport("a", "failed", {}, "crashed")], needed=1)
        new = {k: v + 1.0 for k, v in weights.items()}
        ok = ClientReport("a", "ok", {"num-examples": 3.0})
        return RoundAttempt([ok], needed=1, new_state=new, clients_sampled=5)

    # Execute
    run.run_rounds(send)
    # Assert: round 1 sent twice with the initial weights, round 2 with round 1's aggregate
    assert [r for r, _ in sent] == [1, 1, 2]
    for key, value in initial.items():
        torch.testing.assert_close(sent[0][1][key], value)
        torch.testing.assert_close(sent[1][1][key], value)
        torch.testing.assert_close(sent[2][1][key], value + 1.0)
        torch.testing.assert_close(run.global_state[key], value + 2.0)
    rows = read_rounds(tmp_path / "run")
    assert read_start(tmp_path / "run") is None  # no evaluation set: no round 0
    assert [(r["round"], r["retries"], r["clients_sampled"]) for r in rows] == [
        (1, 1, 5),
        (2, 0, 5),
    ]


def test_round_0_evaluates_the_starting_model_once_before_any_round(tmp_path: Path) -> None:
    # Prepare: a 1-round run whose only round moves the weights; an evaluation set of 2 files
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        sf.write(tmp_path / f"{i}.wav", 0.1 * rng.standard_normal(16000), 16000)
        rows.append(Utterance(tmp_path / f"{i}.wav", "hello world", "spk", 1.0))
    write_manifest(tmp_path / "heldout.tsv", rows)
    flat = _server_config(tmp_path, **{"num-server-rounds": 1})
    flat["eval-manifest"] = str(tmp_path / "heldout.tsv")
    run = FederatedRun.open(RunConfig.from_flat(flat))
    at_start = run.evaluator(run.global_state)

    def send(server_round: int, weights: Any) -> RoundAttempt:
        new = {k: v + 0.5 for k, v in weights.items()}
        return RoundAttempt([ClientReport("a", "ok", {"num-examples": 3.0})], 1, new_state=new)

    # Execute: the run, then a resume to 2 rounds (no second round 0)
    run.run_rounds(send)
    resumed = FederatedRun.open(
        RunConfig.from_flat({**flat, "num-server-rounds": 2, "resume": True})
    )
    resumed.run_rounds(send)
    # Assert: one round-0 row with the starting model's figures, then the training rounds
    start = read_start(tmp_path / "run")
    assert start is not None and (start["wer"], start["cer"]) == pytest.approx(at_start)
    lines = (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2]
    assert [r["round"] for r in read_rounds(tmp_path / "run")] == [1, 2]


def test_resume_tracks_a_round_checkpointed_just_before_a_crash(tmp_path: Path) -> None:
    # Prepare: a 1-round run, then "crash" between the checkpoint and the tracker (its row gone)
    flat = _server_config(tmp_path, **{"num-server-rounds": 1})
    server_main(_FakeGrid({1: _ok}), _context(flat))  # type: ignore[arg-type]
    (tmp_path / "run" / "rounds.jsonl").write_text("")
    # Execute: resume to 2 rounds
    resumed = {**flat, "num-server-rounds": 2, "resume": True}
    server_main(_FakeGrid({1: _ok}), _context(resumed))  # type: ignore[arg-type]
    # Assert: each round tracked once, in order
    assert [r["round"] for r in read_rounds(tmp_path / "run")] == [1, 2]


def _initial_weights(flat: dict[str, Any]) -> dict[str, torch.Tensor]:
    cfg = RunConfig.from_flat(flat)
    model_config = cfg.model.model_config(cfg.features.frame_dim, CharTokenizer().vocab_size)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        return plain_state_dict(BiGRUCTC(model_config))


# ---------------------------------------------------------------------- checkpoints


def _save(run_dir: Path, round_: int) -> None:
    features = FeatureConfig(n_mfcc=4, n_mels=8, stack=1, subsample=1)
    model = BiGRUCTC(ModelConfig(input_dim=features.frame_dim, hidden_size=4, num_layers=1))
    save_checkpoint(
        run_dir,
        model.state_dict(),
        RunState(round=round_),
        model_config=model.cfg,
        feature_config=features,
        tokenizer=CharTokenizer(),
        provenance={},
    )


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("model/model.safetensors", "truncate", "truncated or altered"),
        ("model/config.json", "truncate", "truncated or altered"),
        ("state.json", "truncate", "truncated or altered"),
        ("model/model.safetensors", "flip", "content differs"),
        ("manifest.json", "truncate", "unreadable manifest"),
        ("model/config.json", "delete", "missing"),
    ],
)
def test_damaged_checkpoint_is_detected_not_loaded(
    tmp_path: Path, name: str, damage: str, message: str
) -> None:
    # Prepare
    _save(tmp_path, 1)
    path = tmp_path / "checkpoint" / name
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        path.unlink()
    # Execute + Assert
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def test_an_intact_older_checkpoint_is_used_when_the_newest_is_damaged(tmp_path: Path) -> None:
    # Prepare: round 1 kept aside (as a crash mid-swap leaves it), round 2 truncated
    _save(tmp_path, 1)
    old = tmp_path / ".checkpoint.old-crash"
    old.mkdir()
    shutil.copytree(tmp_path / "checkpoint", old / "checkpoint")
    _save(tmp_path, 2)
    weights = tmp_path / "checkpoint" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    # Execute
    loaded = load_checkpoint(tmp_path)
    # Assert
    assert loaded is not None and loaded.state.round == 1 and loaded.path == old / "checkpoint"


def test_resume_from_a_truncated_checkpoint_is_refused_with_the_reason(tmp_path: Path) -> None:
    flat = _server_config(tmp_path, **{"num-server-rounds": 1})
    server_main(_FakeGrid({1: _ok}), _context(flat))  # type: ignore[arg-type]
    state = tmp_path / "run" / "checkpoint" / "state.json"
    state.write_text(state.read_text()[:-20])
    resumed = {**flat, "num-server-rounds": 2, "resume": True}
    with pytest.raises(CheckpointError, match=r"state.json: \d+ bytes"):
        server_main(_FakeGrid({1: _ok}), _context(resumed))  # type: ignore[arg-type]


def test_simulate_resume_refuses_a_damaged_checkpoint_before_starting_flower(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedspeech.app.cli import main as cli_main

    _save(tmp_path / "run", 1)
    saved = f'data-dir = "{tmp_path / "data"}"\ntracking-uri = ""\nnum-partitions = 6\n'
    (tmp_path / "run" / "run_config.toml").write_text(saved)  # as the first run left it
    weights = tmp_path / "run" / "checkpoint" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    args = ["simulate", "--run-dir", str(tmp_path / "run"), "--resume"]
    with caplog.at_level(logging.ERROR):
        assert cli_main(args) == 2
    assert "model.safetensors" in caplog.text and "truncated or altered" in caplog.text
    assert not (tmp_path / "run" / ".flwr").exists()  # no SuperLink was started


# ---------------------------------------------------------------------- the client's reply


def _client_reply(
    node_config: dict[str, Any], run_config: dict[str, Any], server_round: int = 1
) -> Message:
    """Call the real ClientApp train handler once, as a freshly started node would."""
    from fedspeech_client.app import train

    cfg = RunConfig.from_flat(run_config)
    model_config = cfg.model.model_config(cfg.features.frame_dim, CharTokenizer().vocab_size)
    torch.manual_seed(0)
    weights = ArrayRecord(plain_state_dict(BiGRUCTC(model_config)))
    config = ConfigRecord({"server-round": server_round})
    msg = Message(
        RecordDict({"arrays": weights, "config": config}), dst_node_id=7, message_type="train"
    )
    context = Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config
    )
    return train(msg, context)


REPLY_METRICS = {
    "train-loss", "num-examples", "num-steps", "skipped-batches", "seconds", "cpu-seconds",
    "declined", "epsilon", "noise-multiplier", "sample-rate", "skipped-utterances", "skipped-audio",
    "skipped-sample-rate", "skipped-transcript", "skipped-ctc-infeasible", "skipped-other",
    "recharged",
}  # fmt: skip


def _short_real_utterances(shared_data: Path, tmp_path: Path, n: int) -> Path:
    rows = sorted(
        read_manifest(shared_data / "librispeech_samples" / "manifest.tsv"),
        key=lambda u: u.duration_s,
    )[:n]
    manifest = tmp_path / "site" / "manifest.tsv"
    write_manifest(manifest, rows)
    return manifest


def test_a_client_reply_holds_weights_and_aggregate_numbers_only(
    shared_data: Path, tmp_path: Path
) -> None:
    # Prepare: a node holding 8 real utterances with their transcripts
    manifest = _short_real_utterances(shared_data, tmp_path, 8)
    transcripts = [u.transcript for u in read_manifest(manifest)]
    run_config = RunConfig.from_flat(TINY).to_flat()
    # Execute
    reply = _client_reply({"manifest": str(manifest)}, run_config)
    # Assert: one ArrayRecord with exactly the model's tensors, one MetricRecord of scalars
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics"}
    assert not content.config_records  # no free text at all
    cfg = RunConfig.from_flat(run_config)
    model = BiGRUCTC(cfg.model.model_config(cfg.features.frame_dim, CharTokenizer().vocab_size))
    expected = {k: tuple(v.shape) for k, v in plain_state_dict(model).items()}
    arrays = content.array_records["arrays"]
    assert {k: tuple(a.shape) for k, a in arrays.items()} == expected
    metrics = dict(content.metric_records["metrics"])
    assert set(metrics) == REPLY_METRICS, set(metrics) ^ REPLY_METRICS
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values())
    assert metrics["num-examples"] == 8
    # Assert: no transcript (or word of one) anywhere in the serialised message
    from flwr.common.serde import recorddict_to_proto

    wire = recorddict_to_proto(content).SerializeToString()
    words = {w for t in transcripts for w in t.split() if len(w) >= 5}
    assert words and not [w for w in words if w.encode() in wire]
    # Assert: the weights are the whole payload (no room for audio or features)
    payload = sum(len(a.data) for a in arrays.values())
    weights = sum(int(np.prod(s)) * 4 for s in expected.values())
    assert payload <= weights + 128 * len(expected)  # + the .npy headers


def _noise_wav(path: Path, seconds: float, rate: int = 16_000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    wave = (0.1 * rng.standard_normal(int(rate * seconds))).astype(np.float32)
    sf.write(path, wave, rate)
    return path


def test_bad_data_is_skipped_counted_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: 30 good clips (one at 44.1 kHz, one at 8 kHz: resampled, kept), 3 corrupt files
    # (10%), an empty transcript, a clip shorter than its label, a 4 kHz recording
    site = tmp_path / "site"
    site.mkdir()
    words = ["yes", "no", "up", "down", "left", "right", "stop", "go"]
    rows = []
    for i in range(30):
        rate = 44_100 if i == 0 else 8_000 if i == 1 else 16_000
        wav = _noise_wav(site / f"good{i}.wav", 0.5, rate, seed=i)
        rows.append(Utterance(wav, words[i % len(words)], f"s{i % 3}", 0.5))
    (site / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    (site / "empty.wav").write_bytes(b"")
    cut = _noise_wav(site / "cut.wav", 1.0)
    cut.write_bytes(cut.read_bytes()[:8000])  # header declares 1 s, file holds a quarter
    bad = {
        "garbage.wav": "hello",
        "empty.wav": "hello",
        "cut.wav": "hello",
        "silent_label.wav": "",
        "too_short.wav": "a sentence far too long for a tenth of a second",
        "low_rate.wav": "hello",
    }
    _noise_wav(site / "silent_label.wav", 0.5)
    _noise_wav(site / "too_short.wav", 0.1)
    _noise_wav(site / "low_rate.wav", 0.5, rate=4_000)
    rows += [Utterance(site / name, text, "s9", 0.5) for name, text in bad.items()]
    write_manifest(site / "manifest.tsv", rows)
    run_config = RunConfig.from_flat(TINY).to_flat()
    # Execute
    with caplog.at_level(logging.WARNING):
        reply = _client_reply({"manifest": str(site / "manifest.tsv")}, run_config)
    # Assert: trained on the 30 good clips, and the reply counts each kind of bad item
    content = reply.content
    assert "arrays" in content and "decline" not in content
    metrics = content.metric_records["metrics"]
    assert metrics["num-examples"] == 30 and math.isfinite(float(metrics["train-loss"]))
    assert metrics["skipped-utterances"] == 6
    assert metrics["skipped-audio"] == 3
    assert metrics["skipped-transcript"] == 1
    assert metrics["skipped-ctc-infeasible"] == 1
    assert metrics["skipped-sample-rate"] == 1
    # Assert: the node's own log names every skipped file with its reason
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for name in bad:
        assert name in logged, name
    for reason in ("cannot decode", "truncated WAV", "empty transcript", "CTC-infeasible"):
        assert reason in logged, reason
    assert "4000 Hz is below 8000 Hz" in logged


# ---------------------------------------------------------------------- faults, privacy


def test_fault_specs_parse_and_act() -> None:
    faults = parse_faults("0:raise, 1:hang=2.5@3, *:nan, 2:shape")
    assert [(f.target, f.kind, f.seconds, f.round) for f in faults] == [
        (0, "raise", 0.0, None),
        (1, "hang", 2.5, 3),
        (None, "nan", 0.0, None),
        (2, "shape", 0.0, None),
    ]
    weights = {"a": torch.zeros(3, 2), "b": torch.zeros(2)}
    (nan,) = parse_faults("*:nan")
    (shape,) = parse_faults("*:shape")
    corrupted = apply_faults([nan, shape], weights)
    assert corrupted is not None and corrupted["a"].shape == (2, 2)
    assert math.isnan(float(corrupted["a"][0, 0])) and not weights["a"].isnan().any()
    with pytest.raises(InjectedFault):
        apply_faults(parse_faults("*:raise"), weights)
    for bad in ("1:explode", "x:nan", "1:hang", "1:nan=3", "1:nan@x"):
        with pytest.raises(ValueError, match="FEDSPEECH_FAULT"):
            parse_faults(bad)


def test_an_injected_bad_update_leaves_the_client_and_is_rejected_by_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a small clean site; the node's environment asks for a NaN update
    site = tmp_path / "site"
    site.mkdir()
    rows = [
        Utterance(_noise_wav(site / f"{i}.wav", 0.5, seed=i), "yes no", "s", 0.5) for i in range(8)
    ]
    write_manifest(site / "manifest.tsv", rows)
    monkeypatch.setenv("FEDSPEECH_FAULT", "*:nan")
    run_config = RunConfig.from_flat(TINY).to_flat()
    cfg = RunConfig.from_flat(run_config)
    model = BiGRUCTC(cfg.model.model_config(cfg.features.frame_dim, CharTokenizer().vocab_size))
    # Execute
    reply = _client_reply({"manifest": str(site / "manifest.tsv")}, run_config)
    report = client_report(reply, array_spec(ArrayRecord(plain_state_dict(model))))
    # Assert
    assert report.status == "rejected" and "non-finite" in report.reason


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"noise-multiplier": 0.0}, "noise-multiplier must be > 0, got 0.0"),
        ({"noise-multiplier": -1.0}, "noise-multiplier must be > 0, got -1.0"),
        ({"noise-multiplier": "", "target-epsilon": 0.0}, "target-epsilon must be > 0, got 0.0"),
        ({"noise-multiplier": "", "target-epsilon": ""}, "exactly one"),
        ({"max-grad-norm": 0.0}, "max-grad-norm must be > 0, got 0.0$"),
        ({"delta": 1.0}, r"config: delta must be in \(0, 1\), got 1.0$"),
    ],
)
def test_dp_settings_without_privacy_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flat({"dp": True, **overrides})


def test_a_restarted_node_never_trains_past_its_budget(tmp_path: Path) -> None:
    # Prepare: a node trains one round (no budget yet) and stops; its ledger is on disk
    site = tmp_path / "site"
    site.mkdir()
    rows = [
        Utterance(_noise_wav(site / f"{i}.wav", 0.5, seed=i), "yes no", "s", 0.5) for i in range(8)
    ]
    write_manifest(site / "manifest.tsv", rows)
    run_config = RunConfig.from_flat(TINY).to_flat()
    first = _client_reply({"manifest": str(site / "manifest.tsv")}, run_config)
    spent = float(first.content.metric_records["metrics"]["epsilon"])
    node = resolve_node_data({"manifest": str(site / "manifest.tsv")}, RunConfig())
    ledger = load_ledger(node.ledger_file, 1e-5)
    assert ledger is not None and ledger.epsilon() == pytest.approx(spent)
    # Execute: the node restarts (empty context.state) with a budget one more round would pass
    budget = {"manifest": str(site / "manifest.tsv"), "epsilon-budget": spent * 1.01}
    second = _client_reply(budget, run_config, server_round=2)
    third = _client_reply(budget, run_config, server_round=3)
    # Assert: it declines with its reason, sends no weights, spends nothing
    for reply in (second, third):
        assert "arrays" not in reply.content
        assert reply.content.metric_records["metrics"]["declined"] == 1
        assert "budget" in str(reply.content.config_records["decline"]["reason"])
    assert load_ledger(node.ledger_file, 1e-5) == ledger


def test_a_node_ledger_spans_accountants_and_its_budget_holds_under_both(tmp_path: Path) -> None:
    # Prepare: a real node's folder; one run config per accountant (the server's choice)
    site = tmp_path / "site"
    site.mkdir()
    rows = [
        Utterance(_noise_wav(site / f"{i}.wav", 0.5, seed=i), "yes no", "s", 0.5) for i in range(8)
    ]
    write_manifest(site / "manifest.tsv", rows)
    node_config: dict[str, Any] = {"manifest": str(site / "manifest.tsv")}
    configs = {
        name: RunConfig.from_flat({**TINY, "accountant": name}).to_flat() for name in ("rdp", "prv")
    }
    # Execute: round 1 under RDP, round 2 under PRV (each a freshly started node)
    first = _client_reply(node_config, configs["rdp"], server_round=1)
    second = _client_reply(node_config, configs["prv"], server_round=2)
    node = resolve_node_data(node_config, RunConfig())
    ledger = load_ledger(node.ledger_file, 1e-5)
    # Assert: one ledger holds both rounds; the PRV run reported PRV over both rounds' history
    metrics = [reply.content.metric_records["metrics"] for reply in (first, second)]
    steps = int(metrics[0]["num-steps"])
    assert ledger is not None and ledger.num_steps == 2 * steps
    assert [p.name for p in node.ledger_file.parent.iterdir()] == ["ledger.json"]
    reference = PRVAccountant()
    reference.history = list(ledger.history)
    assert float(metrics[1]["epsilon"]) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    # Assert: a budget that a third round would pass under either accountant refuses it under both
    noise, q = float(metrics[0]["noise-multiplier"]), float(metrics[0]["sample-rate"])
    now = max(ledger.epsilon("rdp"), ledger.epsilon("prv"))
    then = min(ledger.record(noise, q, steps).epsilon(a) for a in ("rdp", "prv"))
    assert now < then
    budget = {**node_config, "epsilon-budget": (now + then) / 2}
    for name, run_config in configs.items():
        third = _client_reply(budget, run_config, server_round=3)
        assert third.content.metric_records["metrics"]["declined"] == 1, name
        assert "budget" in str(third.content.config_records["decline"]["reason"]), name
    assert load_ledger(node.ledger_file, 1e-5) == ledger
