"""Model directory: ``model.safetensors`` + ``config.json``; what training writes, transcribe reads.

``config.json`` holds everything needed to rebuild the model, its features and its tokenizer, plus
free-form training provenance::

    {"format": "fedspeech-model", "format_version": 1,
     "model": ModelConfig.to_dict(), "features": asdict(FeatureConfig),
     "tokenizer": CharTokenizer.to_dict(), "provenance": {...}}

Loading never unpickles: only JSON and safetensors are parsed (never ``torch.load``), and a
directory is refused with a :class:`ModelDirError` before any tensor is allocated when it holds a
file that looks like a pickle (``*.pt``, ``*.pth``, ``*.bin``, ``*.pkl``, ``*.ckpt``, or pickle /
zip magic bytes), when ``config.json`` is malformed, has unknown or missing fields, wrong types or
dimensions beyond ``LIMITS``, or when the safetensors header's names, shapes or dtypes differ from
the model that ``config.json`` describes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedspeech import __version__
from fedspeech.model import BiGRUCTC, plain_state_dict, unwrap
from fedspeech.model_config import ModelConfig
from fedspeech.modeldir_checks import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    LIMITS,
    MAX_PARAMETERS,
    WEIGHTS_FILE,
    ModelDirError,
    check_config,
    check_directory,
    check_tensor_names,
    expected_shapes,
    read_config_json,
    safetensors_header,
)
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.files import atomic_directory, atomic_write
from fedspeech_features.text import CharTokenizer

__all__ = [
    "LIMITS",
    "MAX_PARAMETERS",
    "LoadedModel",
    "ModelDirError",
    "load_model_dir",
    "save_model_dir",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready for inference and everything needed to feed it and read its output.

    Attributes:
        model: the plain (fused-RNN) model in eval mode.
        model_config: its shape.
        feature_config: the features it was trained on (use these, not the run defaults).
        tokenizer: its output symbols.
        provenance: free-form training record (data, rounds, clients, epsilon, delta, ...).
        path: the directory it was loaded from, if any.
    """

    model: BiGRUCTC
    model_config: ModelConfig
    feature_config: FeatureConfig
    tokenizer: CharTokenizer
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def blank_bias(self) -> float:
        """The greedy decoder's blank bias tuned for this model (``provenance.decoding``; checked
        when loaded), 0 when none was recorded: what ``transcribe``/``evaluate`` use by default."""
        decoding = self.provenance.get("decoding") or {}
        return float(decoding.get("blank_bias", 0.0))


def save_model_dir(
    directory: str | Path,
    model: nn.Module | Mapping[str, Tensor],
    model_config: ModelConfig | None,
    feature_config: FeatureConfig,
    tokenizer: CharTokenizer,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model directory atomically (a temporary sibling directory renamed into place).

    An existing directory is replaced only if it is empty or holds nothing but a model directory's
    two files; anything else is refused rather than deleted.

    Args:
        directory: where to write.
        model: a ``BiGRUCTC`` of either flavour (also Opacus-wrapped), or its plain state dict.
        model_config: the model's shape; ``None`` takes it from ``model`` (a module).
        feature_config: the features the model was trained on.
        tokenizer: the model's output symbols.
        provenance: JSON-serialisable training record. Suggested keys: ``data``, ``rounds``,
            ``clients``, ``epsilon``, ``delta``, ``noise_multiplier``, ``max_grad_norm``.
            ``created`` (UTC, ISO 8601) and ``fedspeech_version`` are added when absent.
            Non-finite numbers (e.g. epsilon = inf without DP) are stored as ``null``: JSON has none.

    Returns:
        The directory.

    Raises:
        ValueError: configs disagree with each other or with the weights, or exceed the limits.
        FileExistsError: ``directory`` exists and holds other files.
    """
    from safetensors.torch import save_file  # lazy: only writers need it at import time

    directory = Path(directory)
    if isinstance(model, nn.Module):
        model_config = model_config or unwrap(model).cfg
        state = plain_state_dict(model)
    elif model_config is None:
        raise ValueError("model_config is required when saving a state dict")
    else:
        state = dict(model)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_config.to_dict(),
        "features": dataclasses.asdict(feature_config),
        "tokenizer": tokenizer.to_dict(),
        "provenance": _provenance(provenance),
    }
    try:
        check_config(config, directory / CONFIG_FILE)  # never write what load would refuse
        expected = expected_shapes(model_config, directory / CONFIG_FILE)
    except ModelDirError as exc:
        raise ValueError(str(exc)) from None
    check_tensor_names(
        {k: tuple(v.shape) for k, v in state.items()}, expected, "state dict", ValueError
    )
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    if directory.exists():
        _check_replaceable(directory)
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        text = json.dumps(config, indent=2, sort_keys=False, allow_nan=False) + "\n"
        atomic_write(tmp / CONFIG_FILE, text)
    log.info("saved model directory %s", directory)
    return directory


def load_model_dir(directory: str | Path) -> LoadedModel:
    """Load a model directory written by :func:`save_model_dir`, checking everything first.

    Raises:
        ModelDirError: the directory is missing, incomplete, holds pickle-like files, or its
            config or weights header is malformed or inconsistent (the message says which).
    """
    from safetensors.torch import load_file

    directory = resolve_model(directory)
    check_directory(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    config = read_config_json(config_path)
    model_cfg, feature_cfg, tokenizer = check_config(config, config_path)
    expected = expected_shapes(model_cfg, config_path)
    check_tensor_names(safetensors_header(weights_path), expected, str(weights_path))
    try:
        state = load_file(str(weights_path))  # parses the header and copies the raw bytes
    except Exception as exc:  # SafetensorError, OSError
        raise ModelDirError(f"{weights_path}: cannot read weights ({exc})") from exc
    state = {k: v.float() for k, v in state.items()}  # float16 (shipped models) -> float32
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelDirError(f"{weights_path}: non-finite (NaN/inf) values in {bad[:5]}")
    model = BiGRUCTC(model_cfg)
    model.load_state_dict(state, strict=True)
    model.eval()
    return LoadedModel(model, model_cfg, feature_cfg, tokenizer, config["provenance"], directory)


SHIPPED_PREFIX = "@"


def shipped_models() -> dict[str, Path]:
    """The models shipped inside the package (``fedspeech/shipped/<name>/``), by name."""
    root = Path(__file__).resolve().parent / "shipped"
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / CONFIG_FILE).is_file()}


def resolve_model(ref: str | Path) -> Path:
    """The model directory ``ref`` names: ``@name`` (or a bare ``name`` that is no path here)
    is a shipped model, anything else a path.

    Raises:
        ModelDirError: ``@name`` of no shipped model (the message lists the shipped ones).
    """
    text = str(ref)
    name = text.removeprefix(SHIPPED_PREFIX)
    shipped = shipped_models()
    if text.startswith(SHIPPED_PREFIX) or (not Path(text).exists() and name in shipped):
        if name not in shipped:
            have = ", ".join(f"@{n}" for n in shipped) or "none"
            raise ModelDirError(f"{text}: no shipped model of that name (shipped: {have})")
        return shipped[name]
    return Path(ref)


def _check_replaceable(directory: Path) -> None:
    if not directory.is_dir():
        raise FileExistsError(f"{directory}: exists and is not a directory")
    others = sorted(
        p.name for p in directory.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE)
    )
    if others:
        raise FileExistsError(f"{directory}: not replacing a directory that holds {others[:5]}")


def _provenance(provenance: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "fedspeech_version": __version__,
        **_finite(dict(provenance or {})),
    }
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"provenance is not JSON-serialisable ({exc})") from None
    return out


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
