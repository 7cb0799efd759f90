"""``fedspeech pretrain``: a public starting model from public manifests, resumable epoch by epoch."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedspeech.app.cli_common import add_format_option, add_run_config_options

log = logging.getLogger("fedspeech")


def register(sub: Any) -> None:
    """Add the ``pretrain`` command to the top-level subparsers."""
    p = sub.add_parser(
        "pretrain",
        help="train a public starting model (no DP), checkpointed every epoch",
        description="Train the run config's model on public manifests without DP (public data "
        "costs no privacy), with SpecAugment if spec-augment = true, slowed-down utterances if "
        "tempo-augment > 0, and a warm-up + cosine "
        "learning rate. Every epoch scores the --dev sets and checkpoints RUN_DIR/checkpoint; "
        "the model is the epoch best on the first --dev set, scored once on the --eval sets; "
        "an interrupted pre-training (Ctrl-C, SIGTERM, a crash) continues with --resume exactly "
        "where the uninterrupted one would be. The end tunes greedy decoding's blank bias on "
        "the first --dev set (kept with the model: transcribe and evaluate use it; the --eval "
        "sets are scored with and without it) and writes RUN_DIR/model and "
        "RUN_DIR/pretrain.json (data, configuration, per-epoch loss and dev scores).",
    )
    p.add_argument(
        "--train",
        type=Path,
        action="append",
        required=True,
        metavar="TSV",
        help="a public training manifest (repeat for several)",
    )
    p.add_argument(
        "--dev",
        action="append",
        default=[],
        metavar="NAME=TSV",
        help="a dev manifest scored after every epoch (repeat for several)",
    )
    p.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="NAME=TSV",
        help="an evaluation manifest scored once, on the final model (repeat for several)",
    )
    p.add_argument(
        "--speed",
        type=float,
        action="append",
        default=[],
        metavar="FACTOR",
        help="add speed-perturbed copies of the training audio (repeat: --speed 0.9 --speed 1.1)",
    )
    p.add_argument(
        "--run-dir", type=Path, required=True, metavar="DIR", help="the pre-training's folder"
    )
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--resume", action="store_true", help="continue the pre-training in --run-dir")
    add_run_config_options(
        p, example="hidden-size=256 num-layers=3 spec-augment=true tempo-augment=0.6 lr=0.002"
    )
    add_format_option(p)
    p.set_defaults(handler=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    from fedspeech.app.interrupts import stop_on_signals
    from fedspeech.app.pretrain import pretrain
    from fedspeech.config import resolve_run_config

    dev, evaluation = _named(args.dev, "--dev"), _named(args.eval, "--eval")
    cfg = resolve_run_config(args.preset, args.run_config)
    cfg = replace(
        cfg, train=replace(cfg.train, dp=False, noise_multiplier=None, target_epsilon=None)
    )
    stop_on_signals()
    try:
        result = pretrain(
            args.train,
            dev,
            cfg,
            args.run_dir,
            epochs=args.epochs,
            resume=args.resume,
            speeds=args.speed,
            eval_manifests=evaluation,
            command=shlex.join(["fedspeech", *sys.argv[1:]]),
        )
    except KeyboardInterrupt:
        log.error(
            "interrupted: continue with `fedspeech pretrain ... --run-dir %s --resume`",
            args.run_dir,
        )
        raise
    summary = {
        "model_dir": str(result.model_dir),
        "record": str(result.record_file),
        "hours": result.record["hours"],
        "epochs": len(result.record["epochs"]),
        "chosen_epoch": result.record["chosen_epoch"],
        **{f"dev_{k}_cer": v["cer"] for k, v in result.record["dev"].items()},
        **{f"eval_{k}_cer": v["cer"] for k, v in result.record["eval"].items()},
        "blank_bias": result.record["decoding"]["blank_bias"],
        **{
            f"eval_{k}_cer_blank_bias": v["cer"]
            for k, v in result.record["eval_blank_bias"].items()
        },
    }
    if args.format == "json":
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key}: {value}")
    return 0


def _named(items: list[str], option: str) -> dict[str, Path]:
    """``NAME=TSV`` options as a mapping (``ConfigError`` for a malformed or repeated one)."""
    from fedspeech.config import ConfigError

    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name in out:
            raise ConfigError(f"{option} {item!r}: expected NAME=manifest.tsv, one per NAME")
        out[name] = Path(path)
    return out
