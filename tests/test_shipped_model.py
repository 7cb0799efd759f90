"""The public model shipped inside the package (``fedspeech/shipped/``): loadable by name,
through the same safe loader as any model directory, with a card made from its record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fedspeech.app.model_card import CARD_FILE, RECORD_FILE, render_card
from fedspeech.modeldir import ModelDirError, load_model_dir, resolve_model, shipped_models

NAME = "en-public-small"


def test_the_shipped_model_loads_by_name_as_float32() -> None:
    # Execute: both spellings of the name
    path = resolve_model(f"@{NAME}")
    loaded = load_model_dir(f"@{NAME}")
    # Assert: inside the installed package, float16 on disk, float32 in memory, no DP
    assert NAME in shipped_models() and path == shipped_models()[NAME]
    assert resolve_model(NAME) == path  # a bare name that is no path here
    assert path.parent.parent == Path(__file__).resolve().parents[1] / "fedspeech"
    assert (path / "model.safetensors").stat().st_size < 8_000_000  # a few MB
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.provenance["mode"] == "pretrain" and loaded.provenance["dp"] is False


def test_an_unknown_shipped_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ModelDirError, match=f"no shipped model.*@{NAME}"):
        resolve_model("@no-such-model")


def test_the_shipped_weights_go_through_the_header_check_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a copy of the shipped model whose weights header names a tensor that is not there
    copy = shutil.copytree(resolve_model(f"@{NAME}"), tmp_path / NAME)
    config = json.loads((copy / "config.json").read_text())
    config["model"]["num_layers"] += 1
    (copy / "config.json").write_text(json.dumps(config))

    def reads(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were read before the header was checked")

    monkeypatch.setattr("safetensors.torch.load_file", reads)
    # Execute / Assert: refused from the header alone
    with pytest.raises(ModelDirError, match=r"missing|unexpected|shape"):
        load_model_dir(copy)


def test_the_card_is_rendered_from_the_record_the_recipe_wrote() -> None:
    folder = resolve_model(f"@{NAME}")
    record = json.loads((folder / RECORD_FILE).read_text())
    card = (folder / CARD_FILE).read_text()
    # Assert: the card is exactly the rendering of the record: no number typed by hand
    assert card == render_card(record)
    for scores in (record["dev"], record["eval"]):
        for name, s in scores.items():
            assert f"| {name} |" in card and f"{100 * s['cer']:.1f}%" in card
    bias = record["decoding"]["blank_bias"]
    if bias:  # the eval sets decoded with the tuned blank bias are on the card too
        for s in record["eval_blank_bias"].values():
            assert f"{100 * s['cer']:.1f}%" in card
    # ... and the record is the shipped weights' own: the same chosen epoch and bias in both
    loaded = load_model_dir(folder)
    assert loaded.provenance["chosen_epoch"] == record["chosen_epoch"]
    assert loaded.blank_bias == bias
    # AN4 and speechocean762 were never trained on (they are the private tasks' data)
    trained = " ".join(d["manifest"] for d in record["data"]).lower()
    assert "an4" not in trained and "ocean" not in trained
    assert all(src["licence"] for src in record["sources"].values())
