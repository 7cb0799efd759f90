"""The ``fedspeech`` console command: one parser, each command registered by its module.

Heavy modules (torch, corpus builders, flwr/mlflow) are imported inside each command so that
``fedspeech --help`` stays instant. Flag conventions (``fedspeech.app.cli_common``): global
``-v``/``-q`` anywhere, defaults in every ``--help``, ``--format text|json`` for printed
results, and one name per kind of output path (``--run-dir``, ``--model-dir``, ``--manifest``,
``--corpus-dir``, ``--partitions-dir``, ``--output``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedspeech.app.cli_common import (
    Parser,
    add_renamed,
    add_run_config_options,
    verbosity,
    warn_deprecated,
)
from fedspeech.logs import setup_logging

log = logging.getLogger("fedspeech")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    setup_logging(verbosity(args))
    warn_deprecated(args)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
    except Exception as exc:  # the CLI's last line of defence: a clear message, not a traceback
        from fedspeech.config import ConfigError
        from fedspeech.devices import DeviceError
        from fedspeech_features.errors import FedspeechDataError
        from fedspeech_server.checkpoint import CheckpointError

        usage = FedspeechDataError | ConfigError | DeviceError | FileNotFoundError | CheckpointError
        if isinstance(exc, usage):
            log.error("%s", exc)
            return 2
        raise


def _build_parser() -> argparse.ArgumentParser:
    from fedspeech.app import (
        cli_audit,
        cli_config,
        cli_data,
        cli_infer,
        cli_pretrain,
        cli_train,
        simulate,
    )

    parser = Parser(
        prog="fedspeech",
        description="Privacy-preserving federated speech recognition.",
        epilog="Every command has --help, with the defaults. -v/-q may stand before or after "
        "the command. Run configuration keys (for --run-config): fedspeech config show.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    cli_data.register(sub)
    cli_infer.register(sub)
    cli_train.register(sub)
    cli_pretrain.register(sub)
    simulate.register(sub)
    cli_audit.register(sub)
    cli_config.register(sub)

    demo = sub.add_parser("demo", help="the whole pipeline on the built-in synthetic corpus")
    add_renamed(
        demo,
        "--run-dir",
        "--out",
        type=Path,
        metavar="DIR",
        help="run folder (default: the preset's out-dir)",
    )
    add_run_config_options(demo, example="num-server-rounds=2", preset_default="demo")
    simulate.add_engine_option(demo)
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedspeech")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown"


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedspeech.app.demo import run_demo

    try:
        run_demo(args.run_dir, preset=args.preset, overrides=args.run_config, engine=args.engine)
    except RuntimeError as exc:  # the simulation stopped early: its cause is logged above
        log.error("demo: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
