"""Model directory: round trip, atomic replacement, and every hostile input refused unpickled."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedspeech.model import BiGRUCTC, with_fresh_adapters
from fedspeech.model_config import ModelConfig
from fedspeech.modeldir import ModelDirError, load_model_dir, save_model_dir
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.text import CharTokenizer

FEATURES = FeatureConfig()


def tiny_model(seed: int = 0, *, dp: bool = False) -> BiGRUCTC:
    """An untrained 1-layer BiGRU-8 for the default features (outputs are junk, shapes real)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(input_dim=FEATURES.frame_dim, vocab_size=29, hidden_size=8, num_layers=1)
    return BiGRUCTC(cfg, dp=dp).eval()


def make_model_dir(path: Path, **provenance: Any) -> Path:
    """Save an untrained tiny model as a model directory (shared with test_transcribe)."""
    return save_model_dir(path, tiny_model(), None, FEATURES, CharTokenizer(), provenance)


class _Boom:
    """Unpickling this creates ``marker``: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "model", epsilon=3.5, rounds=2)


def test_round_trip_gives_identical_outputs(model_dir: Path) -> None:
    # Prepare
    feats, lengths = torch.randn(2, 40, FEATURES.frame_dim), torch.tensor([40, 23])

    # Execute
    loaded = load_model_dir(model_dir)

    # Assert: same weights, same outputs, configs and provenance carried
    assert not loaded.model.training and not loaded.model.dp
    assert torch.equal(loaded.model(feats, lengths), tiny_model()(feats, lengths))
    assert loaded.feature_config == FEATURES and loaded.model_config == tiny_model().cfg
    assert loaded.tokenizer.alphabet == CharTokenizer().alphabet
    assert loaded.provenance["epsilon"] == 3.5 and loaded.provenance["rounds"] == 2
    assert loaded.provenance["fedspeech_version"] and loaded.provenance["created"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_a_tuned_blank_bias_travels_with_the_model(model_dir: Path, tmp_path: Path) -> None:
    loaded = load_model_dir(model_dir)
    assert loaded.blank_bias == 0.0  # none recorded: plain greedy decoding
    # Execute: save it again with a tuned decoding in its provenance
    provenance = {**loaded.provenance, "decoding": {"blank_bias": 1.25, "tuned_on": "dev"}}
    again = save_model_dir(
        tmp_path / "tuned",
        loaded.model,
        None,
        loaded.feature_config,
        loaded.tokenizer,
        provenance,
    )
    # Assert
    assert load_model_dir(again).blank_bias == 1.25


def test_dp_model_loads_as_plain_model_with_same_outputs(tmp_path: Path) -> None:
    dp = tiny_model(seed=3, dp=True)
    save_model_dir(tmp_path / "m", dp, None, FEATURES, CharTokenizer(), {"epsilon": 8.0})
    feats, lengths = torch.randn(2, 30, FEATURES.frame_dim), torch.tensor([30, 12])

    loaded = load_model_dir(tmp_path / "m")

    assert not loaded.model.dp
    torch.testing.assert_close(loaded.model(feats, lengths), dp(feats, lengths))


def test_a_model_with_adapters_round_trips_and_config_names_its_rank_only_then(
    model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: the tiny model with rank-2 adapters whose B moved (a checkpoint of an adapter run)
    cfg = dataclasses.replace(tiny_model().cfg, adapter_rank=2)
    adapted = BiGRUCTC(cfg, dp=True).eval()
    adapted.load_state_dict(with_fresh_adapters(tiny_model().state_dict(), cfg))
    with torch.no_grad():
        for p in adapted.parameters():
            if p.shape[-1] == 2:  # the B factors
                p.normal_()
    feats, lengths = torch.randn(2, 30, FEATURES.frame_dim), torch.tensor([30, 12])
    # Execute
    save_model_dir(tmp_path / "m", adapted, None, FEATURES, CharTokenizer())
    loaded = load_model_dir(tmp_path / "m")
    # Assert: same outputs from the plain flavour; the rank is in config.json, absent without
    assert loaded.model_config.adapter_rank == 2
    torch.testing.assert_close(loaded.model(feats, lengths), adapted(feats, lengths))
    assert not torch.allclose(loaded.model(feats, lengths), tiny_model()(feats, lengths))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"]["adapter_rank"] == 2
    assert "adapter_rank" not in json.loads((model_dir / "config.json").read_text())["model"]


def test_save_replaces_a_model_dir_but_nothing_else(model_dir: Path, tmp_path: Path) -> None:
    # a state dict needs its config; non-finite provenance numbers become null
    state = tiny_model(seed=1).state_dict()
    with pytest.raises(ValueError, match="model_config is required"):
        save_model_dir(model_dir, state, None, FEATURES, CharTokenizer())
    save_model_dir(
        model_dir, state, tiny_model().cfg, FEATURES, CharTokenizer(), {"epsilon": float("inf")}
    )
    loaded = load_model_dir(model_dir)
    assert torch.equal(loaded.model.head.weight, state["head.weight"])
    assert loaded.provenance["epsilon"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left behind

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        make_model_dir(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_save_refuses_inconsistent_configs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size 29 != 5 tokenizer symbols"):
        save_model_dir(
            tmp_path / "m", tiny_model(), None, FEATURES, CharTokenizer(["<blank>", *"abcd"])
        )
    with pytest.raises(ValueError, match="input_dim 120 != feature frame width 40"):
        save_model_dir(tmp_path / "m", tiny_model(), None, FeatureConfig(stack=1), CharTokenizer())
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------- hostile directories
def _edit_config(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        change(config)
        (d / "config.json").write_text(json.dumps(config))

    return tamper


def _set(section: str, key: str, value: Any) -> Callable[[Path], None]:
    def change(c: dict[str, Any]) -> None:
        c[section][key] = value

    return _edit_config(change)


def _edit_weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        tensors = load_file(str(d / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(d / "model.safetensors"))

    return tamper


HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "config missing": (lambda d: (d / "config.json").unlink(), "missing config.json"),
    "weights missing": (lambda d: (d / "model.safetensors").unlink(), "missing model.safetensors"),
    "config not json": (lambda d: (d / "config.json").write_text("{nope"), "not a JSON config"),
    "config a list": (lambda d: (d / "config.json").write_text("[]"), "must be a JSON object"),
    "config binary": (lambda d: (d / "config.json").write_bytes(b"\xff\xfe"), "not a JSON"),
    "config NaN": (
        lambda d: (d / "config.json").write_text('{"format": NaN}'),
        "NaN is not valid JSON",
    ),
    "duplicate keys": (
        lambda d: (d / "config.json").write_text('{"format": 1, "format": 2}'),
        "duplicate keys",
    ),
    "config too big": (
        lambda d: (d / "config.json").write_text(" " * (2 << 20) + "{}"),
        "more than a config",
    ),
    "unknown top key": (_edit_config(lambda c: c.update(extra=1)), r"unknown \['extra'\]"),
    "unknown model key": (_set("model", "attention", True), r"unknown \['attention'\]"),
    "missing model key": (_edit_config(lambda c: c["model"].pop("cell")), r"missing keys \['cell'"),
    "wrong type": (_set("model", "hidden_size", "8"), "hidden_size = '8' is not a valid"),
    "bool for int": (_set("model", "num_layers", True), "num_layers = True is not a valid"),
    "float for int": (_set("features", "stack", 3.0), "stack = 3.0 is not a valid"),
    "bad cell": (_set("model", "cell", "transformer"), "cell = 'transformer'"),
    "huge hidden": (_set("model", "hidden_size", 100_000), "exceeds the limit 8192"),
    "many layers": (_set("model", "num_layers", 1000), "exceeds the limit 16"),
    "huge vocab": (_set("model", "vocab_size", 50_000), "exceeds the limit 1000"),
    "too many params": (
        _edit_config(lambda c: c["model"].update(hidden_size=8192, num_layers=16)),
        "parameters exceed the limit",
    ),
    "vocab mismatch": (_set("model", "vocab_size", 30), "vocab_size 30 != 29"),
    "bad alphabet": (_set("tokenizer", "alphabet", ["a", "b"]), "must be 2..1000 distinct"),
    "newer format": (_edit_config(lambda c: c.update(format_version=2)), "version 2"),
    "provenance list": (_edit_config(lambda c: c.update(provenance=[])), "provenance must be"),
    "decoding without bias": (_set("provenance", "decoding", {}), "with a blank_bias"),
    "huge blank bias": (
        _set("provenance", "decoding", {"blank_bias": 1e9}),
        "provenance.decoding: blank bias must be a number",
    ),
    "shape mismatch": (_set("model", "hidden_size", 16), "shapes differ from config.json"),
    "missing tensor": (_edit_weights(lambda t: t.pop("head.bias")), r"missing \['head.bias'\]"),
    "extra tensor": (
        _edit_weights(lambda t: t.update(extra=torch.zeros(1))),
        r"unexpected \['extra'\]",
    ),
    "float64 weights": (
        _edit_weights(lambda t: t.update({"head.bias": t["head.bias"].double()})),
        "head.bias is F64, expected F32",
    ),
    "NaN weights": (
        _edit_weights(lambda t: t["head.bias"].fill_(float("nan"))),
        r"non-finite \(NaN/inf\) values in \['head.bias'\]",
    ),
    "truncated weights": (
        lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:-100]
        ),
        "corrupt safetensors file",
    ),
    "empty weights": (lambda d: (d / "model.safetensors").write_bytes(b""), "not a safetensors"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_model_dir_is_refused(model_dir: Path, case: str) -> None:
    tamper, message = HOSTILE[case]
    tamper(model_dir)
    with pytest.raises(ModelDirError, match=message):
        load_model_dir(model_dir)


def test_missing_or_non_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="does not exist"):
        load_model_dir(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelDirError, match="is not a directory"):
        load_model_dir(tmp_path / "file")


def test_marker_payload_really_fires_when_unpickled(tmp_path: Path) -> None:
    # the control for the tests below: this payload does run code when unpickled
    pickle.loads(pickle.dumps(_Boom(tmp_path / "marker")))
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize(
    "name", ["model.pt", "extra.bin", "sub/weights.ckpt", "innocent.txt", "model.safetensors"]
)
def test_pickles_are_refused_and_never_unpickled(
    model_dir: Path, tmp_path: Path, name: str
) -> None:
    # Prepare: a pickle whose unpickling would create a marker file, planted in the directory
    marker = tmp_path / "unpickled"
    target = model_dir / name
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(pickle.dumps(_Boom(marker), protocol=4))

    # Execute + Assert
    with pytest.raises(ModelDirError, match=r"pickle|not a safetensors file"):
        load_model_dir(model_dir)
    assert not marker.exists()


def test_torch_save_archive_is_refused(model_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    torch.save({"x": _Boom(marker)}, model_dir / "model.safetensors")  # zip with a pickle inside
    with pytest.raises(ModelDirError, match="not a safetensors file"):
        load_model_dir(model_dir)
    torch.save({"x": _Boom(marker)}, model_dir / "checkpoint")  # no telling suffix: magic bytes
    with pytest.raises(ModelDirError, match=r"pickle/torch\.save file"):
        load_model_dir(model_dir)
    assert not marker.exists()


def test_absurd_config_is_refused_before_allocating(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 16 layers of BiGRU-8192 would be 19 billion parameters (76 GB): refused without building it
    # (nor reading its weights). How quickly: benchmarks/fast_paths.py.
    def allocates(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built or its weights read before the refusal")

    _edit_config(lambda c: c["model"].update(hidden_size=8192, num_layers=16))(model_dir)
    monkeypatch.setattr("fedspeech.modeldir.BiGRUCTC", allocates)
    monkeypatch.setattr("safetensors.torch.load_file", allocates)
    with pytest.raises(ModelDirError, match="parameters exceed"):
        load_model_dir(model_dir)
