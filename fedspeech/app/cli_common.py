"""What every ``fedspeech`` command shares: the parser class, renamed flags, common options.

* ``Parser``: every (sub)command parser takes the global flags (``-v``/``-q``, before or after
  the command) and shows each flag's default in its ``--help``.
* ``add_renamed``: a flag under its current name, its old spellings still accepted (hidden from
  ``--help``; using one logs a deprecation warning once logging is set up, ``warn_deprecated``).
* ``add_run_config_options`` and ``add_format_option``: ``--preset``/``--run-config`` and
  ``--format text|json`` with the same meaning on every command.

Nothing heavy is imported here: ``fedspeech --help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("fedspeech")

# Namespace attribute listing the (old, new) flag spellings a command line used.
_DEPRECATED = "deprecated_flags"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after each flag's help, except where there is no default worth showing:
    None, an empty string, an off switch, or a help text that already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if (
            default is None
            or default is False
            or default is argparse.SUPPRESS
            or (isinstance(default, str) and not default)
            or "default" in (action.help or "")
        ):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """A parser that shows defaults in ``--help`` and takes the global flags.

    Subparsers are of the same class (``add_subparsers`` uses ``type(self)``), so every command
    and sub-command accepts ``-v``/``-q`` wherever it stands on the command line: the flags
    default to ``argparse.SUPPRESS``, so a command's parser does not reset a value the parser
    before it already set (read them with ``getattr(args, "verbose", 0)``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        group = self.add_argument_group("global options (before or after the command)")
        group.add_argument(
            "-v",
            "--verbose",
            action="count",
            default=argparse.SUPPRESS,
            help="more log output (DEBUG)",
        )
        group.add_argument(
            "-q",
            "--quiet",
            action="count",
            default=argparse.SUPPRESS,
            help="less log output (warnings and errors only)",
        )


def verbosity(args: argparse.Namespace) -> int:
    """``-v`` count minus ``-q`` count (0: neither given)."""
    return int(getattr(args, "verbose", 0)) - int(getattr(args, "quiet", 0))


class _OldSpelling(argparse.Action):
    """A hidden former name of a flag: stores into the new flag's ``dest`` and notes its use."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        *,
        new: str,
        nargs: int | str | None = None,
        const: Any = None,
        **kwargs: Any,
    ) -> None:
        kwargs.update(default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        super().__init__(option_strings, dest, nargs=nargs, const=const, **kwargs)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        used = [*getattr(namespace, _DEPRECATED, []), (option_string, self.new)]
        setattr(namespace, _DEPRECATED, used)


def add_renamed(
    parser: argparse.ArgumentParser,
    flags: str | Sequence[str],
    old: str | Sequence[str],
    *,
    required: bool = False,
    **kwargs: Any,
) -> argparse.Action:
    """Add the option ``flags`` (``add_argument``'s ``kwargs``) and its former names ``old``.

    The former names take the same value type and choices, are left out of ``--help``, and are
    noted for ``warn_deprecated``; giving two spellings is an error. ``required``: one of the
    spellings must be given (argparse's error then names only the current one).
    """
    names = [flags] if isinstance(flags, str) else list(flags)
    container = parser.add_mutually_exclusive_group(required=required)  # not two spellings
    action: argparse.Action = container.add_argument(*names, **kwargs)
    same: dict[str, Any] = {"type": action.type, "choices": action.choices}  # type None: str
    for flag in [old] if isinstance(old, str) else old:
        container.add_argument(flag, action=_OldSpelling, dest=action.dest, new=names[-1], **same)
    return action


def warn_deprecated(args: argparse.Namespace) -> None:
    """Log one warning per former flag name the command line used."""
    for old, new in getattr(args, _DEPRECATED, []):
        log.warning("%s is deprecated and will be removed: use %s", old, new)


def add_format_option(
    parser: argparse.ArgumentParser,
    *,
    default: str = "text",
    json_flag: bool = False,
) -> None:
    """``--format text|json``: how the command prints its result on stdout.

    ``json_flag``: also accept the former ``--json`` (hidden), meaning ``--format json``.
    """
    parser.add_argument(
        "--format", choices=["text", "json"], default=default, help="output on stdout"
    )
    if json_flag:
        parser.add_argument(
            "--json", action=_OldSpelling, dest="format", new="--format json", nargs=0, const="json"
        )


def add_run_config_options(
    parser: argparse.ArgumentParser,
    *,
    example: str,
    preset_default: str | None = None,
) -> None:
    """``--preset`` and ``--run-config``, the two upper layers of the run configuration."""
    parser.add_argument(
        "--preset",
        default=preset_default,
        help="a preset name (fedspeech/presets/NAME.toml) or a TOML file of run-config keys",
    )
    parser.add_argument(
        "--run-config",
        default="",
        metavar="OVERRIDES",
        help=f'run-config overrides, e.g. "{example}" (every key: fedspeech config show)',
    )
