"""Checks of untrusted model directories: run before anything is allocated, never unpickling.

Each check raises :class:`ModelDirError` naming the file and what is wrong with it; see
``fedspeech.modeldir`` for the format.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from fedspeech.decoding import check_blank_bias
from fedspeech.model import plain_shapes
from fedspeech.model_config import ModelConfig
from fedspeech.strict import StrictError, check_keys, parse_dataclass
from fedspeech_features.errors import FedspeechDataError
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.text import BLANK, CharTokenizer

T = TypeVar("T")

FORMAT = "fedspeech-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Upper bounds on config.json values: far above anything trained here (the default model has
# 3.1M parameters) yet small enough that a hostile config cannot make the loader allocate
# gigabytes or build an absurd feature pipeline.
LIMITS: dict[str, int] = {
    "hidden_size": 8192,
    "frontend_dim": 8192,
    "num_layers": 16,
    "input_dim": 10_000,
    "vocab_size": 1000,
    "sample_rate": 192_000,
    "n_mfcc": 512,
    "n_mels": 512,
    "stack": 32,
    "subsample": 32,
}
WEIGHT_DTYPES = ("F32", "F16")  # safetensors dtype names a model directory may hold
MAX_PARAMETERS = 200_000_000  # 800 MB of float32 weights
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: a config is a few KB, provenance included
_MAX_SAFETENSORS_HEADER = 1 << 20  # 28 tensor entries need ~3 KB
_MAX_ENTRIES = 64  # files looked at in a model directory before giving up
_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}
# Pickle protocol 2+ starts with PROTO (0x80); torch.save writes a zip (PK\x03\x04) holding a pickle.
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


class ModelDirError(FedspeechDataError):
    """A model directory that is missing, malformed or suspicious; the message names the file."""


def check_directory(directory: Path) -> None:
    """The directory exists, has both files, and nothing in it looks like a pickle."""
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise ModelDirError(f"{directory}: model directory {what}")
    seen = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            seen += 1
            if seen > _MAX_ENTRIES:
                raise ModelDirError(f"{directory}: more than {_MAX_ENTRIES} files; not a model dir")
            path = Path(root) / name
            if path.suffix.lower() in _PICKLE_SUFFIXES:
                raise ModelDirError(f"{path}: refusing a directory with a pickle-type file")
            if name != WEIGHTS_FILE and _head(path, 4).startswith(_PICKLE_MAGIC):
                raise ModelDirError(f"{path}: refusing a directory with a pickle/torch.save file")
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if not (directory / n).is_file()]
    if missing:
        present = sorted(p.name for p in directory.iterdir())
        raise ModelDirError(f"{directory}: missing {', '.join(missing)} (found {present})")


def read_config_json(path: Path) -> dict[str, Any]:
    """Parse config.json strictly.

    At most ``MAX_CONFIG_BYTES``, UTF-8, a JSON object, no duplicate keys, no NaN/Infinity.
    """
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ModelDirError(f"{path}: {size} bytes, more than a config ({MAX_CONFIG_BYTES})")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ModelDirError(f"{path}: duplicate keys in a JSON object")
        return dict(pairs)

    def no_constants(name: str) -> Any:
        raise ModelDirError(f"{path}: {name} is not valid JSON")

    try:
        data = json.loads(
            path.read_bytes().decode("utf-8"),
            object_pairs_hook=no_duplicates,
            parse_constant=no_constants,
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelDirError(f"{path}: not a JSON config ({exc})") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: top level must be a JSON object")
    return data


def check_config(
    config: Mapping[str, Any], where: Path
) -> tuple[ModelConfig, FeatureConfig, CharTokenizer]:
    """Validate a parsed config.json; returns the configs it describes."""
    keys = {"format", "format_version", "model", "features", "tokenizer", "provenance"}
    config = _check_keys(config, keys, where, "config")
    if config["format"] != FORMAT or config["format_version"] != FORMAT_VERSION:
        raise ModelDirError(
            f"{where}: format {config['format']!r} version {config['format_version']!r} "
            f"(this fedspeech reads {FORMAT!r} version {FORMAT_VERSION})"
        )
    if not isinstance(config["provenance"], dict):
        raise ModelDirError(f"{where}: provenance must be a JSON object")
    _check_decoding(config["provenance"].get("decoding"), where)
    model = config["model"]
    if isinstance(model, dict) and "adapter_rank" not in model:  # written without adapters
        model = {**model, "adapter_rank": 0}
    model_cfg = _dataclass_from(ModelConfig, model, where, "model")
    feature_cfg = _dataclass_from(FeatureConfig, config["features"], where, "features")
    tok = config["tokenizer"]
    alphabet = _check_keys(tok, {"alphabet"}, where, "tokenizer")["alphabet"]
    if (
        not isinstance(alphabet, list)
        or not 2 <= len(alphabet) <= LIMITS["vocab_size"]
        or not all(isinstance(s, str) and 0 < len(s) <= 16 for s in alphabet)
        or alphabet[0] != BLANK
        or len(set(alphabet)) != len(alphabet)
    ):
        raise ModelDirError(
            f"{where}: tokenizer.alphabet must be 2..{LIMITS['vocab_size']} distinct short "
            f"strings starting with {BLANK!r}"
        )
    if model_cfg.vocab_size != len(alphabet):
        raise ModelDirError(
            f"{where}: model.vocab_size {model_cfg.vocab_size} != {len(alphabet)} tokenizer symbols"
        )
    if model_cfg.input_dim != feature_cfg.frame_dim:
        raise ModelDirError(
            f"{where}: model.input_dim {model_cfg.input_dim} != feature frame width "
            f"{feature_cfg.frame_dim} (n_mfcc x (1 + deltas) x stack)"
        )
    return model_cfg, feature_cfg, CharTokenizer(alphabet)


def _check_decoding(decoding: Any, where: Path) -> None:
    """``provenance.decoding``, if present: an object whose ``blank_bias`` is a valid bias."""
    if decoding is None:
        return
    if not isinstance(decoding, dict) or "blank_bias" not in decoding:
        raise ModelDirError(f"{where}: provenance.decoding must be an object with a blank_bias")
    try:
        check_blank_bias(decoding["blank_bias"])
    except ValueError as exc:
        raise ModelDirError(f"{where}: provenance.decoding: {exc}") from None


def _check_keys(data: Any, expected: set[str], where: Path, section: str) -> Mapping[str, Any]:
    """``data`` as a JSON object with exactly the ``expected`` keys (``fedspeech.strict``)."""
    try:
        return check_keys(data, expected, what=section, required=expected)
    except StrictError as exc:
        raise ModelDirError(f"{where}: {exc}") from None


def _dataclass_from(cls: type[T], data: Any, where: Path, section: str) -> T:
    """Build a config dataclass from JSON: every field given, of its exact type (a JSON ``true``
    is no int, ``3.0`` no int), finite and within ``LIMITS``, all checked before it is built."""

    def untrusted(name: str, value: Any) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ModelDirError(f"{where}: {section}.{name} = {value!r} is not a valid float")
        if name in LIMITS and value > LIMITS[name]:
            raise ModelDirError(
                f"{where}: {section}.{name} = {value} exceeds the limit {LIMITS[name]}"
            )
        if name in ("win_ms", "hop_ms") and not 0 < value <= 1000:
            raise ModelDirError(f"{where}: features.win_ms and hop_ms must be in (0, 1000] ms")

    try:
        return parse_dataclass(cls, data, what=f"{section} config", complete=True, check=untrusted)
    except StrictError as exc:
        if exc.key is not None:  # phrased as before: the value, then what it should be
            raise ModelDirError(
                f"{where}: {section}.{exc.key} = {exc.value!r} is not a valid {exc.expected}"
            ) from None
        raise ModelDirError(f"{where}: {exc}") from None


def expected_shapes(cfg: ModelConfig, where: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the plain model's weights, from a meta-device model (no memory)."""
    shapes = {k: tuple(v) for k, v in plain_shapes(cfg).items()}
    total = sum(math.prod(s) for s in shapes.values())
    if total > MAX_PARAMETERS:
        raise ModelDirError(f"{where}: {total:,} parameters exceed the limit {MAX_PARAMETERS:,}")
    return shapes


def safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (read with ``safe_open``; no tensor is loaded).

    Raises:
        ModelDirError: not a safetensors file, or a tensor that is not float32 or float16
            (shipped models are stored in float16 and widened on load).
    """
    from safetensors import safe_open

    head = _head(path, 9)
    # 8-byte little-endian header length, then the JSON header itself: checked here so that a
    # pickle or zip renamed to model.safetensors gets a plain message.
    if len(head) < 9 or head[8:9] != b"{":
        raise ModelDirError(f"{path}: not a safetensors file")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > _MAX_SAFETENSORS_HEADER or header_len + 8 > path.stat().st_size:
        raise ModelDirError(f"{path}: not a safetensors file (header of {header_len} bytes)")
    shapes = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (a safe_open handle is no dict)
                tensor = fh.get_slice(name)
                if tensor.get_dtype() not in WEIGHT_DTYPES:
                    raise ModelDirError(
                        f"{path}: {name} is {tensor.get_dtype()}, expected F32 (or F16)"
                    )
                shapes[name] = tuple(tensor.get_shape())
    except ModelDirError:
        raise
    except Exception as exc:  # SafetensorError: header JSON, offsets, file size
        raise ModelDirError(f"{path}: corrupt safetensors file ({exc})") from exc
    return shapes


def check_tensor_names(
    found: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    where: str,
    error: type[Exception] = ModelDirError,
) -> None:
    """Raise ``error`` unless ``found`` has exactly the ``expected`` tensor names and shapes."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise error(f"{where}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{k} {found[k]} != {expected[k]}" for k in expected if found[k] != expected[k]]
    if wrong:
        raise error(f"{where}: tensor shapes differ from config.json: {wrong[:3]}")


def _head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as exc:
        raise ModelDirError(f"{path}: cannot read ({exc.strerror})") from None
