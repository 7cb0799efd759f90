"""The ``fedspeech`` console command: data preparation, features, demo (training commands follow).

Heavy modules (torch, corpus builders, later flwr/mlflow) are imported inside each command so that
``fedspeech --help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedspeech.logs import setup_logging

log = logging.getLogger("fedspeech")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as exc:  # the CLI's last line of defence: a clear message, not a traceback
        from fedspeech.config import ConfigError
        from fedspeech_features.errors import FedspeechDataError
        from fedspeech_server.checkpoint import CheckpointError

        if isinstance(exc, FedspeechDataError | ConfigError | FileNotFoundError | CheckpointError):
            log.error("%s", exc)
            return 2
        raise


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedspeech", description="Privacy-preserving federated speech recognition."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    from fedspeech.app import cli_audit, cli_data, cli_infer, cli_train, simulate

    cli_data.register(sub)
    cli_infer.register(sub)
    cli_train.register(sub)
    simulate.register(sub)
    cli_audit.register(sub)

    demo = sub.add_parser("demo", help="the whole pipeline on the built-in synthetic corpus")
    demo.add_argument("--out", type=Path, help="run folder (default: the preset's out-dir)")
    demo.add_argument("--preset", default="demo", help="experiments/NAME.toml or a TOML file")
    demo.add_argument("--run-config", default="", help='overrides, e.g. "num-server-rounds=2"')
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedspeech.app.demo import run_demo

    try:
        run_demo(args.out, preset=args.preset, overrides=args.run_config)
    except RuntimeError as exc:  # the simulation stopped early: its cause is logged above
        log.error("demo: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
