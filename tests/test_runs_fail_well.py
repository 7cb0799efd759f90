"""Federated runs that fail well: resume what was run, check before launch, stop cleanly, tell
MLflow the truth, and say what privacy a run spent.

Pre-flight and the privacy summary run in the default suite (seconds, no Flower processes or
ClientApps in this process); the real simulations (resume, a failing run, SIGINTs) are ``slow``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from benchmarks.inprocess import InProcessGrid
from fedspeech.app.cli import main as cli_main
from fedspeech.app.simulate import simulate
from fedspeech.config import ConfigError, RunConfig, parse_overrides, resolve_run_config
from fedspeech.fed_data import client_manifest, corpus_manifest
from fedspeech.privacy_ledger import PrivacyLedger
from fedspeech_client.local_round import round_steps
from fedspeech_features.manifest import read_manifest
from fedspeech_server.app import main as server_main
from fedspeech_server.plots import PLOTS
from fedspeech_server.tracking import read_rounds, read_tracking_info
from tests.conftest import TINY_SIMULATION, run_processes

TINY: dict[str, Any] = {**TINY_SIMULATION, "client-threads": 1, "server-threads": 1}
FEDSPEECH = Path(sys.executable).parent / "fedspeech"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data-dir holding the tiny synthetic corpus (16 voices, 96 utterances), built once."""
    root = tmp_path_factory.mktemp("data")
    corpus_manifest(RunConfig.from_flat(TINY), root)
    return root


def _flowerless(run_dir: Path) -> bool:
    """No Flower process was started for this run folder, and no tracking run opened."""
    return not (run_dir / ".flwr").exists() and not read_tracking_info(run_dir)


def _mlflow_status(uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient(tracking_uri=uri).get_run(run_id).info.status)


# --------------------------------------------------------------------------- pre-flight


def _preflight_cases(
    data_dir: Path, tmp_path: Path
) -> dict[str, tuple[list[str], dict[str, Any], list[str]]]:
    """name -> (extra simulate arguments, run-config overrides, what the error must name)."""
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "weights.bin").write_bytes(b"x")
    return {
        "missing corpus": (
            [],
            {"corpus": str(tmp_path / "nope.tsv")},
            ["corpus:", "nope.tsv: no such file"],
        ),
        "missing eval manifest": (
            [],
            {"eval-manifest": str(tmp_path / "eval.tsv")},
            ["eval-manifest:", "eval.tsv: no such file"],
        ),
        "holdout >= speakers": (
            [],
            {"holdout-speakers": 16},
            ["holdout-speakers 16", "16 speaker"],
        ),
        "init-model not a model": (
            [],
            {"init-model": str(not_a_model)},
            ["init-model:", "not a model directory"],
        ),
        "more partitions than speakers": (
            ["--num-supernodes", "20"],
            {},
            ["num-partitions 20", "14 are left"],
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing corpus",
        "missing eval manifest",
        "holdout >= speakers",
        "init-model not a model",
        "more partitions than speakers",
    ],
)
def test_preflight_refuses_a_run_that_cannot_work_before_flower_starts(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    # Prepare
    args, overrides, needles = _preflight_cases(data_dir, tmp_path)[case]
    run_dir = tmp_path / "run"
    settings = {**TINY, "data-dir": str(data_dir), "tracking-uri": "", **overrides}
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
    # Execute
    start = time.perf_counter()
    with caplog.at_level(logging.ERROR):
        rc = cli_main(["simulate", "--run-dir", str(run_dir), *args, "--run-config", run_config])
    seconds = time.perf_counter() - start
    # Assert: a usage error naming the key / path, and nothing launched
    assert rc == 2
    for needle in needles:
        assert needle in caplog.text, caplog.text
    assert "the run cannot start (1 problem(s)" in caplog.text
    assert _flowerless(run_dir)
    print(f"\npre-flight ({case}): refused in {seconds:.2f} s")


def test_preflight_lists_every_problem_at_once(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a missing corpus, a missing eval manifest, a sample larger than the federation
    overrides = {**TINY, "data-dir": str(data_dir), "tracking-uri": ""}
    overrides.update({"corpus": str(tmp_path / "c.tsv"), "eval-manifest": str(tmp_path / "e.tsv")})
    overrides["clients-per-round"] = 9
    # Execute
    with pytest.raises(ConfigError) as refused:
        simulate(overrides=overrides, num_supernodes=3, out=tmp_path / "run")
    # Assert: one line per problem, each naming its key
    lines = str(refused.value).splitlines()
    assert lines[0].startswith("the run cannot start (3 problem(s)")
    assert [line.split(":")[0].strip(" -") for line in lines[1:]] == [
        "corpus",
        "eval-manifest",
        "clients-per-round 9 exceeds the 3 clients",
    ]
    assert _flowerless(tmp_path / "run")


def test_no_budget_and_a_plan_past_the_budget_are_warned_before_launch(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedspeech.app.preflight import check_run

    # Prepare: fixed noise, 3 rounds, without a budget and with one that round 2 passes
    cfg = RunConfig.from_flat({**TINY, "data-dir": str(data_dir), "num-server-rounds": 3})
    tight = RunConfig.from_flat({**cfg.to_flat(), "epsilon-budget": 1.0})
    # Execute
    loose_plan, tight_plan = check_run(cfg, 3), check_run(tight, 3)
    # Assert
    assert not loose_plan.problems and not tight_plan.problems
    (warning,) = loose_plan.warnings
    assert warning.startswith("no epsilon-budget is set: a client sampled every round reaches")
    (warning,) = tight_plan.warnings
    assert "exceed a client's epsilon-budget" in warning and "declines from round 1" in warning


# --------------------------------------------------------------------------- resume


def test_resume_refuses_to_change_what_defines_the_run(tmp_path: Path) -> None:
    # Prepare: a run folder as a first run leaves it (saved config + checkpoint are checked)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run_config.toml").write_text("hidden-size = 16\nnum-partitions = 3\nlr = 0.01\n")
    # Execute / Assert: unsafe keys are named with old and new values, before anything starts
    with pytest.raises(ConfigError) as refused:
        simulate(resume=True, out=run_dir, overrides="hidden-size=32 lr=0.1 num-server-rounds=9")
    message = str(refused.value)
    assert "hidden-size 16 -> 32" in message and "lr 0.01 -> 0.1" in message
    assert "num-server-rounds" not in message.split("may change only")[0]
    with pytest.raises(ConfigError, match="has 3 clients"):
        simulate(resume=True, out=run_dir, num_supernodes=4)
    with pytest.raises(ConfigError, match="--preset with --resume"):
        simulate(resume=True, out=run_dir, preset="fed-smoke")
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        simulate(resume=True, out=tmp_path / "elsewhere")


@pytest.mark.slow  # three tiny simulations, about 80 s
def test_the_readme_resume_command_continues_the_run_like_an_uninterrupted_one(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the same tiny run (not the defaults: 16 hidden units, 3 clients) twice
    base = {**TINY, "data-dir": str(data_dir), "num-partitions": 3}
    base["tracking-uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    whole, split = tmp_path / "whole", tmp_path / "split"
    # Execute: 2 rounds at once; 1 round, then the README's resume command (only the rounds)
    flower = {"engine": "flower"}
    simulate(
        overrides={**base, "num-server-rounds": 2}, out=whole, output=tmp_path / "w.log", **flower
    )
    simulate(
        overrides={**base, "num-server-rounds": 1}, out=split, output=tmp_path / "s.log", **flower
    )
    capsys.readouterr()
    resume = ["simulate", "--engine", "flower", "--run-dir", str(split), "--resume"]
    rc = cli_main([*resume, "--run-config", "num-server-rounds=2"])
    # Assert: the resumed run kept its settings and reproduced the uninterrupted rounds
    assert rc == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("simulate: finished 2 rounds")
    a, b = read_rounds(whole), read_rounds(split)
    assert [r["round"] for r in b] == [1, 2]
    for key in ("clients_ok", "num_examples", "epsilon_max"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-9), key
    for key in ("train_loss", "wer", "cer"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-3), key
    config = json.loads((split / "model" / "config.json").read_text())
    assert config["model"]["hidden_size"] == 16
    # the streamed log written to a file: no colour codes, no third-party warning chatter
    log_text = (tmp_path / "w.log").read_text(errors="replace")
    assert "round 2" in log_text and "\x1b[" not in log_text
    for chatter in ("SADeprecationWarning", "Optimal order is the largest alpha", "FutureWarning"):
        assert chatter not in log_text, chatter
    run_ids = {read_tracking_info(d)["run_id"] for d in (split,)}
    assert _mlflow_status(base["tracking-uri"], run_ids.pop()) == "FINISHED"


# --------------------------------------------------------------------------- ends in MLflow


@pytest.mark.slow  # one tiny simulation whose clients all crash, about 30 s
def test_a_failed_run_exits_non_zero_and_ends_failed_in_mlflow(
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare: every client crashes (fault injection, read from the nodes' environment)
    monkeypatch.setenv("FEDSPEECH_FAULT", "*:raise")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {**TINY, "data-dir": str(data_dir), "num-partitions": 2, "round-retries": 0}
    settings["tracking-uri"] = uri
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
    # Execute
    args = ["simulate", "--engine", "flower", "--run-dir", str(tmp_path / "run")]
    rc = cli_main([*args, "--run-config", run_config])
    # Assert: exit 1, one final line saying so, the run id printed, FAILED in MLflow
    out = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert out[-1].startswith("simulate: FAILED after round 0: run stopped in round 1: 0 of 2")
    assert "injected fault" in read_tracking_info(tmp_path / "run")["error"]  # in full
    run_id = read_tracking_info(tmp_path / "run")["run_id"]
    assert f"tracking run id: {run_id}" in out
    assert _mlflow_status(uri, run_id) == "FAILED"
    assert not run_processes(tmp_path / "run")


@pytest.mark.slow  # 10 tiny simulations, each interrupted: about 4 min
@pytest.mark.timeout(900)
def test_sigint_and_sigterm_at_random_points_leave_no_process_and_end_killed(
    data_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a 60-round tiny run (about 20 s of start-up, then 0.4 s a round: longer than
    # the latest signal), started as a user would (its own process group, like a terminal's
    # foreground job: Ctrl-C signals the CLI and the `flwr run` it started)
    settings = {**TINY, "data-dir": str(data_dir), "num-partitions": 2, "num-server-rounds": 60}
    rng = random.Random(0)
    outcomes = []
    # what it stops: Flower's processes
    command = [str(FEDSPEECH), "simulate", "--engine", "flower"]
    for attempt in range(10):
        run_dir = tmp_path / f"run{attempt}"
        uri = f"sqlite:///{tmp_path / f'mlflow{attempt}.db'}"
        run_config = " ".join(
            f"{k}={json.dumps(v)}" for k, v in {**settings, "tracking-uri": uri}.items()
        )
        with (tmp_path / f"run{attempt}.log").open("wb") as log_file:
            proc = subprocess.Popen(
                [*command, "--run-dir", str(run_dir), "--run-config", run_config],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # Execute: the first run is interrupted right after its first checkpoint, the others
        # at random points (start-up, Ray coming up, training, evaluation, checkpointing); the
        # last one gets SIGTERM (`kill PID`, the CLI alone), the others SIGINT (Ctrl-C)
        if attempt == 0:
            while not (run_dir / "checkpoint" / "state.json").is_file() and proc.poll() is None:
                time.sleep(0.1)
            delay = 0.0
        else:
            delay = rng.uniform(0.5, 30.0)
            time.sleep(delay)
        if attempt == 9:
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
        # Assert: nothing of ours left; the exit code and the tracking status agree
        time.sleep(0.5)
        assert not run_processes(run_dir), (attempt, delay, run_processes(run_dir))
        text = (tmp_path / f"run{attempt}.log").read_text(errors="replace")
        status = read_tracking_info(run_dir).get("status")
        if rc == 0:  # finished before the signal arrived
            assert status == "FINISHED", text[-2000:]
        else:
            assert rc == 130, text[-2000:]
            assert text.rstrip().splitlines()[-1].startswith("simulate: interrupted")
            if status is not None:  # a tracking run had been opened
                assert status == "KILLED"
                assert _mlflow_status(uri, read_tracking_info(run_dir)["run_id"]) == "KILLED"
        outcomes.append((round(delay, 1), rc, status))
    print(f"\nSIGINT (SIGTERM last) at (delay s, exit code, tracking status): {outcomes}")
    assert sum(rc == 130 for _, rc, _ in outcomes) >= 8  # the signals did interrupt


# --------------------------------------------------------------------------- privacy summary


class _Interrupted(InProcessGrid):
    """Delivers to real ClientApps; in ``stop_round`` it is interrupted once the clients have
    trained (and been charged), before the server aggregates: Ctrl-C in the middle of a round."""

    def __init__(self, *args: Any, stop_round: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_round = stop_round

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        rounds = {int(str(m.content.config_records["config"]["server-round"])) for m in messages}
        if self.stop_round in rounds:
            raise KeyboardInterrupt
        return replies


def _nodes(flat: dict[str, Any], n: int) -> dict[int, Context]:
    return {
        100 + i: Context(
            run_id=1,
            node_id=100 + i,
            state=RecordDict(),
            run_config=flat,
            node_config={"partition-id": i, "num-partitions": n},
        )
        for i in range(n)
    }


@pytest.mark.usefixtures("one_thread", "flower_server_identity")
def test_the_privacy_summary_lists_a_declined_client_and_a_round_charged_twice(
    data_dir: Path, tmp_path: Path
) -> None:
    from fedspeech_client.app import app as client_app

    # Prepare: 3 real ClientApps; partition 0's budget lets it train one round only
    run_dir = tmp_path / "run"
    settings = {
        **TINY,
        **{"data-dir": str(data_dir), "out-dir": str(run_dir), "tracking-uri": ""},
        **{"num-partitions": 3, "min-clients": 3, "num-server-rounds": 3},
    }
    size = len(read_manifest(client_manifest(RunConfig.from_flat(settings), data_dir, 0, 3)))
    q, steps = round_steps(size, TINY["batch-size"], TINY["epochs"])
    one, two = (PrivacyLedger(1e-5).record(1.0, q, k * steps).epsilon() for k in (1, 2))
    flat = RunConfig.from_flat({**settings, "partition-budgets": f"0={(one + two) / 2}"}).to_flat()
    # Execute: round 2 is interrupted after its clients trained; the run is resumed (new nodes,
    # as after a restart) and runs round 2 again, then round 3
    with pytest.raises(KeyboardInterrupt):
        server_main(_Interrupted(client_app, _nodes(flat, 3), stop_round=2), _ctx(flat))
    killed = read_tracking_info(run_dir)
    server_main(InProcessGrid(client_app, _nodes(flat, 3)), _ctx({**flat, "resume": True}))
    # Assert: the interrupted server ended its run KILLED; the summary names the decliner and
    # the clients whose round 2 was charged twice
    assert killed["status"] == "KILLED"
    lines = (run_dir / "report" / "privacy.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = {r.split("\t")[0]: dict(zip(header, r.split("\t"), strict=True)) for r in lines[1:]}
    assert rows["partition-0"]["rounds_ok"] == "1"
    assert rows["partition-0"]["rounds_declined"] == "2"  # rounds 2 (again) and 3
    assert float(rows["partition-0"]["epsilon_budget"]) == pytest.approx((one + two) / 2)
    assert float(rows["partition-0"]["budget_left"]) == pytest.approx((two - one) / 2, rel=1e-3)
    assert rows["partition-1"]["rounds_recharged"] == rows["partition-2"]["rounds_recharged"] == "1"
    assert rows["partition-0"]["rounds_recharged"] == "0"  # it declined: nothing charged twice
    assert rows["partition-1"]["epsilon_budget"] == "-"


def _ctx(flat: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=flat)


# --------------------------------------------------------------------------- smaller items


def test_a_malformed_preset_is_named_with_its_line(tmp_path: Path) -> None:
    preset = tmp_path / "mine.toml"
    preset.write_text("hidden-size = 32\nlr = = 0.1\n")
    with pytest.raises(ConfigError, match=r"mine\.toml: not valid TOML \(.*line 2"):
        resolve_run_config(str(preset))


def test_overrides_accept_spaces_around_equals_and_quoted_values() -> None:
    assert parse_overrides('num-server-rounds = 5  run-name = "a b"  dp=false') == {
        "num-server-rounds": 5,
        "run-name": "a b",
        "dp": False,
    }
    with pytest.raises(ConfigError, match="'rounds' is not key=value"):
        parse_overrides("num-server-rounds=5 rounds")


def test_the_epsilon_plot_says_it_shows_the_running_total() -> None:
    title, _, keys = PLOTS["epsilon.png"]
    assert "so far" in title and "per round" not in title
    assert "epsilon_max" in keys


def test_messages_name_one_run_config_key_each() -> None:
    with pytest.raises(ConfigError) as refused:
        RunConfig.from_flat({"delta": 1.0, "max-grad-norm": 1.0})
    assert str(refused.value).endswith("delta must be in (0, 1), got 1.0")
    assert (
        "max-grad-norm" not in str(refused.value) and "_" not in str(refused.value).split(":")[-1]
    )


def test_reply_messages_without_a_budget_are_not_recharged() -> None:
    """``recharged`` is 0 for a client's first charge of a round (and no budget is reported)."""
    from fedspeech_server.rounds import ClientReport, privacy_summary, update_clients

    table: dict[str, dict[str, Any]] = {}
    update_clients(table, 1, [ClientReport("p", "ok", {"epsilon": 1.0, "recharged": 0.0})])
    update_clients(table, 2, [ClientReport("p", "ok", {"epsilon": 2.0, "recharged": 1.0})])
    update_clients(
        table, 3, [ClientReport("p", "declined", {"epsilon": 2.0, "epsilon-budget": 2.5})]
    )
    lines = privacy_summary(table).splitlines()
    assert lines[1].split("\t") == ["p", "2.0000", "2.5", "0.5000", "2", "1", "1"]
