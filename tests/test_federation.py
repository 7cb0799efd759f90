"""Federated simulations through real Flower processes on 127.0.0.1 (SuperLink, SuperExec, Ray),
and the same apps on the local engine (``fedspeech.app.local_engine``: no Flower runtime).

Tiny model and corpus: a run of 4 clients x 2 rounds takes ~30 s here with Flower, ~8 s on the
local engine. Each test checks that every process its simulation started is gone afterwards.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedspeech.app.cli import main as cli_main
from fedspeech.app.simulate import SimulationOutcome, simulate
from fedspeech.config import RunConfig
from fedspeech.exchange import exchanged_names
from fedspeech.fed_data import client_manifest, feature_cache_dir
from fedspeech.modeldir import load_model_dir
from fedspeech.pipeline import initial_weights, load_examples
from fedspeech_client.local_round import round_steps
from fedspeech_client.node_state import load_ledger
from fedspeech_server.tracking import read_rounds, read_start
from tests.conftest import TINY_SIMULATION, run_processes

NOISE: float = TINY_SIMULATION["noise-multiplier"]
DELTA: float = TINY_SIMULATION["delta"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny synthetic corpus (and feature cache) for the module's simulations."""
    return tmp_path_factory.mktemp("fed-data")


@pytest.fixture()
def no_leftovers(tmp_path: Path) -> Iterator[Path]:
    """The run folder; afterwards, no process with its FLWR_HOME may be alive."""
    run_dir = tmp_path / "run"
    yield run_dir
    leftovers = run_processes(run_dir)
    assert not leftovers, f"processes left running: {leftovers}"


def _client_sizes(cfg: RunConfig, data_dir: Path, n: int) -> list[int]:
    """Usable examples per partition (extracting them also warms the clients' feature cache)."""
    sizes = []
    for i in range(n):
        manifest = client_manifest(cfg, data_dir, i, n)
        examples, _, _ = load_examples(
            manifest, cfg.features, cache_root=feature_cache_dir(data_dir)
        )
        sizes.append(len(examples))
    return sizes


def _rdp_epsilon(history: list[tuple[float, float, int]]) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(DELTA))


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return dict(load_model_dir(model_dir).model.state_dict())


@pytest.mark.parametrize("engine", ["flower", "local"])
def test_dp_simulation_composes_epsilon_and_a_tiny_budget_declines(
    engine: str, data_dir: Path, no_leftovers: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: partition 0's budget lies between its epsilon after one and after two rounds
    overrides = {**TINY_SIMULATION, "data-dir": str(data_dir), "num-server-rounds": 2}
    overrides["tracking-uri"] = _sqlite_uri(no_leftovers)
    cfg = RunConfig.from_flat({**overrides, "num-partitions": 4})
    from fedspeech.fed_data import corpus_manifest

    corpus_manifest(cfg, data_dir)
    sizes = _client_sizes(cfg, data_dir, 4)
    rounds = [round_steps(n, 8, 1) for n in sizes]  # (q, steps) per client
    q0, steps0 = rounds[0]
    one, two = (_rdp_epsilon([(NOISE, q0, steps0)] * k) for k in (1, 2))
    overrides["partition-budgets"] = f"0={(one + two) / 2}"
    run_dir = no_leftovers
    # Execute
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="fedspeech"):
        outcome = simulate(
            overrides=overrides,
            num_supernodes=4,
            out=run_dir,
            output=run_dir.with_suffix(".log"),
            engine=engine,
        )
    wall = time.perf_counter() - start
    # Assert: both rounds ran; partition 0 trained in round 1 and declined in round 2
    assert outcome.finished and outcome.rounds == 2, _log_tail(run_dir)
    if engine == "flower":
        # ... and the launcher stopped Flower once the server had marked the run done (the
        # fixture checks that no process was left behind; the MLflow checks below, that nothing
        # was lost)
        assert len(list((run_dir / ".flwr").glob("server-done-*"))) == 1
        assert any("the server finished the run" in r.getMessage() for r in caplog.records)
    else:  # no Flower process was started, and the pool's workers are stopped
        assert not (run_dir / ".flwr").exists()
        assert not multiprocessing.active_children()
    first, second = outcome.history
    assert (first["clients_ok"], first["clients_declined"]) == (4, 0)
    assert (second["clients_ok"], second["clients_declined"], second["clients_failed"]) == (3, 1, 0)
    assert second["num_examples"] == sum(sizes[1:])  # the decliner's examples weigh nothing
    # Assert: every client's epsilon is the accountant's composition of its rounds
    for i, (q, steps) in enumerate(rounds):
        ledger = load_ledger(run_dir / "client-state" / f"partition-{i}.json", 1e-5)
        trained = 1 if i == 0 else 2
        assert ledger is not None and ledger.num_steps == trained * steps
        composed = _rdp_epsilon([(NOISE, q, steps)] * trained)
        assert ledger.epsilon() == pytest.approx(composed, rel=1e-9)
    eps_after = [_rdp_epsilon([(NOISE, q, s)] * 2) for q, s in rounds[1:]]
    assert second["epsilon_max"] == pytest.approx(max(eps_after), rel=1e-9)
    assert second["epsilon_max"] > first["epsilon_max"]
    assert first["epsilon_max"] == pytest.approx(
        max(_rdp_epsilon([(NOISE, q, s)]) for q, s in rounds), rel=1e-9
    )
    # Assert: the global model moved in both rounds, and central evaluation ran
    assert first["update_norm"] > 0 and second["update_norm"] > 0
    assert first["wer"] is not None and second["cer"] is not None
    clients = (run_dir / "report" / "clients.tsv").read_text()
    assert "partition-0\t1\t1\t0" in clients
    assert (
        outcome.model_dir is not None
        and load_model_dir(outcome.model_dir).provenance["rounds"] == 2
    )
    # Assert: MLflow has the run with WER and epsilon per round
    wer, eps = _mlflow_history(overrides["tracking-uri"], run_dir, ("wer", "epsilon_max"))
    assert [m.step for m in wer] == [0, 1, 2] and [m.step for m in eps] == [1, 2]
    assert eps[1].value == pytest.approx(second["epsilon_max"], rel=1e-9)
    print(
        f"\n{engine} simulation 4 clients x 2 rounds: {wall:.1f} s wall; "
        f"rounds {_round_times(outcome)}"
    )


@pytest.mark.slow  # ~25 s: the same run on both engines
def test_the_local_engine_trains_the_model_flower_trains(data_dir: Path, tmp_path: Path) -> None:
    # Prepare: one seeded DP run of 4 clients x 2 rounds
    overrides = {**TINY_SIMULATION, "data-dir": str(data_dir), "num-server-rounds": 2}
    outcomes: dict[str, SimulationOutcome] = {}
    # Execute: on Flower's runtime, then on the local engine
    for engine in ("flower", "local"):
        run_dir = tmp_path / engine
        overrides["tracking-uri"] = _sqlite_uri(run_dir)
        outcomes[engine] = simulate(
            overrides=overrides, num_supernodes=4, out=run_dir, engine=engine,
            output=run_dir.with_suffix(".log"),
        )  # fmt: skip
    # Assert: the same rounds, privacy and model (to float rounding: replies may arrive, and be
    # summed, in another order)
    flower, local = outcomes["flower"], outcomes["local"]
    assert flower.finished and local.finished
    keys = ("clients_ok", "clients_failed", "num_examples", "epsilon_max")
    assert [[h[k] for k in keys] for h in local.history] == [
        [h[k] for k in keys] for h in flower.history
    ]
    assert flower.model_dir is not None and local.model_dir is not None
    expected = _weights(flower.model_dir)
    for name, value in _weights(local.model_dir).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-5)


@pytest.mark.slow  # ~25 s of simulation
def test_an_adapter_run_sends_only_adapter_tensors_and_exports_a_plain_model(
    data_dir: Path, no_leftovers: Path
) -> None:
    # Prepare: DP-SGD on rank-2 adapters (+ the head) of the tiny model, 2 sites, 1 round
    run_dir = no_leftovers
    overrides = {**TINY_SIMULATION, "data-dir": str(data_dir), "num-server-rounds": 1}
    overrides.update({"num-partitions": 2, "trainable": "adapters", "adapter-rank": 2})
    cfg = RunConfig.from_flat(overrides)
    model_config = cfg.model.model_config(cfg.features.frame_dim, 29)
    start = initial_weights(cfg, model_config)
    exchanged = exchanged_names(cfg)
    assert exchanged is not None
    adapters = [k for k in exchanged if k.startswith("adapters.")]
    assert adapters == ["adapters.up.l0.weight", "adapters.up.l0_reverse.weight"]
    # Execute
    outcome = simulate(
        overrides=overrides,
        num_supernodes=2,
        out=run_dir,
        output=run_dir.with_suffix(".log"),
        engine="flower",
    )
    # Assert: the round moved exactly the adapters' B and the head, each way
    assert outcome.finished and outcome.rounds == 1, _log_tail(run_dir)
    (row,) = read_rounds(run_dir)
    assert row["clients_ok"] == 2 and row["epsilon_max"] > 0
    assert row["exchanged_weights"] == sum(start[k].numel() for k in exchanged)
    assert row["exchanged_weights"] == 2 * (3 * 16 * 2) + 2 * 32 + 32 * 29 + 29
    # Assert: the exported model is a plain GRU (adapters merged into W_ih); every weight that
    # did not train is the starting model's, bit for bit
    assert outcome.model_dir is not None
    loaded = load_model_dir(outcome.model_dir)
    assert loaded.model_config.adapter_rank == 0
    final = _weights(outcome.model_dir)
    assert not any(k.startswith("adapters.") for k in final)
    moved = {k for k in final if not torch.equal(final[k], start[k])}
    assert moved == {"rnn.weight_ih_l0", "rnn.weight_ih_l0_reverse", *exchanged} - set(adapters)


@pytest.mark.slow  # ~50 s: two simulations (the default suite keeps the 2-round DP one)
def test_resume_continues_the_run_and_the_privacy_ledgers(
    data_dir: Path, no_leftovers: Path
) -> None:
    # Prepare: a first run that stops after round 1
    run_dir = no_leftovers
    args = ["simulate", "--engine", "flower", "--num-supernodes", "3", "--run-dir", str(run_dir)]
    uri = _sqlite_uri(run_dir)
    settings = {**TINY_SIMULATION, "data-dir": str(data_dir), "tracking-uri": uri}
    base = " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
    start = time.perf_counter()
    assert cli_main([*args, "--run-config", f"{base} num-server-rounds=1"]) == 0, _log_tail(run_dir)
    after_one = _weights(run_dir / "checkpoint" / "model")
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    # Execute: resume with two rounds planned
    assert cli_main([*args, "--resume", "--run-config", f"{base} num-server-rounds=2"]) == 0
    wall = time.perf_counter() - start
    # Assert: round 2 ran once, on top of round 1, in the same tracking run
    assert [row["round"] for row in read_rounds(run_dir)] == [1, 2]
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["round"] == 2 and state["tracking_run_id"] == run_id and state["finished"]
    assert [h["round"] for h in state["history"]] == [1, 2]
    after_two = _weights(run_dir / "model")
    assert any(not torch.equal(after_one[k], after_two[k]) for k in after_one)
    # Assert: the restarted clients continued their ledgers (context.state was new)
    steps = {i: round_steps(n, 8, 1)[1] for i, n in enumerate(_partition_sizes(run_dir, 3))}
    for i in range(3):
        ledger = load_ledger(run_dir / "client-state" / f"partition-{i}.json", 1e-5)
        assert ledger is not None and ledger.num_steps == 2 * steps[i]
    # Assert: the MLflow run (the same one) holds both rounds once each
    (wer,) = _mlflow_history(uri, run_dir, ("wer",))
    assert [m.step for m in wer] == [0, 1, 2]  # round 0 once, before the first round
    print(f"\nrun of 1 round + resume to 2 rounds (3 clients): {wall:.1f} s wall")


@pytest.mark.slow  # about 60 s of simulation here
def test_user_level_simulation_samples_poisson_cohorts_and_reports_the_exact_epsilon(
    data_dir: Path, no_leftovers: Path
) -> None:
    # Prepare: 12 clients, privacy-unit "user": each client joins a round with q = 0.5
    run_dir, z, q = no_leftovers, 1.3, 0.5
    overrides = {**TINY_SIMULATION, "data-dir": str(data_dir), "num-server-rounds": 6}
    overrides.update({"privacy-unit": "user", "user-noise-multiplier": z, "user-clip-norm": 0.5})
    overrides.update({"user-delta": DELTA, "client-sample-rate": q, "min-clients": 12})
    overrides["tracking-uri"] = _sqlite_uri(run_dir)
    # Execute
    start = time.perf_counter()
    outcome = simulate(
        overrides=overrides,
        num_supernodes=12,
        out=run_dir,
        output=run_dir.with_suffix(".log"),
        engine="flower",
    )
    wall = time.perf_counter() - start
    # Assert: six rounds whose cohorts were drawn, not fixed
    assert outcome.finished and outcome.rounds == 6, _log_tail(run_dir)
    rows = read_rounds(run_dir)
    sampled = [row["clients_sampled"] for row in rows]
    assert len(set(sampled)) > 1, sampled
    assert all(row["clients_ok"] == row["clients_sampled"] for row in rows)
    assert all(row["user_sample_rate"] == q for row in rows)
    assert all(row["user_noise_std"] == pytest.approx(z * 0.5 / (q * 12)) for row in rows)
    # Assert: user epsilon = an independent Opacus RDP accountant (Poisson q, z, r rounds)
    for r, row in enumerate(rows, start=1):
        assert row["user_epsilon"] == pytest.approx(_rdp_epsilon([(z, q, r)]), rel=0, abs=1e-6)
    # Assert: MLflow got the covered metrics only (clients_sampled among them), no report
    covered, per_client = _mlflow_history(
        overrides["tracking-uri"], run_dir, ("clients_sampled", "train_loss")
    )
    assert [m.value for m in covered] == sampled and per_client == []
    assert outcome.model_dir is not None
    provenance = load_model_dir(outcome.model_dir).provenance
    assert provenance["user_epsilon"] == pytest.approx(rows[-1]["user_epsilon"])
    print(
        f"\nprivacy-unit user, 12 clients (q 0.5) x 6 rounds: {wall:.1f} s wall; cohorts "
        f"{sampled}; user eps {rows[-1]['user_epsilon']:.6f} vs Opacus "
        f"{_rdp_epsilon([(z, q, 6)]):.6f}"
    )


@pytest.mark.slow  # 25-27 s of simulation here, ~33 s when it builds the module's corpus
def test_both_privacy_units_report_user_and_sample_epsilon_per_round(
    data_dir: Path, no_leftovers: Path
) -> None:
    # Prepare: 4 clients with DP-SGD, each joining a round with q = 0.5 (fraction-train),
    # server-side clipping and noise on top (privacy-unit "both")
    run_dir, user_noise = no_leftovers, 1.5
    overrides = {**TINY_SIMULATION, "data-dir": str(data_dir), "num-server-rounds": 2}
    overrides.update({"privacy-unit": "both", "user-noise-multiplier": user_noise})
    overrides.update({"user-clip-norm": 0.5, "user-delta": DELTA, "fraction-train": 0.5})
    overrides["tracking-uri"] = _sqlite_uri(run_dir)
    # Execute
    start = time.perf_counter()
    outcome = simulate(
        overrides=overrides,
        num_supernodes=4,
        out=run_dir,
        output=run_dir.with_suffix(".log"),
        engine="flower",
    )
    wall = time.perf_counter() - start
    # Assert: both guarantees in every round of rounds.jsonl; user epsilon is the accountant's
    assert outcome.finished and outcome.rounds == 2, _log_tail(run_dir)
    rows = read_rounds(run_dir)
    assert [row["round"] for row in rows] == [1, 2]
    for r, row in enumerate(rows, start=1):
        assert row["clients_ok"] == row["clients_sampled"] and row["user_sample_rate"] == 0.5
        assert row["clients_ok"] == 0 or row["epsilon_max"] > 0
        assert row["user_epsilon"] == pytest.approx(_rdp_epsilon([(user_noise, 0.5, r)]), rel=1e-12)
        assert row["user_noise_std"] == pytest.approx(user_noise * 0.5 / 2)
    assert rows[1]["user_epsilon"] > rows[0]["user_epsilon"]
    # Assert: MLflow holds the user-level epsilon per round but no client's epsilon; the model
    # records the configured sample-level guarantee and the user-level epsilon
    user, sample, wer = _mlflow_history(
        overrides["tracking-uri"], run_dir, ("user_epsilon", "epsilon_max", "wer")
    )
    assert [m.step for m in user] == [1, 2] and sample == []
    # ... and the starting model's evaluation as round 0 (step 0), before any client trained
    start = read_start(run_dir)
    assert start is not None and set(start) == {"round", "wer", "cer", "eval_seconds"}
    assert [m.step for m in wer] == [0, 1, 2] and wer[0].value == pytest.approx(start["wer"])
    assert [m.value for m in user] == pytest.approx([row["user_epsilon"] for row in rows])
    assert outcome.model_dir is not None
    provenance = load_model_dir(outcome.model_dir).provenance
    assert provenance["privacy_unit"] == "both" and provenance["noise_multiplier"] == NOISE
    assert provenance["user_epsilon"] == pytest.approx(rows[1]["user_epsilon"])
    print(
        f"\nprivacy-unit both, 4 clients (q 0.5) x 2 rounds: {wall:.1f} s wall; "
        f"user eps {rows[1]['user_epsilon']:.2f}"
    )


def _sqlite_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir.parent / 'mlflow.db'}"


def _mlflow_history(uri: str, run_dir: Path, keys: tuple[str, ...]) -> list[list[Any]]:
    """Metric histories of the run named in the run folder's tracking.json, sorted by step."""
    from mlflow import MlflowClient

    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=uri)
    return [sorted(client.get_metric_history(run_id, k), key=lambda m: m.step) for k in keys]


def _partition_sizes(run_dir: Path, n: int) -> list[int]:
    """Examples per client as the server saw them (report/clients.tsv)."""
    header, *rows = (run_dir / "report" / "clients.tsv").read_text().splitlines()
    column = header.split("\t").index("num_examples")
    sizes = {r.split("\t")[0]: int(r.split("\t")[column]) for r in rows}
    return [sizes[f"partition-{i}"] for i in range(n)]


def _round_times(outcome: SimulationOutcome) -> str:
    return ", ".join(f"{h['round_seconds']:.1f} s" for h in outcome.history)


def _log_tail(run_dir: Path) -> str:
    logs = [run_dir.with_suffix(".log"), run_dir / ".flwr" / "superlink.log"]
    return "\n".join(p.read_text()[-3000:] for p in logs if p.is_file())
