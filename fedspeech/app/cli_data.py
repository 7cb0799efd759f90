"""``fedspeech data ...``: build manifests from corpora, partition them, extract features."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from fedspeech.app.cli_common import add_renamed

log = logging.getLogger("fedspeech")


def register(sub: Any) -> None:
    """Add the ``data`` command group to the top-level subparsers."""
    data = sub.add_parser("data", help="build manifests, partition them, extract features")
    dsub = data.add_subparsers(required=True, metavar="SOURCE")

    p = dsub.add_parser("synthetic", help="the built-in multi-speaker espeak-ng corpus")
    add_renamed(
        p,
        "--corpus-dir",
        "--out",
        type=Path,
        metavar="DIR",
        required=True,
        help="corpus folder to write (wavs/ + manifest.tsv)",
    )
    p.add_argument("--utterances", type=int, default=1200)
    p.add_argument("--voices", type=int, default=16, help="distinct synthetic speakers (>= 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", action="store_true", help="add noise/reverb (deterministic)")
    p.add_argument(
        "--text",
        choices=["sentences", "digits"],
        default="sentences",
        help="what the voices say: mixed sentences, or one digit word each",
    )
    p.set_defaults(handler=_synthetic)

    p = dsub.add_parser("librispeech", help="a LibriSpeech folder (speaker/chapter/*.flac)")
    p.add_argument("root", type=Path)
    _manifest_out(p)
    p.set_defaults(handler=_librispeech)

    p = dsub.add_parser(
        "an4", help="the CMU AN4 census database (etc/, wav/): one official split per manifest"
    )
    p.add_argument("root", type=Path)
    p.add_argument("--split", choices=["train", "test"], default="train")
    _manifest_out(p)
    p.set_defaults(handler=_an4)

    p = dsub.add_parser("commonvoice", help="a Common Voice *.tsv and its clips folder")
    p.add_argument("tsv", type=Path, help="e.g. cv-corpus/en/validated.tsv")
    p.add_argument("--clips", type=Path, help="clips folder (default: clips/ beside the tsv)")
    _manifest_out(p)
    p.set_defaults(handler=_commonvoice)

    p = dsub.add_parser("fsdd", help="a Free Spoken Digit Dataset recordings folder")
    p.add_argument("root", type=Path)
    _manifest_out(p)
    p.set_defaults(handler=_fsdd)

    p = dsub.add_parser("folder", help="any folder of audio files with same-name .txt transcripts")
    p.add_argument("root", type=Path)
    p.add_argument("--speaker", help="one speaker for all files (default: parent folder name)")
    _manifest_out(
        p, "manifest.tsv to write (default: ROOT/manifest.tsv, whose paths are then relative)"
    )
    p.set_defaults(handler=_folder)

    p = dsub.add_parser(
        "partition",
        help="split a manifest into N client manifests",
        description="Split a manifest into N client manifests, as a simulation splits its corpus "
        "(the flags are the run-config keys of the same name).",
    )
    p.add_argument("manifest", type=Path)
    add_renamed(
        p, "--num-partitions", "--clients", type=int, required=True, metavar="N", help="clients"
    )
    add_renamed(
        p,
        "--partition",
        "--method",
        choices=["speaker", "iid", "dirichlet"],
        default="speaker",
        help="how utterances are spread over the clients",
    )
    add_renamed(
        p,
        "--dirichlet-alpha",
        "--alpha",
        type=float,
        default=0.5,
        metavar="ALPHA",
        help="Dirichlet concentration",
    )
    add_renamed(
        p, "--partition-seed", "--seed", type=int, default=0, metavar="SEED", help="random seed"
    )
    add_renamed(
        p,
        "--partitions-dir",
        "--out",
        type=Path,
        metavar="DIR",
        required=True,
        help="folder to write client_<i>/manifest.tsv into",
    )
    p.set_defaults(handler=_partition)

    p = dsub.add_parser("features", help="extract (and cache) features of a manifest")
    p.add_argument("manifest", type=Path)
    p.add_argument("--cache", type=Path, help="cache folder (default: beside the manifest)")
    p.add_argument(
        "--run-config",
        default="",
        metavar="OVERRIDES",
        help='feature overrides, e.g. "n-mfcc=13" (every key: fedspeech config show)',
    )
    p.set_defaults(handler=_features)


def _manifest_out(p: argparse.ArgumentParser, default_help: str | None = None) -> None:
    """``--manifest`` (formerly ``--out``): the manifest a builder writes; required unless
    ``default_help`` describes its default."""
    add_renamed(
        p,
        "--manifest",
        "--out",
        type=Path,
        metavar="TSV",
        required=default_help is None,
        help=default_help or "manifest.tsv to write",
    )


def _report_exit(report: Any) -> int:
    """Exit code of a build: the builder has logged its summary; failing only if nothing was kept."""
    return 0 if report.kept else 1


def _synthetic(args: argparse.Namespace) -> int:
    from fedspeech_features.corpora.synthetic import build_synthetic_corpus

    manifest, report = build_synthetic_corpus(
        args.corpus_dir,
        num_utterances=args.utterances,
        seed=args.seed,
        num_voices=args.voices,
        augment=args.augment,
        text=args.text,
    )
    print(manifest)
    return _report_exit(report)


def _librispeech(args: argparse.Namespace) -> int:
    from fedspeech_features.corpora.librispeech import build_librispeech

    return _report_exit(build_librispeech(args.root, args.manifest))


def _an4(args: argparse.Namespace) -> int:
    from fedspeech_features.corpora.an4 import build_an4

    return _report_exit(build_an4(args.root, args.manifest, split=args.split))


def _commonvoice(args: argparse.Namespace) -> int:
    from fedspeech_features.corpora.commonvoice import build_commonvoice

    return _report_exit(build_commonvoice(args.tsv, args.manifest, clips_dir=args.clips))


def _fsdd(args: argparse.Namespace) -> int:
    from fedspeech_features.corpora.fsdd import build_fsdd

    return _report_exit(build_fsdd(args.root, args.manifest))


def _folder(args: argparse.Namespace) -> int:
    from fedspeech_features.corpora.folder import build_folder

    out = args.manifest or args.root / "manifest.tsv"
    return _report_exit(build_folder(args.root, out, speaker=args.speaker))


def _partition(args: argparse.Namespace) -> int:
    from fedspeech_features.manifest import read_manifest
    from fedspeech_features.partition import partition_utterances, summary_table, write_partitions

    parts = partition_utterances(
        read_manifest(args.manifest),
        args.num_partitions,
        method=args.partition,
        seed=args.partition_seed,
        alpha=args.dirichlet_alpha,
    )
    for path in write_partitions(parts, args.partitions_dir):
        log.info("wrote %s", path)
    print(summary_table(parts))
    return 0


def _features(args: argparse.Namespace) -> int:
    from fedspeech.config import resolve_run_config
    from fedspeech.pipeline import load_examples

    cfg = resolve_run_config(None, args.run_config)
    _, _, summary = load_examples(args.manifest, cfg.features, cache_root=args.cache)
    print(summary)
    return 0
