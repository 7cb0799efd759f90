"""The ``fedspeech`` command: data preparation, partitioning, features and the demo, end to end."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedspeech.app.cli import main
from fedspeech_features.manifest import read_manifest


def test_help_lists_the_commands() -> None:
    # Execute: the console entry point in a fresh interpreter
    out = subprocess.run(
        [sys.executable, "-m", "fedspeech.app.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Assert
    assert "data" in out and "demo" in out and "audit" in out


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
    assert main(["data", "fsdd", str(tmp_path / "fsdd"), "--out", str(manifest)]) == 0
    rc_part = main(
        ["data", "partition", str(manifest), "--clients", "3", "--out", str(tmp_path / "parts")]
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
    rc = main(["demo", "--out", str(tmp_path), "--run-config", "n-mfc=13"])
    # Assert: exit code 2 and a message naming the key, not a traceback
    assert rc == 2
    assert "n-mfc" in caplog.text


def test_missing_manifest_is_a_clear_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rc = main(
        ["data", "partition", str(tmp_path / "nope.tsv"), "--clients", "2", "--out", str(tmp_path)]
    )
    assert rc == 2
    assert "nope.tsv" in caplog.text


def test_demo_runs_the_whole_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the demo preset shrunk to seconds (tiny corpus, model and one round)
    tiny = {
        **{"synthetic-utterances": 96, "num-partitions": 2, "eval-max-utterances": 8},
        **{"n-mfcc": 13, "n-mels": 40, "hidden-size": 16, "num-layers": 1, "num-server-rounds": 1},
        **{"pretrain-utterances": 24, "pretrain-epochs": 1},
        **{"data-dir": str(tmp_path / "data"), "tracking-uri": f"sqlite:///{tmp_path}/mlflow.db"},
    }
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in tiny.items())
    # Execute
    rc = main(["demo", "--out", str(tmp_path / "run"), "--run-config", overrides])
    out = capsys.readouterr().out
    # Assert: it trained privately, transcribed a held-out file and reported the figures
    assert rc == 0
    assert "reference:" in out and "recognised:" in out
    assert re.search(r"WER \d+\.\d%, CER \d+\.\d% on the held-out voices", out)
    epsilon = float(re.search(r"epsilon max (\d+\.\d+)", out).group(1))  # type: ignore[union-attr]
    assert 0 < epsilon <= 8.0  # the demo preset's target epsilon
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert "MLflow run" in out and (tmp_path / "mlflow.db").is_file()
    # ... and round 1 started from the public pre-trained model (the demo's recipe)
    assert "pre-trained without DP on 24 public synthetic utterances" in out
    provenance = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["provenance"]
    assert Path(provenance["run_config"]["init-model"]).name.startswith("pretrained-")
