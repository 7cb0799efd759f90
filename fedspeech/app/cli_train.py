"""``fedspeech train``: the centralized baseline (same model, features and DP option as a client)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from fedspeech import metric_keys as mk
from fedspeech.app.cli_common import add_format_option, add_renamed, add_run_config_options

log = logging.getLogger("fedspeech")


def register(sub: Any) -> None:
    """Add the ``train`` command to the top-level subparsers."""
    p = sub.add_parser("train", help="centralized training on one manifest (baseline)")
    p.add_argument("--manifest", type=Path, required=True, help="training manifest.tsv")
    add_renamed(
        p,
        "--model-dir",
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="model directory to write",
    )
    p.add_argument("--dev", type=Path, help="manifest to evaluate the trained model on")
    add_run_config_options(p, example="epochs=20 dp=false")
    p.add_argument("--cache", type=Path, help="feature cache folder (default: beside the manifest)")
    add_format_option(p, default="json")
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from fedspeech.config import resolve_run_config
    from fedspeech_client.central import train_central

    cfg = resolve_run_config(args.preset, args.run_config)
    result = train_central(args.manifest, cfg, args.model_dir, cache_root=args.cache)
    summary: dict[str, Any] = {
        "model_dir": str(result.model_dir),
        "utterances": result.examples,
        "skipped": result.skipped,
        "train_loss": round(result.train.metrics[mk.TRAIN_LOSS], 4),
        "epsilon": result.train.epsilon,
        "delta": cfg.train.delta if cfg.train.dp else None,
    }
    if args.dev:
        from fedspeech.devices import resolve_device
        from fedspeech.evaluate import evaluate_manifest
        from fedspeech.modeldir import load_model_dir

        device = resolve_device(cfg.train.device)
        scores = evaluate_manifest(load_model_dir(result.model_dir), args.dev, device=device)
        summary.update({"dev_" + k: v for k, v in scores.to_dict().items()})
    if args.format == "json":
        print(json.dumps(summary, indent=2))
    else:
        width = max(len(key) for key in summary)
        for key, value in summary.items():
            print(f"{key:<{width}}  {'-' if value is None else value}")
    return 0
