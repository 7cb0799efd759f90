"""Public pre-training (``fedspeech.app.pretrain``): a non-private start that clients pay nothing for."""

from __future__ import annotations

from pathlib import Path

import pytest

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
