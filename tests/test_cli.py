"""The ``fedspeech`` command: data preparation, partitioning, features and the demo, end to end;
flag conventions (global flags anywhere, defaults in --help, renamed flags) and ``config show``."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedspeech.app.cli import _build_parser, main
from fedspeech.app.cli_common import verbosity
from fedspeech.app.demo import mlflow_ui_command
from fedspeech.config import flat_keys
from fedspeech.modeldir import load_model_dir
from fedspeech_features.manifest import read_manifest
from fedspeech_server.tracking import read_start


def test_help_lists_the_commands() -> None:
    # Execute: the console entry point in a fresh interpreter
    out = subprocess.run(
        [sys.executable, "-m", "fedspeech.app.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Assert
    assert "data" in out and "demo" in out and "audit" in out and "config" in out


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["simulate", "--help"], ["config", "show"], ["--version"], ["simulate", "--nope"]],
)
def test_help_config_and_usage_errors_import_no_torch(argv: list[str]) -> None:
    # Execute: the CLI in a fresh interpreter; torch's import alone takes 1-2 s here
    code = (
        "import sys\n"
        "from fedspeech.app.cli import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = sorted({'torch', 'torchaudio', 'flwr', 'mlflow', 'opacus'} & set(sys.modules))\n"
        "print('HEAVY', code, heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    # Assert: it answered (a usage error for the misspelt flag) without them
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"HEAVY {2 if '--nope' in argv else 0} []", proc.stderr[-2000:]


def test_data_fsdd_then_partition_then_features(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: 2 digits x 6 speakers x 2 takes of real FSDD audio, plus one corrupt file
    recordings = tmp_path / "fsdd" / "recordings"
    recordings.mkdir(parents=True)
    for src in sorted((shared_data / "fsdd" / "recordings").glob("[01]_*_[01].wav")):
        shutil.copy(src, recordings / src.name)
    (recordings / "2_nobody_0.wav").write_bytes(b"not audio at all")
    manifest = tmp_path / "fsdd.tsv"

    # Execute
    assert main(["data", "fsdd", str(tmp_path / "fsdd"), "--manifest", str(manifest)]) == 0
    parts_dir = str(tmp_path / "parts")
    rc_part = main(
        ["data", "partition", str(manifest), "--num-partitions", "3", "--partitions-dir", parts_dir]
    )
    rc_feat = main(["data", "features", str(tmp_path / "parts" / "client_0" / "manifest.tsv")])

    # Assert: the corrupt file is left out, everything else is kept and split by speaker
    rows = read_manifest(manifest)
    assert len(rows) == 24 and {r.speaker for r in rows} == {
        "george", "jackson", "lucas", "nicolas", "theo", "yweweler"
    }  # fmt: skip
    assert rc_part == 0 and rc_feat == 0
    parts = [read_manifest(tmp_path / "parts" / f"client_{i}" / "manifest.tsv") for i in range(3)]
    assert sum(len(p) for p in parts) == 24
    assert all(
        not ({u.speaker for u in a} & {u.speaker for u in b})
        for a in parts
        for b in parts
        if a is not b
    )
    out = capsys.readouterr().out
    assert "total" in out and "24" in out  # the partition summary table
    assert f"{len(parts[0])} examples (0 skipped)" in out  # the feature summary


def test_unknown_run_config_key_is_a_clear_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Execute
    rc = main(["demo", "--run-dir", str(tmp_path), "--run-config", "n-mfc=13"])
    # Assert: exit code 2 and a message naming the key, not a traceback
    assert rc == 2
    assert "n-mfc" in caplog.text


def test_missing_manifest_is_a_clear_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "nope.tsv")
    rc = main(
        ["data", "partition", missing, "--num-partitions", "2", "--partitions-dir", str(tmp_path)]
    )
    assert rc == 2
    assert "nope.tsv" in caplog.text


def test_the_demo_passes_its_engine_to_the_simulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a simulation that records its engine and stops at once
    from fedspeech.app import simulate as simulate_module

    engines: list[str] = []

    def stopped(**kwargs: Any) -> simulate_module.SimulationOutcome:
        engines.append(kwargs["engine"])
        return simulate_module.SimulationOutcome(tmp_path, 1, 0, False, None, [], None, 0.0)

    monkeypatch.setattr(simulate_module, "simulate", stopped)
    # Execute
    codes = [
        main(["demo", *flags, "--run-dir", str(tmp_path)]) for flags in ([], ["--engine", "flower"])
    ]
    # Assert: the default is auto; a stopped simulation is exit 1, pointing at its log (no
    # Flower runtime folder to name: none was made)
    assert engines == ["auto", "flower"] and codes == [1, 1]
    assert "stopped after 0 rounds; see the log above" in caplog.text


def test_demo_runs_the_whole_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the demo preset shrunk to seconds (tiny corpus, one round; the shipped model)
    tiny = {
        **{"synthetic-utterances": 72, "num-partitions": 2, "eval-max-utterances": 4},
        **{"num-server-rounds": 1, "holdout-speakers": 1},
        **{"data-dir": str(tmp_path / "data"), "tracking-uri": f"sqlite:///{tmp_path}/mlflow.db"},
    }
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in tiny.items())
    # Execute
    rc = main(["demo", "--run-dir", str(tmp_path / "run"), "--run-config", overrides])
    out = capsys.readouterr().out
    # Assert: it trained privately, transcribed a held-out file and reported the figures
    assert rc == 0
    assert "reference:" in out and "recognised:" in out
    figures = re.search(r"WER (\d+\.\d)% -> (\d+\.\d)%, CER (\d+\.\d)% -> (\d+\.\d)%", out)
    assert figures is not None, out  # the starting model (round 0) and the final one
    start = read_start(tmp_path / "run")
    assert start is not None and f"{100 * start['cer']:.1f}" == figures.group(3)
    epsilon = float(re.search(r"epsilon max (\d+\.\d+)", out).group(1))  # type: ignore[union-attr]
    assert 0 < epsilon <= 8.0  # the demo preset's target epsilon
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert "MLflow run" in out and (tmp_path / "mlflow.db").is_file()
    assert not (tmp_path / "run" / ".flwr").exists()  # the default engine: local, no SuperLink
    # ... and round 1 started from the shipped public model (the demo's recipe): round 0 scored it
    assert "started from the shipped public model @en-public-small" in out
    provenance = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["provenance"]
    assert provenance["run_config"]["init-model"] == "@en-public-small"
    card = (tmp_path / "run" / "report" / "init_model_card.md").read_text()  # logged to MLflow
    assert card.startswith("# en-public-small")
    # ... and only the head travelled (freeze-layers = num-layers): 2 x 512 LayerNorm + 512 x 29
    # + 29; every fixed weight of the final model is the shipped model's, bit for bit.
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").open()]
    assert [r["exchanged_weights"] for r in rounds if r["round"] >= 1] == [2 * 512 + 512 * 29 + 29]
    shipped = load_model_dir("@en-public-small").model.state_dict()
    final = load_model_dir(tmp_path / "run" / "model").model.state_dict()
    moved = {k for k in shipped if not torch.equal(shipped[k], final[k])}
    assert moved == {"norm.weight", "norm.bias", "head.weight", "head.bias"}


# ---------------------------------------------------------------- flag conventions


def _parsers(parser: argparse.ArgumentParser, name: str = "fedspeech") -> Iterator[tuple[str, str]]:
    """(command, --help text) of the top parser and every (sub)command's."""
    yield name, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {command}")


def test_global_flags_work_before_and_after_the_command() -> None:
    # Execute: -v/-q before the command, after it, after a nested command, and on both sides
    parse = _build_parser().parse_args
    before = parse(["-v", "config", "show"])
    after = parse(["config", "show", "-v"])
    nested = parse(["data", "-q", "partition", "m.tsv", "--num-partitions", "2",
                    "--partitions-dir", "p"])  # fmt: skip
    both = parse(["-v", "config", "show", "-q", "--format", "json"])
    # Assert: a later position neither loses nor resets an earlier flag
    assert verbosity(before) == verbosity(after) == 1
    assert verbosity(nested) == -1
    assert (both.verbose, both.quiet, both.format) == (1, 1, "json")
    assert verbosity(parse(["config", "show"])) == 0


def test_global_flags_after_the_command_set_the_log_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    level = root.level
    try:
        # Execute + Assert: the level follows the flag wherever it stands
        assert main(["config", "show", "-q"]) == 0
        assert root.level == logging.WARNING
        assert main(["-v", "config", "show"]) == 0
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(level)
    assert "num-server-rounds" in capsys.readouterr().out


def test_every_help_shows_its_defaults_and_no_empty_ones() -> None:
    # Execute
    helps = dict(_parsers(_build_parser()))
    # Assert: defaults shown where there is one, never "None"/"False"/"" noise
    assert {"fedspeech data partition", "fedspeech config show", "fedspeech demo"} <= set(helps)
    for command, text in helps.items():
        assert "(default: None)" not in text and "(default: False)" not in text, command
        assert "(default: )" not in text, command
        assert "-v, --verbose" in text and "-q, --quiet" in text, command
    flat = {command: " ".join(text.split()) for command, text in helps.items()}
    assert "(default: speaker)" in flat["fedspeech data partition"]
    assert "(default: 0.5)" in flat["fedspeech data partition"]
    assert "(default: .fedspeech/audit)" in flat["fedspeech audit"]
    assert "(default: 1)" in flat["fedspeech simulate"]  # --client-cpus
    assert "(default: demo)" in flat["fedspeech demo"]  # --preset
    assert "(default: text)" in flat["fedspeech config show"]
    # the renamed flags are the ones shown; their old spellings are not
    assert "--num-partitions" in flat["fedspeech data partition"]
    assert "--clients" not in flat["fedspeech data partition"]
    assert "--out " not in flat["fedspeech train"] and "--model-dir" in flat["fedspeech train"]


def test_help_through_the_console_entry_point_shows_defaults() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedspeech.app.cli", "data", "partition", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "default:" in out and "--dirichlet-alpha" in out


def test_config_show_names_the_source_of_every_value(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute: the smoke preset (num-partitions = 3) and an override on top
    overrides = "num-server-rounds=7 target-epsilon=4"
    rc = main(
        ["config", "show", "--preset", "smoke", "--run-config", overrides, "--format", "json"]
    )
    shown = json.loads(capsys.readouterr().out)
    # Assert: every key, each with its value and the layer that set it
    assert rc == 0
    assert set(shown) == flat_keys()
    assert shown["num-server-rounds"] == {"value": 7, "source": "command line"}
    assert shown["num-partitions"] == {"value": 3, "source": "preset"}
    assert shown["hidden-size"]["source"] == "pyproject"  # this checkout's pyproject.toml
    # the override's target epsilon blanks the pyproject's noise multiplier
    assert shown["noise-multiplier"] == {"value": "", "source": "command line"}


def test_config_show_text_is_one_line_per_key(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    assert main(["config", "show", "--run-config", 'strategy="fedadam"']) == 0
    lines = capsys.readouterr().out.splitlines()
    # Assert: a header, then KEY VALUE SOURCE for every key
    assert lines[0].split() == ["KEY", "VALUE", "SOURCE"]
    rows = {line.split()[0]: line.split(maxsplit=2)[1:] for line in lines[1:]}
    assert set(rows) == flat_keys()
    assert rows["strategy"] == ['"fedadam"', "command line"]
    assert rows["num-partitions"] == ["6", "pyproject"]


def test_config_show_refuses_an_unknown_key(caplog: pytest.LogCaptureFixture) -> None:
    assert main(["config", "show", "--run-config", "n-mfc=13"]) == 2
    assert "n-mfc" in caplog.text


def test_config_show_help_says_it_lists_the_run_config_keys(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["config", "show", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0
    assert "every key the run config accepts" in text and "--run-config" in text


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (["train", "--manifest", "m.tsv", "--out", "d"],
         ["train", "--manifest", "m.tsv", "--model-dir", "d"]),
        (["simulate", "--out", "r"], ["simulate", "--run-dir", "r"]),
        (["demo", "--out", "r"], ["demo", "--run-dir", "r"]),
        (["audit", "--out", "r", "--json"], ["audit", "--run-dir", "r", "--format", "json"]),
        (["evaluate", "--model", "m", "--manifest", "x.tsv", "--json"],
         ["evaluate", "--model", "m", "--manifest", "x.tsv", "--format", "json"]),
        (["transcribe", "--model", "m", "a.wav", "--out", "o"],
         ["transcribe", "--model", "m", "a.wav", "-o", "o"]),
        (["data", "synthetic", "--out", "c"], ["data", "synthetic", "--corpus-dir", "c"]),
        (["data", "fsdd", "root", "--out", "m.tsv"], ["data", "fsdd", "root", "--manifest", "m.tsv"]),
        (["data", "folder", "root", "--out", "m.tsv"],
         ["data", "folder", "root", "--manifest", "m.tsv"]),
        (["data", "partition", "m.tsv", "--clients", "4", "--method", "dirichlet", "--alpha",
          "0.3", "--seed", "7", "--out", "p"],
         ["data", "partition", "m.tsv", "--num-partitions", "4", "--partition", "dirichlet",
          "--dirichlet-alpha", "0.3", "--partition-seed", "7", "--partitions-dir", "p"]),
    ],
)  # fmt: skip
def test_old_flag_spellings_still_mean_the_same(old: list[str], new: list[str]) -> None:
    # Execute
    parse = _build_parser().parse_args
    parsed_old, parsed_new = vars(parse(old)), vars(parse(new))
    # Assert: the same arguments, the old spellings noted for the deprecation warning
    assert parsed_old.pop("deprecated_flags") and "deprecated_flags" not in parsed_new
    assert parsed_old == parsed_new


def test_old_and_new_spelling_together_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--manifest", "m.tsv", "--model-dir", "a", "--out", "b"])
    assert exit_.value.code == 2


def test_an_old_spelling_works_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Execute: the former partition flags on a manifest that does not exist
    missing = str(tmp_path / "nope.tsv")
    rc = main(["data", "partition", missing, "--clients", "2", "--out", str(tmp_path)])
    # Assert: parsed and run (the missing manifest is the error), each old flag named
    assert rc == 2 and "nope.tsv" in caplog.text
    assert "--clients is deprecated" in caplog.text and "use --num-partitions" in caplog.text
    assert "--out is deprecated" in caplog.text and "use --partitions-dir" in caplog.text


def test_the_mlflow_ui_hint_names_the_mlflow_beside_this_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a Python whose bin/ holds an mlflow executable, and an empty PATH
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "mlflow").write_text("#!/bin/sh\n")
    (bin_dir / "mlflow").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    # Execute + Assert: that mlflow first; without it, mlflow run by this Python
    assert mlflow_ui_command("sqlite:///m.db") == (
        f"{bin_dir / 'mlflow'} ui --backend-store-uri sqlite:///m.db"
    )
    (bin_dir / "mlflow").unlink()
    assert mlflow_ui_command("sqlite:///m.db") == (
        f"{bin_dir / 'python'} -m mlflow ui --backend-store-uri sqlite:///m.db"
    )


def test_client_cpus_takes_whole_numbers_only(capsys: pytest.CaptureFixture[str]) -> None:
    # Flower 1.42's client-resources-num-cpus is an int >= 1: "1.0" made `flwr run` fail.
    parse = _build_parser().parse_args
    # Execute + Assert: a whole number parses to an int
    assert parse(["simulate", "--client-cpus", "2"]).client_cpus == 2
    assert isinstance(parse(["simulate"]).client_cpus, int)
    # Execute + Assert: a fraction or zero is a usage error naming the option
    for bad in ("1.5", "0"):
        with pytest.raises(SystemExit) as exit_:
            parse(["simulate", "--client-cpus", bad])
        assert exit_.value.code == 2 and "--client-cpus" in capsys.readouterr().err


@pytest.mark.parametrize("finished", [True, False])
def test_the_privacy_table_is_printed_once(
    finished: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a run that finished (its server printed the table as it ended) or was interrupted
    from fedspeech.app.simulate import SimulationOutcome, report_outcome

    clients = {"partition-0": {"epsilon": 2.5, "rounds_ok": 3}}
    outcome = SimulationOutcome(tmp_path, 0, 3, finished, None, [], "run-1", 9.0, None, clients)
    # Execute
    code = report_outcome(outcome, interrupted=not finished)
    # Assert: the table rows only where the server did not print them, else where they are
    printed = capsys.readouterr().out
    assert code == (0 if finished else 130)
    assert ("partition-0\t2.5000" in printed) is not finished
    assert (str(tmp_path / "report" / "privacy.tsv") in printed) is finished
