"""Public pre-training (``fedspeech.app.pretrain``): a non-private start that clients pay nothing for."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from fedspeech.app.pretrain import public_pretrained_model
from fedspeech.config import ConfigError, resolve_run_config
from fedspeech.fed_data import corpus_manifest
from fedspeech.modeldir import load_model_dir
from fedspeech_features.manifest import read_manifest

TINY = (
    "synthetic-utterances=24 pretrain-utterances=24 pretrain-epochs=1 hidden-size=16 "
    "num-layers=1 batch-size=8 target-epsilon=3"
)


def test_pretrained_model_is_trained_once_without_dp_on_other_sentences(tmp_path: Path) -> None:
    cfg = resolve_run_config(None, TINY, cwd=tmp_path)

    # Execute: twice (the second finds the first's model)
    first = public_pretrained_model(cfg, tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = public_pretrained_model(cfg, tmp_path)

    # Assert: non-private, 24 utterances, reused, and not the clients' corpus
    provenance = load_model_dir(first).provenance
    assert provenance["dp"] is False and provenance["epsilon"] is None
    assert provenance["utterances"] == 24 and provenance["epochs"] == 1
    assert second == first and (second / "model.safetensors").stat().st_mtime_ns == stamp
    public = {r.transcript for r in read_manifest(provenance["data"])}
    private = {r.transcript for r in read_manifest(corpus_manifest(cfg, tmp_path))}
    assert Path(provenance["data"]).parent != corpus_manifest(cfg, tmp_path).parent
    assert public != private

    # A different model shape is a different pre-trained model
    wider = resolve_run_config(None, TINY + " hidden-size=24", cwd=tmp_path)
    assert public_pretrained_model(wider, tmp_path) != first


def test_pretraining_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pretrain"):
        resolve_run_config(None, "pretrain-epochs=0", cwd=tmp_path)
    with pytest.raises(ConfigError, match="pretrain-utterances must be >= 1"):
        public_pretrained_model(resolve_run_config(None, "", cwd=tmp_path), tmp_path)


PRETRAIN = (
    "n-mfcc=13 n-mels=40 hidden-size=16 num-layers=1 batch-size=8 spec-augment=true"
    " tempo-augment=0.5"
)


@pytest.fixture(scope="module")
def public_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small public manifest: 24 synthetic utterances (built once)."""
    from fedspeech_features.corpora.synthetic import build_synthetic_corpus

    manifest, _ = build_synthetic_corpus(
        tmp_path_factory.mktemp("public") / "corpus", num_utterances=24, seed=5
    )
    return manifest


def _weights(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_pretrain_resumed_after_an_interruption_equals_the_uninterrupted_run(
    public_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedspeech.app import pretrain as module
    from fedspeech_client import epochs as epochs_module

    cfg = resolve_run_config(None, PRETRAIN + " dp=false", cwd=tmp_path)
    dev = {"public": public_manifest}
    # Execute: 3 epochs at once; 3 epochs interrupted (Ctrl-C) after the 2nd checkpoint, resumed
    whole = module.pretrain([public_manifest], dev, cfg, tmp_path / "whole", epochs=3)
    saved = epochs_module.save_epoch_state

    def save_then_stop(folder: Path, state: epochs_module.EpochState) -> Path:
        out = saved(folder, state)
        if state.epochs_done == 2:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(epochs_module, "save_epoch_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        module.pretrain([public_manifest], dev, cfg, tmp_path / "split", epochs=3)
    monkeypatch.setattr(epochs_module, "save_epoch_state", saved)
    with pytest.raises(ConfigError, match="--resume"):  # a fresh start would lose the epochs
        module.pretrain([public_manifest], dev, cfg, tmp_path / "split", epochs=3)
    resumed = module.pretrain(
        [public_manifest], dev, cfg, tmp_path / "split", epochs=3, resume=True
    )
    # Assert: the same weights to the bit, the same per-epoch losses and dev scores
    a, b = _weights(whole.model_dir), _weights(resumed.model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["loss"] for e in whole.record["epochs"]] == [
        e["loss"] for e in resumed.record["epochs"]
    ]
    assert (
        whole.record["dev"] == resumed.record["dev"] and whole.record["dev"]["public"]["cer"] >= 0
    )
    lrs = [e["lr"] for e in whole.record["epochs"]]
    assert lrs[0] < lrs[1] > lrs[2]  # warm-up, then the cosine
    # ... and the record the model card is made of names the data
    (data,) = whole.record["data"]
    assert data["utterances"] == 24 and data["hours"] > 0
    assert load_model_dir(whole.model_dir).provenance["mode"] == "pretrain"


@pytest.mark.slow  # two 8-epoch pre-trainings in subprocesses: ~20-25 s
def test_pretrain_cli_stopped_by_sigterm_resumes_to_the_same_model(
    public_manifest: Path, tmp_path: Path
) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    fedspeech = str(Path(sys.executable).parent / "fedspeech")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(run_dir: Path, *extra: str) -> list[str]:
        return [
            fedspeech, "pretrain", "--train", str(public_manifest), "--dev",
            f"public={public_manifest}", "--run-dir", str(run_dir), "--epochs", "8",
            "--run-config", PRETRAIN, *extra,
        ]  # fmt: skip

    # Execute: an uninterrupted run; a run stopped by SIGTERM after its first checkpoint
    subprocess.run(command(tmp_path / "whole"), env=env, check=True, capture_output=True)
    state = tmp_path / "split" / "checkpoint" / "state.json"
    proc = subprocess.Popen(command(tmp_path / "split"), env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    done = json.loads(state.read_text())["epochs_done"]
    resumed = subprocess.run(
        command(tmp_path / "split", "--resume"), env=env, capture_output=True, text=True
    )
    # Assert: stopped cleanly part-way with a hint, resumed to the same weights (to the bit)
    assert proc.returncode == 130 and "--resume" in stderr and 1 <= done < 8
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "whole" / "model"), _weights(tmp_path / "split" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_with_speed_perturbation_keeps_the_best_dev_epoch_and_exports_a_card(
    public_manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    from fedspeech.app.model_card import CARD_FILE, RECORD_FILE, export_model, render_card
    from fedspeech.app.pretrain import BLANK_BIAS_GRID, pretrain
    from fedspeech_features.cache import default_cache_root

    cfg = resolve_run_config(None, PRETRAIN + " dp=false lr=0.02", cwd=tmp_path)
    caplog.set_level(logging.INFO)
    # Execute: 3 epochs with two speed-perturbed copies, a dev set and an eval set
    result = pretrain(
        [public_manifest],
        {"public": public_manifest},
        cfg,
        tmp_path / "run",
        epochs=3,
        speeds=(0.9, 1.1),
        eval_manifests={"heldout": public_manifest},
        command="fedspeech pretrain ...",
    )
    # Assert: the perturbed features were made (and cached apart), the model is the best dev epoch
    record = result.record
    # every epoch reports its progress in batches as it goes
    steps = record["epochs"][0]["steps"]
    shown = [m for m in caplog.messages if m.startswith("epoch 1/3: batch ")]
    counts = [m.split()[3].rstrip(",").split("/") for m in shown]  # "batch k/N," -> [k, N]
    assert shown and all(total == str(steps) for _, total in counts)
    done = [int(k) for k, _ in counts]
    assert done == sorted(done) and done[-1] < steps
    assert record["settings"]["speeds"] == [0.9, 1.1]
    for factor in ("0.9", "1.1"):
        assert any((default_cache_root(public_manifest) / f"speed-{factor}").rglob("*.safetensors"))
    cers = [e["dev"]["public"]["cer"] for e in record["epochs"]]
    assert record["chosen_epoch"] == cers.index(min(cers)) + 1
    assert record["dev"]["public"]["cer"] == min(cers)
    # the eval set is scored once, on the chosen weights (the same utterances: the same CER)
    assert record["eval"]["heldout"]["cer"] == pytest.approx(min(cers))
    assert all(e["seconds"] > 0 for e in record["epochs"]) and record["machine"]
    # the greedy decoder's blank bias: the grid value with the lowest CER on the first dev set
    decoding, by_bias = record["decoding"], record["decoding"]["dev_by_bias"]
    assert decoding["tuned_on"] == "public" and list(by_bias) == [f"{b:g}" for b in BLANK_BIAS_GRID]
    assert by_bias[f"{decoding['blank_bias']:g}"]["cer"] == min(v["cer"] for v in by_bias.values())
    assert by_bias["0"]["cer"] == pytest.approx(record["dev"]["public"]["cer"])
    assert record["eval_blank_bias"]["heldout"]["cer"] == pytest.approx(
        by_bias[f"{decoding['blank_bias']:g}"]["cer"]
    )  # the eval set decoded with the tuned bias (here the same utterances as dev)
    assert load_model_dir(result.model_dir).blank_bias == decoding["blank_bias"]

    # Export: float16 on disk, float32 loaded, a card rendered from the record
    with pytest.raises(ValueError, match="licence"):
        export_model(tmp_path / "run", tmp_path / "shipped", name="tiny", sources={})
    stem = public_manifest.stem
    out = export_model(
        tmp_path / "run",
        tmp_path / "shipped",
        name="tiny",
        sources={stem: {"licence": "CC0 1.0", "source": "synthetic"}},
        recipe="python experiments/public_model.py",
    )
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}  # noqa: SIM118
    shipped, trained = load_model_dir(out), _weights(result.model_dir)
    for name, tensor in shipped.model.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.allclose(tensor, trained[name], atol=1e-3, rtol=1e-3)
    exported = json.loads((out / RECORD_FILE).read_text())
    card = (out / CARD_FILE).read_text()
    assert card == render_card(exported) and "CC0 1.0" in card
    assert f"{100 * exported['eval']['heldout']['cer']:.1f}%" in card
    assert f"epoch {record['chosen_epoch']}" in card
