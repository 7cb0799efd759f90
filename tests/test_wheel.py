"""The built wheel, installed into a fresh venv outside the checkout, runs on its own.

What a user who runs ``pip install fedspeech-*.whl`` gets: the CLI, ``transcribe`` and the smallest
``simulate`` (Flower loads the ServerApp/ClientApp from the installed ``fedspeech_server`` and
``fedspeech_client``), with no top-level ``client``/``server``/``features`` in site-packages and no
file of the checkout on ``sys.path``. The venv is made by ``scripts/install.sh`` (CPU torch first,
as ``make install``), so on CI its downloads come from pip's cache of that install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "*.egg-info", ".fedspeech", "mlruns", "mlflow.db", "__pycache__"
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# the smallest useful simulation: 2 clients, one round, a tiny model on 24 synthetic utterances
SMALLEST = (
    "synthetic-utterances=24 holdout-speakers=1 num-partitions=2 num-server-rounds=1 "
    "n-mfcc=13 n-mels=40 hidden-size=16 num-layers=1 batch-size=4 dp-seed=0 "
    "client-threads=1 server-threads=1 tracking-uri=sqlite:///mlflow.db"
)


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{args} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (outside the repo) with the wheel built from this checkout installed."""
    root = tmp_path_factory.mktemp("wheel")
    # build from a copy: a checkout's build/ may hold files of an older layout, which
    # setuptools would pack too
    source = root / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_NOT_SOURCE)
    dist = root / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    _run([*pip_wheel, "-w", str(dist), str(source)], root, dict(os.environ))
    (wheel,) = dist.glob("fedspeech-*.whl")
    env = {**os.environ, "VENV": str(root / "venv"), "FEDSPEECH_WHEEL": str(wheel)}
    env["PYTHON"] = getattr(sys, "_base_executable", sys.executable)
    env.pop("PYTHONPATH", None)
    _run(["bash", str(ROOT / "scripts" / "install.sh")], ROOT, env, timeout=1500)
    return root / "venv"


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_the_installed_wheel_has_unique_top_level_names_and_no_checkout(venv: Path) -> None:
    # Execute: import from a folder outside the checkout
    python = str(venv / "bin" / "python")
    where = _run(
        [
            python,
            "-c",
            "import fedspeech, fedspeech_client, fedspeech_server, "
            "fedspeech_features, fedspeech.app.cli as c; print(fedspeech.__file__)",
        ],
        venv.parent,
        _env(venv),
    )
    clash = subprocess.run(
        [python, "-c", "import client"],
        cwd=venv.parent,
        env=_env(venv),
        capture_output=True,
        text=True,
        check=False,
    )
    # Assert
    assert Path(where.strip()).is_relative_to(venv), where
    assert clash.returncode != 0 and "No module named 'client'" in clash.stderr
    for name in ("server", "features"):
        gone = subprocess.run(
            [python, "-c", f"import {name}"],
            cwd=venv.parent,
            env=_env(venv),
            capture_output=True,
            check=False,
        )
        assert gone.returncode != 0, name


def test_the_installed_wheel_simulates_demos_and_transcribes(venv: Path) -> None:
    # Prepare: a work folder outside the checkout; the shipped preset names are listed
    work = venv.parent / "work"
    work.mkdir()
    fedspeech = str(venv / "bin" / "fedspeech")
    assert "usage: fedspeech" in _run([fedspeech, "--help"], work, _env(venv))
    shown = json.loads(
        _run(
            [fedspeech, "config", "show", "--preset", "fed-smoke", "--format", "json"],
            work,
            _env(venv),
        )
    )
    assert shown["num-partitions"] == {"value": 4, "source": "preset"}  # package-data preset
    assert shown["corpus"]["source"] == "default"  # no checkout: no pyproject layer
    # Execute: the smallest simulation (a shipped preset under the overrides), the demo on the
    # same data, then transcribe one of the corpus's recordings
    smallest = ["--preset", "smoke", "--run-config", SMALLEST]
    flower = ["--engine", "flower"]  # Flower's runtime from the wheel; the demo takes the default
    _run(
        [fedspeech, "simulate", *flower, *smallest, "--run-dir", str(work / "run")],
        work,
        _env(venv),
    )
    # the demo's own model shape: it starts from the shipped model
    tiny_demo = "synthetic-utterances=48 holdout-speakers=1 num-partitions=2 num-server-rounds=1 "
    tiny_demo += "eval-max-utterances=2 tracking-uri=sqlite:///mlflow.db"
    demo = _run(
        [fedspeech, "demo", "--run-config", tiny_demo, "--run-dir", str(work / "demo")],
        work,
        _env(venv),
    )
    model = work / "run" / "model"
    audio = sorted((work / ".fedspeech" / "data").rglob("*.wav"))[0]
    text = _run(
        [fedspeech, "transcribe", "--model", str(model), "--format", "json", str(audio)],
        work,
        _env(venv),
    )
    shipped = _run(
        [fedspeech, "transcribe", "--model", "en-public-small", "--format", "json", str(audio)],
        work,
        _env(venv),
    )
    # Assert: a finished run with a model, and one transcript (tiny model: any text)
    assert (model / "config.json").is_file()
    rows = json.loads(text)
    assert len(rows) == 1 and rows[0]["path"] == str(audio) and "text" in rows[0]
    assert (work / "demo" / "model" / "config.json").is_file() and "WER" in demo.upper()
    # the shipped model is package data: it transcribes with no data and no network
    (row,) = json.loads(shipped)
    assert row["path"] == str(audio) and row["text"].strip()
    assert "started from the shipped public model @en-public-small" in demo
    # the Flower app the simulation packed holds no code: the components came from the wheel
    app = work / "run" / ".flwr" / "app"
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]
