"""Strict mapping -> frozen dataclass parsing: the one parser of every config fedspeech reads.

Run configs (flat TOML / Flower tables, ``fedspeech.config``), node configs
(``fedspeech_client.node_state``) and a model directory's ``config.json``
(``fedspeech.modeldir_checks``) are all parsed here, so they agree on what a value of each field
type may be. Strict because a silent fallback is a bug that surfaces far from its cause: a
mistyped ``epsilon-bugdet`` must not drop a node's privacy budget, and ``n-mfcc = "13"`` must not
build a feature pipeline from a string. So every key must name a field, and every value must have
the field's type:

* ``bool``, ``int``, ``str``: exactly that type (a bool is no int, a float no int);
* ``float``: an int or a float (widened to float), never a bool;
* ``Literal[...]``: one of the listed values;
* ``A | B``: the first member that accepts the value. ``X | None``: ``None``, or ``""`` when
  ``X`` is not ``str``, is unset: TOML and Flower configs have no null, so ``""`` says "none".

A value that does not fit raises :class:`StrictError`, whose message names the key and whose
attributes let a caller phrase it in its own terms (e.g. an untrusted file's path first).

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Knobs:
...     rate: float = 1.0
...     name: str = "a"
>>> parse_dataclass(Knobs, {"rate": 2}, what="knobs")
Knobs(rate=2.0, name='a')
>>> try:
...     parse_dataclass(Knobs, {"rate": "2"}, what="knobs")
... except StrictError as exc:
...     print(exc)
rate must be float, got '2' (str)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")

FieldCheck = Callable[[str, Any], None]
"""Called as ``check(field_name, value)`` for every given value once its type is checked, before
the dataclass is built: extra rules of one caller (size limits of an untrusted file)."""


class StrictError(ValueError):
    """A mapping that does not fit its dataclass; the message names the key(s).

    Attributes:
        key: the key whose value has the wrong type (None: a key or build problem).
        value: that value.
        expected: what the value should have been, in words (``"int"``, ``"one of ['a', 'b']"``).
        unknown: keys that name no field.
        missing: required keys that are absent.
        known: every key the mapping may have.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        value: Any = None,
        expected: str = "",
        unknown: Sequence[str] = (),
        missing: Sequence[str] = (),
        known: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.key = key
        self.value = value
        self.expected = expected
        self.unknown = list(unknown)
        self.missing = list(missing)
        self.known = list(known)


def kebab(name: str) -> str:
    """A field name as a kebab-case config key: ``num_layers`` -> ``num-layers``."""
    return name.replace("_", "-")


def _same(name: str) -> str:
    return name


def field_keys(cls: type[Any], key: Callable[[str], str] = _same) -> list[str]:
    """The keys of a dataclass's fields as a mapping spells them (``key`` maps a field name)."""
    return [key(f.name) for f in dataclasses.fields(cls)]


def check_keys(
    data: object, known: Collection[str], *, what: str, required: Collection[str] = ()
) -> Mapping[str, Any]:
    """``data`` as a mapping, after checking that its keys are among ``known``.

    Args:
        data: the parsed input (a JSON object, a TOML table, a Flower config).
        known: the keys it may have.
        what: what ``data`` is, for the messages (``"run-config"``, ``"model config"``).
        required: the keys it must have. When every known key is required (a saved file, which
            names every field) any mismatch lists both the missing and the unknown keys.

    Raises:
        StrictError: ``data`` is no mapping, has a key not in ``known``, or lacks a required one.
    """
    if not isinstance(data, Mapping):
        raise StrictError(f"{what} must be a JSON object or table, got {type(data).__name__}")
    unknown = sorted(set(data) - set(known))
    missing = sorted(set(required) - set(data))
    names = sorted(known)
    if missing or (unknown and set(known) <= set(required)):
        raise StrictError(
            f"{what} has missing keys {missing}, unknown {unknown}",
            unknown=unknown,
            missing=missing,
            known=names,
        )
    if unknown:
        raise StrictError(
            f"unknown {what} keys {unknown}; known keys: {', '.join(names)}",
            unknown=unknown,
            known=names,
        )
    return data


def parse_dataclass(
    cls: type[T],
    data: object,
    *,
    what: str,
    key: Callable[[str], str] = _same,
    complete: bool = False,
    ignore_unknown: bool = False,
    check: FieldCheck | None = None,
) -> T:
    """Build the frozen dataclass ``cls`` from ``data``, checking every key and value first.

    Args:
        cls: the dataclass.
        data: the mapping to read (see :func:`check_keys`).
        what: what ``data`` is, for the messages (``"model config"``); the dataclass's own
            refusals read ``invalid <what>: ...``.
        key: a field name -> its key in ``data`` (:func:`kebab` for run and node configs).
        complete: every field must be given (a saved file); else absent fields keep their
            defaults, and only fields without a default are required.
        ignore_unknown: leave keys that name no field to the caller (a flat table that several
            dataclasses share: the caller checks the whole with :func:`check_keys`).
        check: extra per-field rules (:data:`FieldCheck`).

    Raises:
        StrictError: a key or value that does not fit (module docstring), or the dataclass
            refusing the values (its ``__post_init__``: ``invalid <what>: <its message>``).
    """
    fields = {key(f.name): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    required = [
        k
        for k, f in fields.items()
        if complete
        or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    ]
    if ignore_unknown and isinstance(data, Mapping):
        data = {k: v for k, v in data.items() if k in fields}
    given = check_keys(data, fields, what=what, required=required)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in given:
            values[f.name] = _coerce(name, given[name], hints[f.name])
            if check is not None:
                check(f.name, values[f.name])
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise StrictError(f"invalid {what}: {exc}") from exc


_MISMATCH = object()  # _convert's "this value does not fit"


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` as a field of type ``annotation`` wants it (ints widened to float).

    Raises:
        StrictError: the value does not fit (``key`` names it in the message).
    """
    converted = _convert(value, annotation)
    if converted is _MISMATCH:
        expected = describe(annotation)
        raise StrictError(
            f"{key} must be {expected}, got {value!r} ({type(value).__name__})",
            key=key,
            value=value,
            expected=expected,
        )
    return converted


def _convert(value: Any, annotation: Any) -> Any:
    """``value`` fitted to ``annotation``, or ``_MISMATCH`` (rules: module docstring)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return value if value in get_args(annotation) else _MISMATCH
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        if type(None) in options and (value is None or (value == "" and str not in options)):
            return None
        for option in options:
            if option is not type(None):
                converted = _convert(value, option)
                if converted is not _MISMATCH:
                    return converted
        return _MISMATCH
    if annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok else _MISMATCH
    if annotation is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if annotation in (bool, str):
        return value if isinstance(value, annotation) else _MISMATCH
    raise TypeError(f"strict parsing knows no field type {annotation!r}")


def describe(annotation: Any) -> str:
    """A field type in words, for messages: ``int``, ``float or "" (unset)``, ``one of [...]``."""
    origin = get_origin(annotation)
    if origin is Literal:
        return f"one of {list(get_args(annotation))}"
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        words = " or ".join(describe(a) for a in options if a is not type(None))
        return f'{words} or "" (unset)' if type(None) in options and str not in options else words
    return str(getattr(annotation, "__name__", annotation))
