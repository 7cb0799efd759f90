"""``fedspeech audit``: a one-run canary audit of the clients' training (``fedspeech_client.audit``).

Trains the run config's model once on the corpus (``--manifest``, else the run config's corpus:
the synthetic one by default) plus canaries, with the run config's training and DP-SGD settings,
then prints the empirical epsilon lower bound next to the accountant's epsilon and records both
through the server's trackers (MLflow and ``<run-dir>/rounds.jsonl``;
``<run-dir>/report/audit.json`` holds every canary's score).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedspeech.app.cli_common import add_format_option, add_renamed, add_run_config_options

if TYPE_CHECKING:
    from fedspeech.config import RunConfig
    from fedspeech_client.audit import AuditResult, AuditSettings
    from fedspeech_features.dataset import Example

log = logging.getLogger("fedspeech")


def register(sub: Any) -> None:
    """Add the ``audit`` command to the top-level subparsers."""
    p = sub.add_parser(
        "audit", help="empirical epsilon lower bound of DP training (one-run canary audit)"
    )
    add_run_config_options(p, example="target-epsilon=8 hidden-size=32")
    p.add_argument("--manifest", type=Path, help="training data (default: the run config's corpus)")
    add_renamed(
        p,
        "--run-dir",
        "--out",
        type=Path,
        metavar="DIR",
        default=Path(".fedspeech/audit"),
        help="the audit's run folder (report/, tracking)",
    )
    # Defaults None: fedspeech_client.audit.AuditSettings holds them (importing it here would load torch).
    p.add_argument("--canaries", type=int, help="canaries, each included w.p. 1/2 (default: 200)")
    p.add_argument("--guesses", type=int, help="k: k guessed 'in' + k 'out' (default: 20)")
    p.add_argument("--canary-frames", type=int, help="model frames per canary (default: 30)")
    p.add_argument("--canary-letters", type=int, help="letters per canary (default: 4)")
    p.add_argument("--confidence", type=float, help="of the lower bound (default: 0.95)")
    p.add_argument("--seed", type=int, help="canaries and their coin flips (default: 0)")
    add_format_option(p, json_flag=True)
    p.set_defaults(handler=_audit)


# What an audit writes into its folder (a rerun replaces them, nothing else).
_AUDIT_OUTPUTS = ("report", "params.json", "rounds.jsonl", "tracking.json")
_SETTINGS = ("canaries", "guesses", "canary_frames", "canary_letters", "confidence", "seed")


def _audit(args: argparse.Namespace) -> int:
    import dataclasses

    from fedspeech.app.simulate import absolute_sqlite_uri
    from fedspeech.config import resolve_run_config
    from fedspeech.model import BiGRUCTC, load_plain_state_dict
    from fedspeech.pipeline import initial_weights
    from fedspeech_client.audit import run_canary_audit
    from fedspeech_features.text import CharTokenizer

    cfg = resolve_run_config(args.preset, args.run_config)
    flat = {**cfg.to_flat(), "tracking-uri": absolute_sqlite_uri(cfg.fed.tracking_uri)}
    cfg = type(cfg).from_flat(flat)
    settings = _settings(args)
    if cfg.fed.client_threads:
        import torch

        torch.set_num_threads(cfg.fed.client_threads)  # as a client trains (client-threads)
    manifest, examples = _training_data(cfg, args.manifest)
    model_config = cfg.model.model_config(cfg.features.frame_dim, CharTokenizer().vocab_size)
    model = BiGRUCTC(model_config)
    load_plain_state_dict(model, initial_weights(cfg, model_config))
    # The local training a client runs: DP-SGD only when the privacy unit includes samples.
    train = dataclasses.replace(cfg.train, dp=cfg.sample_level_dp)
    if cfg.train.dp and not train.dp:
        log.warning("privacy-unit %r: clients train without DP-SGD", cfg.privacy.privacy_unit)
    result = run_canary_audit(model, examples, train, settings)
    out: Path = args.run_dir.resolve()
    run_id = _record(out, cfg, flat, settings, result, manifest)
    if args.format == "json":
        print(json.dumps({**result.summary(), "tracking_run_id": run_id}, indent=2))
    else:
        _print(result, out, run_id)
    return 0


def _settings(args: argparse.Namespace) -> AuditSettings:
    from fedspeech.config import ConfigError
    from fedspeech_client.audit import AuditSettings

    given = {k: getattr(args, k) for k in _SETTINGS if getattr(args, k) is not None}
    try:
        return AuditSettings(**given)
    except ValueError as exc:
        raise ConfigError(f"audit: {exc}") from exc


def _training_data(cfg: RunConfig, manifest: Path | None) -> tuple[Path, list[Example]]:
    """The manifest and its examples: ``--manifest``, else the run config's corpus."""
    from fedspeech.fed_data import corpus_manifest, feature_cache_dir
    from fedspeech.pipeline import load_examples

    cache = None
    if manifest is None:
        manifest = corpus_manifest(cfg, cfg.fed.data_dir)
        if cfg.data.corpus == "synthetic":
            cache = feature_cache_dir(cfg.fed.data_dir)
    examples, _, summary = load_examples(manifest, cfg.features, cache_root=cache)
    log.info("%s", summary)
    return manifest, examples


def _record(
    out: Path,
    cfg: RunConfig,
    flat: dict[str, Any],
    settings: AuditSettings,
    result: AuditResult,
    manifest: Path,
) -> str:
    """Write ``report/audit.json`` and track params and metrics; returns the tracking run id."""
    from fedspeech_features.files import remove_paths
    from fedspeech_server.tracking import open_tracker

    remove_paths(out, _AUDIT_OUTPUTS)
    report = out / "report"
    report.mkdir(parents=True)
    record = {"settings": settings.__dict__, "manifest": str(manifest), **result.summary()}
    record["canary_scores"] = list(result.scores)
    record["canary_included"] = list(result.membership)
    (report / "audit.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tracker = open_tracker(cfg, out, None)
    tracker.log_params({**flat, **{f"audit-{k}": v for k, v in settings.__dict__.items()}})
    tracker.log_round(1, result.metrics())
    tracker.log_artifacts(report)
    tracker.finish(None)
    return tracker.run_id


def _print(result: AuditResult, out: Path, run_id: str) -> None:
    accountant = (
        f"{result.epsilon:.3f} (DP-SGD, noise multiplier {result.noise_multiplier:.3f})"
        if result.epsilon is not None and result.noise_multiplier is not None
        else "none (no DP-SGD: no sample-level guarantee)"
    )
    print(
        f"audit: {result.correct} of {result.guesses} guesses right on {result.canaries} "
        f"canaries ({result.included} included), {result.seconds:.1f} s"
    )
    print(
        f"empirical epsilon lower bound: {result.epsilon_lower:.3f} "
        f"({result.confidence:.0%} confidence, delta {result.delta:g})"
    )
    print(f"accountant epsilon: {accountant}")
    print(f"audit folder: {out}")
    print(f"tracking run id: {run_id}")
