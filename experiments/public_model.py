"""The recipe of the shipped public model ``en-public-small``: one command rebuilds it.

    python experiments/public_model.py [--work DIR] [--epochs 14] [--resume] [--fraction F]

1. ``prepare``: manifests of the public corpora in ``../shared/data`` (``FEDSPEECH_SHARED_DATA``
   overrides) with absolute audio paths in ``--work``: LibriSpeech train-clean-100 samples,
   Kathleen (CMU ARCTIC prompts) and LJSpeech mini for training; speechocean762 dev speakers
   (the sentence recipes' split) to choose the epoch; speechocean762 evaluation speakers,
   LibriSpeech test-other samples and the AN4 test split scored once at the end. Left out on
   purpose: FSDD (CC BY-SA: share-alike cannot ship inside an Apache-2.0 package), AN4 train (the
   private fine-tuning benchmark must start from a model that never heard AN4), every
   speechocean762 speaker (the federation's private data) and LibriSpeech test sets.
2. ``fedspeech pretrain`` with speed perturbation (0.9, 1.1), tempo slow-down (60% of the
   utterances, 1-1.8x) and SpecAugment, resumable; it also
   tunes greedy decoding's blank bias on the dev speakers (kept with the model).
3. ``export``: float16 weights, ``pretrain.json`` and ``card.md`` into
   ``fedspeech/shipped/en-public-small`` (``fedspeech.app.model_card``).
"""

from __future__ import annotations

import argparse
import logging
import random
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
sys.path.insert(0, str(ROOT / "experiments"))

from fedspeech.logs import setup_logging  # noqa: E402
from fedspeech_features.manifest import Utterance, read_manifest, write_manifest  # noqa: E402

log = logging.getLogger("fedspeech.recipes")

NAME = "en-public-small"
SHIPPED = ROOT / "fedspeech" / "shipped" / NAME
RUN_CONFIG = (
    "hidden-size=256 num-layers=3 dropout=0.1 spec-augment=true tempo-augment=0.6 tempo-max=1.8"
    " lr=0.002 batch-size=16"
)
SPEEDS = (0.9, 1.1)
SOURCES = {
    "librispeech_train": {
        "licence": "CC BY 4.0",
        "source": "LibriSpeech train-clean-100, 251 utterances (one per speaker)",
    },
    "kathleen": {
        "licence": "CC0 1.0",
        "source": "rhasspy/dataset-voice-kathleen (CMU ARCTIC prompts, one US speaker)",
    },
    "ljspeech_mini": {"licence": "public domain", "source": "LJ Speech 1.1, 30 utterances"},
}


def prepare(
    work: Path, fraction: float = 1.0
) -> tuple[list[Path], dict[str, Path], dict[str, Path]]:
    """Write the recipe's manifests into ``work``: (train, dev, eval). ``fraction`` < 1 keeps that
    share of every training corpus (the same seeded draw each time): a learning curve."""
    from recipes import sentence_split, shared_data

    data = shared_data()

    def subset(corpus: str, name: str, part: str = "") -> Path:
        rows = [
            Utterance(data / corpus / r.path, r.transcript, r.speaker, r.duration_s)
            for r in read_manifest(data / corpus / "manifest.tsv")
        ]
        write_manifest(work / f"{name}.tsv", [r for r in rows if part in str(r.path)])
        return work / f"{name}.tsv"

    work.mkdir(parents=True, exist_ok=True)
    train = [
        subset("librispeech_samples", "librispeech_train", "/train-clean-100/"),
        subset("kathleen", "kathleen"),
        subset("ljspeech_mini", "ljspeech_mini"),
    ]
    if fraction < 1:
        for manifest in train:
            rows = read_manifest(manifest)
            keep = random.Random(0).sample(range(len(rows)), max(1, round(fraction * len(rows))))
            write_manifest(manifest, [rows[i] for i in sorted(keep)])
    _, dev, evaluation = sentence_split(work / "ocean")
    evals = {
        "ocean-eval": evaluation,
        "librispeech-test-other": subset(
            "librispeech_samples", "librispeech_test_other", "/test-other/"
        ),
        "an4-test": subset("an4", "an4_test", "/test/"),
    }
    return train, {"ocean-dev": dev}, evals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".fedspeech" / "public-model")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--export-only", action="store_true", help="export a finished run")
    parser.add_argument(
        "--fraction",
        type=float,
        default=1.0,
        help="train on this share of each public corpus (a learning curve; never exported)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction:g}")
    setup_logging()
    from fedspeech.app.model_card import export_model

    run_dir = args.work / "run"
    if not args.export_only:
        train, dev, evals = prepare(args.work, args.fraction)
        command = [
            str(Path(sys.executable).parent / "fedspeech"), "pretrain",
            *[a for t in train for a in ("--train", str(t))],
            *[a for s in SPEEDS for a in ("--speed", f"{s:g}")],
            *[a for k, v in dev.items() for a in ("--dev", f"{k}={v}")],
            *[a for k, v in evals.items() for a in ("--eval", f"{k}={v}")],
            "--run-dir", str(run_dir), "--epochs", str(args.epochs),
            "--run-config", RUN_CONFIG, *(["--resume"] if args.resume else []),
        ]  # fmt: skip
        log.info("%s", shlex.join(command))
        subprocess.run(command, check=True)
    if args.fraction < 1:
        print(f"learning-curve run (fraction {args.fraction:g}): {run_dir / 'pretrain.json'}")
        return 0
    recipe = f"python experiments/public_model.py --epochs {args.epochs}"
    export_model(run_dir, SHIPPED, name=NAME, sources=SOURCES, recipe=recipe)
    print(f"shipped model: {SHIPPED}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
