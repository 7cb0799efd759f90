"""``make demo`` / ``fedspeech demo``: the whole product on the built-in synthetic corpus.

Builds the corpus, holds some voices out, partitions the rest by voice into clients, runs a
federated DP simulation (``fedspeech simulate``) that starts from the shipped public model
``@en-public-small`` (trained on real public speech; no client data, no privacy cost), then
transcribes a held-out file with the final model and prints the held-out voices' WER and CER at
round 0 (the shipped model) and after the last round, and epsilon.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fedspeech")

DEMO_PRESET = "demo"


@dataclass(frozen=True)
class DemoResult:
    """What the demo printed."""

    model_dir: Path
    wer: float | None
    cer: float | None
    start_wer: float | None  # round 0: the starting model on the same held-out voices
    start_cer: float | None
    epsilon_max: float | None
    transcript: str
    reference: str
    tracking_run_id: str | None


def run_demo(
    out: Path | None = None,
    *,
    preset: str | None = DEMO_PRESET,
    overrides: str = "",
    engine: str = "auto",
) -> DemoResult:
    """Run the demo; ``out`` is the run folder (default: the preset's ``out-dir``), ``engine``
    the simulation's (``fedspeech.app.simulate.choose_engine``).

    Raises:
        RuntimeError: the simulation did not finish (its log names the cause).
    """
    from fedspeech.app.simulate import simulate
    from fedspeech.config import project_dir, resolve_run_config
    from fedspeech.fed_data import heldout_utterances
    from fedspeech.modeldir import load_model_dir
    from fedspeech.transcribe import Transcriber
    from fedspeech_server.tracking import read_start

    outcome = simulate(preset=preset, overrides=overrides, out=out, engine=engine)
    if not outcome.finished or outcome.model_dir is None:
        flower = outcome.run_dir / ".flwr"  # Flower's runtime: its processes' logs
        where = f"{flower} and the log above" if flower.is_dir() else "the log above"
        raise RuntimeError(
            f"the federated simulation stopped after {outcome.rounds} rounds; see {where}"
        )
    cfg = resolve_run_config(preset, overrides, cwd=project_dir())  # as simulate() resolved it
    utterance = heldout_utterances(cfg, cfg.fed.data_dir)[0]
    (result,) = Transcriber(load_model_dir(outcome.model_dir)).transcribe_files([utterance.path])
    text = result.hypothesis.text if result.hypothesis is not None else f"<{result.error}>"
    last, start = outcome.history[-1], read_start(outcome.run_dir) or {}
    demo = DemoResult(
        model_dir=outcome.model_dir,
        wer=last.get("wer"),
        cer=last.get("cer"),
        start_wer=start.get("wer"),
        start_cer=start.get("cer"),
        epsilon_max=last.get("epsilon_max"),
        transcript=text,
        reference=utterance.transcript,
        tracking_run_id=outcome.tracking_run_id,
    )
    print(
        f"\nheld-out voice {utterance.speaker}, {utterance.path.name}:\n"
        f"  reference:  {demo.reference}\n  recognised: {demo.transcript}\n"
        f"held-out voices, start -> after {outcome.rounds} rounds on "
        f"{cfg.data.num_partitions} clients: WER {_pct(demo.start_wer)} -> {_pct(demo.wer)}, "
        f"CER {_pct(demo.start_cer)} -> {_pct(demo.cer)}; "
        f"epsilon max {_num(demo.epsilon_max)} (delta {cfg.train.delta:g})\n"
        f"{_start(cfg.fed.pretrain_utterances, cfg.fed.init_model)}"
        f"model: {demo.model_dir}\n"
        f"MLflow run {demo.tracking_run_id} in {cfg.fed.tracking_uri} "
        f"(browse: {mlflow_ui_command(cfg.fed.tracking_uri)})"
    )
    return demo


def mlflow_ui_command(tracking_uri: str) -> str:
    """The shell command that browses ``tracking_uri`` with ``mlflow ui``.

    The ``mlflow`` executable beside this Python (a virtualenv's ``bin/``, where the project
    installs it), else the one on ``PATH``, else ``python -m mlflow`` with this Python.
    """
    beside = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    program = beside or shutil.which("mlflow")
    command = [program] if program else [sys.executable, "-m", "mlflow"]
    return shlex.join([*command, "ui", "--backend-store-uri", tracking_uri])


def _start(pretrain_utterances: int, init_model: str) -> str:
    from fedspeech.modeldir import SHIPPED_PREFIX

    if init_model.startswith(SHIPPED_PREFIX):
        return (
            f"round 1 started from the shipped public model {init_model} (real public speech, "
            "no client data: no privacy cost)\n"
        )
    if init_model:
        return f"round 1 started from {init_model}\n"
    if pretrain_utterances:
        return (
            f"round 1 started from a model pre-trained without DP on {pretrain_utterances} public "
            "synthetic utterances (other voices and sentences: no client data, no privacy cost)\n"
        )
    return ""


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
