"""Centralized training (``fedspeech_client.central.train_central``): starting from a pre-trained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedspeech.config import ConfigError, resolve_run_config
from fedspeech.modeldir import load_model_dir
from fedspeech_client.central import train_central
from fedspeech_features.manifest import read_manifest, write_manifest

BASE = "dp=false epochs=1 hidden-size=16 num-layers=1 batch-size=8 seed=0"


@pytest.fixture(scope="module")
def manifest(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = read_manifest(shared_data / "fsdd" / "manifest.tsv")[:24]
    path = tmp_path_factory.mktemp("central") / "train.tsv"
    write_manifest(path, rows)
    return path


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_dir(model_dir).model.state_dict()


def test_init_model_is_where_training_starts(manifest: Path, tmp_path: Path) -> None:
    # Prepare: a "pre-trained" model, trained with another seed
    pre = train_central(manifest, resolve_run_config(None, BASE + " seed=7"), tmp_path / "pre")

    # Execute: a near-zero learning rate from it, and the same from fresh weights
    tiny = BASE + " lr=1e-9"
    tuned = train_central(
        manifest, resolve_run_config(None, f"{tiny} init-model={pre.model_dir}"), tmp_path / "ft"
    )
    fresh = train_central(manifest, resolve_run_config(None, tiny), tmp_path / "fresh")

    # Assert: the fine-tuned weights are the pre-trained ones (moved by ~lr), not a fresh init
    start, after, scratch = (_weights(p) for p in (pre.model_dir, tuned.model_dir, fresh.model_dir))
    for name, value in start.items():
        assert torch.allclose(after[name], value, atol=1e-6), name
    assert any(not torch.allclose(scratch[n], v, atol=1e-3) for n, v in start.items())
    provenance = load_model_dir(tuned.model_dir).provenance
    assert provenance["init_model"] == str(pre.model_dir)


def test_init_model_of_another_shape_is_refused(manifest: Path, tmp_path: Path) -> None:
    pre = train_central(manifest, resolve_run_config(None, BASE), tmp_path / "pre")
    cfg = resolve_run_config(None, f"{BASE} hidden-size=24 init-model={pre.model_dir}")
    with pytest.raises(ConfigError, match="init-model"):
        train_central(manifest, cfg, tmp_path / "ft")
