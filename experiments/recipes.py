"""Recipes on real speech: one command per row of docs/results.md.

    python experiments/recipes.py digits pretrain           # public model (no private data)
    python experiments/recipes.py digits central            # centralized, non-private
    python experiments/recipes.py digits fed                # federated, non-private
    python experiments/recipes.py digits fed-dp --epsilon 8 # federated, DP-SGD on every client
    python experiments/recipes.py report                    # tables + WER/CER-vs-epsilon plot

A recipe is ``experiments/<task>.toml``: a ``[recipe]`` table shared by every row, then one table
per mode (``[central]``, ``[fed]``, ``[fed-dp]``) layered on top; all keys are the run config's
(``fedspeech.config``). The task defines the folds (train manifest, evaluation manifest): digits
rotates the held-out FSDD speaker, sentences holds out fixed speechocean762 speakers. Every fold is
trained, then its final model is scored on the fold's evaluation speakers with greedy decoding and
with a lexicon + bigram LM beam search built from the fold's *training* transcripts. A row writes
``experiments/results/<task>/<row>.json`` and one MLflow run (experiment ``fedspeech-recipes``)
with the per-fold metrics; federated folds also log their own per-round runs.

The data are ``../shared/data`` (``FEDSPEECH_SHARED_DATA`` overrides); the product does not need
them, these experiments do.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from fedspeech.config import RunConfig, parse_overrides, resolve_run_config  # noqa: E402
from fedspeech.logs import setup_logging  # noqa: E402
from fedspeech.privacy_config import PrivacyConfig  # noqa: E402
from fedspeech_features.manifest import Utterance, read_manifest, write_manifest  # noqa: E402

log = logging.getLogger("fedspeech.recipes")

RESULTS = ROOT / "experiments" / "results"
WORK = ROOT / ".fedspeech" / "recipes"
MODES = ("pretrain", "central", "fed", "fed-dp")
PRETRAINED = "@pretrained"  # an init-model value: this task's public pre-trained model
EXPERIMENT = "fedspeech-recipes"


@dataclass(frozen=True)
class Fold:
    """One train/evaluate split: ``name`` labels the evaluation speakers."""

    name: str
    train: Path
    evaluate: Path


@dataclass(frozen=True)
class FoldResult:
    """One fold's scores and costs (error rates are jiwer's, over the fold's utterances)."""

    fold: str
    wer: float
    cer: float
    beam_wer: float
    beam_cer: float
    epsilon: float | None
    rounds: int
    seconds: float
    model: str


def shared_data() -> Path:
    """``../shared/data`` beside the repository (or ``$FEDSPEECH_SHARED_DATA``)."""
    path = Path(os.environ.get("FEDSPEECH_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not (path / "fsdd" / "manifest.tsv").is_file():
        raise SystemExit(f"{path}: no shared data (set FEDSPEECH_SHARED_DATA)")
    return path


# ------------------------------------------------------------------------------------ tasks


def digits_folds(work: Path, only: Sequence[str]) -> list[Fold]:
    """FSDD: train on five speakers, evaluate on the sixth; every speaker takes a turn."""
    rows = read_manifest(shared_data() / "fsdd" / "manifest.tsv")
    speakers = sorted({r.speaker for r in rows})
    folds = []
    for held in [s for s in speakers if not only or s in only]:
        folds.append(
            Fold(
                held,
                _write(work / held / "train.tsv", [r for r in rows if r.speaker != held]),
                _write(work / held / "eval.tsv", [r for r in rows if r.speaker == held]),
            )
        )
    return folds


SENTENCE_DEV_SPEAKERS = 10  # tuning was done on these (see docs/results.md)
SENTENCE_EVAL_SPEAKERS = 15  # never looked at before the final rows


def sentence_split(work: Path) -> tuple[Path, Path, Path]:
    """speechocean762 speakers -> (train, dev, eval) manifests.

    The split is seeded and fixed: 15 evaluation and 10 dev speakers, whose utterances no client
    holds; the other 100 speakers train. (librispeech_samples is the public pre-training data.)
    """
    data = shared_data()
    ocean = read_manifest(data / "speechocean762_train" / "manifest.tsv")
    speakers = sorted({r.speaker for r in ocean})
    random.Random(762).shuffle(speakers)
    held_eval = set(speakers[:SENTENCE_EVAL_SPEAKERS])
    held_dev = set(
        speakers[SENTENCE_EVAL_SPEAKERS : SENTENCE_EVAL_SPEAKERS + SENTENCE_DEV_SPEAKERS]
    )
    train = [r for r in ocean if r.speaker not in held_eval | held_dev]
    return (
        _write(work / "train.tsv", train),
        _write(work / "dev.tsv", [r for r in ocean if r.speaker in held_dev]),
        _write(work / "eval.tsv", [r for r in ocean if r.speaker in held_eval]),
    )


def sentence_folds(work: Path, only: Sequence[str]) -> list[Fold]:
    """One fold: held-out evaluation speakers (``--folds dev`` scores the dev speakers instead)."""
    train, dev, evaluate = sentence_split(work)
    return [Fold("dev", train, dev)] if "dev" in only else [Fold("eval", train, evaluate)]


AN4_DEV_SPEAKERS = 8  # training speakers held out for tuning (``--folds dev``)


def an4_folds(work: Path, only: Sequence[str]) -> list[Fold]:
    """AN4's official split: 74 training speakers, scored on the 10 test speakers.

    ``--folds dev`` holds 8 (seeded) training speakers out of training and scores them instead:
    tune there, then run the test rows once. The public start is the shipped en-public-small,
    which never heard AN4 (``experiments/public_model.py`` keeps it out).
    """
    data = shared_data() / "an4"
    split = dict(
        line.split("\t")
        for line in (data / "splits.tsv").read_text(encoding="utf-8").splitlines()[1:]
    )
    rows = read_manifest(data / "manifest.tsv")
    side = {r.path: split[Path(r.path).relative_to(data.resolve()).as_posix()] for r in rows}
    train = [r for r in rows if side[r.path] == "train"]
    if "dev" not in only:
        test = [r for r in rows if side[r.path] == "test"]
        return [Fold("test", _write(work / "train.tsv", train), _write(work / "test.tsv", test))]
    speakers = sorted({r.speaker for r in train})
    random.Random(4).shuffle(speakers)
    dev = set(speakers[:AN4_DEV_SPEAKERS])
    return [
        Fold(
            "dev",
            _write(work / "dev-train.tsv", [r for r in train if r.speaker not in dev]),
            _write(work / "dev.tsv", [r for r in train if r.speaker in dev]),
        )
    ]


def digits_public(work: Path) -> Path:
    """Public speech for digits: LibriSpeech samples + synthetic digit words (128 voices, 8 kHz).

    No FSDD speaker is in either. The synthetic words are rendered at 8 kHz like FSDD's audio.
    """
    from fedspeech_features.corpora.synthetic import build_synthetic_corpus

    digits, _ = build_synthetic_corpus(
        work / "synthetic-digits",
        num_utterances=6000,
        seed=1,
        num_voices=128,
        text="digits",
        sample_rate=8000,
    )
    libri = read_manifest(shared_data() / "librispeech_samples" / "manifest.tsv")
    return _write(work / "public.tsv", libri + read_manifest(digits))


def sentences_public(work: Path) -> Path:
    """Public speech for sentences: the LibriSpeech samples (no speechocean762 speaker)."""
    return _write(
        work / "public.tsv", read_manifest(shared_data() / "librispeech_samples" / "manifest.tsv")
    )


PUBLIC_MODEL_OF = {"sentences-device": "sentences-silo"}  # same public data, same model

PUBLIC: dict[str, Callable[[Path], Path]] = {
    "digits": digits_public,
    "sentences-silo": sentences_public,
    "sentences-device": sentences_public,
}

TASKS: dict[str, Callable[[Path, Sequence[str]], list[Fold]]] = {
    "digits": digits_folds,
    "sentences-silo": sentence_folds,
    "sentences-device": sentence_folds,
    "an4": an4_folds,
}


def _write(path: Path, rows: list[Utterance]) -> Path:
    write_manifest(path, rows)
    return path


# ------------------------------------------------------------------------------------ rows


def recipe_config(task: str, mode: str, epsilon: float | None, extra: str = "") -> dict[str, Any]:
    """The flat run config of a row: ``[recipe]`` <- ``[mode]`` <- epsilon <- ``extra``."""
    with open(ROOT / "experiments" / f"{task}.toml", "rb") as fh:
        recipe = tomllib.load(fh)
    flat: dict[str, Any] = dict(recipe.get("recipe", {}))
    flat.update(recipe.get(mode, {}))
    if mode == "fed-dp":
        if epsilon is None:
            raise SystemExit("fed-dp needs --epsilon")
        flat.update({"dp": True, "target-epsilon": epsilon, "noise-multiplier": ""})
        if "epsilon-budget" in flat:  # a recipe with a budget caps every client at the target
            flat["epsilon-budget"] = epsilon
    else:
        flat["dp"] = False
    flat.update(parse_overrides(extra))
    if flat.get("init-model") == PRETRAINED:
        flat["init-model"] = str(pretrained_model(task))
    return flat


def pretrained_model(task: str) -> Path:
    """Where ``recipes.py TASK pretrain`` leaves the task's public model (it must exist)."""
    owner = PUBLIC_MODEL_OF.get(task, task)
    model = WORK / owner / "pretrain" / "model"
    if not (model / "config.json").is_file():
        raise SystemExit(f"{model}: missing; run `python experiments/recipes.py {owner} pretrain`")
    return model


def pretrain(task: str, extra: str) -> Path:
    """Train the task's public model (no DP: public data costs no privacy) and score it."""
    from fedspeech_client.central import train_central

    if task not in PUBLIC:
        raise SystemExit(f"{task} starts from a shipped public model; it has no pretrain row")
    flat = recipe_config(task, "pretrain", None, extra)
    out = WORK / task / "pretrain"
    public = PUBLIC[task](out)
    start = time.perf_counter()
    cfg = resolve_run_config(None, flat, cwd=ROOT)
    train_central(public, cfg, out / "model")
    seconds = time.perf_counter() - start
    results = []
    for fold in TASKS[task](WORK / task / "folds", []):
        greedy, beam = score(out / "model", fold)
        results.append(FoldResult(fold.name, *greedy, *beam, None, 0, seconds, str(out / "model")))
    summary = summarize(task, "pretrain", "pretrain", flat, results, extra, [])
    summary["seconds"] = seconds  # one model for every fold
    _save(summary, cfg, out)
    return out / "model"


def row_name(mode: str, epsilon: float | None) -> str:
    """``central``, ``fed`` or ``fed-dp-eps8``."""
    return f"{mode}-eps{epsilon:g}" if mode == "fed-dp" and epsilon is not None else mode


def run_fold(
    fold: Fold, flat: dict[str, Any], mode: str, out: Path, run_name: str, engine: str = "flower"
) -> FoldResult:
    """Train one fold (centrally or federated on ``engine``), then score its final model."""
    start = time.perf_counter()
    overrides = dict(flat, **{"experiment-name": EXPERIMENT, "run-name": run_name})
    if mode == "central":
        from fedspeech_client.central import train_central

        cfg = resolve_run_config(None, overrides, cwd=ROOT)  # the same layers as simulate
        out.mkdir(parents=True, exist_ok=True)
        result = train_central(fold.train, cfg, out / "model")
        model_dir, epsilon, rounds = result.model_dir, result.train.epsilon, 0
    else:
        from fedspeech.app.simulate import simulate

        overrides.update(
            {"corpus": str(fold.train), "eval-manifest": str(fold.evaluate), "holdout-speakers": 0}
        )
        outcome = simulate(overrides=overrides, out=out, output=out / "flower.log", engine=engine)
        if not outcome.finished or outcome.model_dir is None:
            raise RuntimeError(f"fold {fold.name}: the simulation did not finish; see {out}")
        model_dir, rounds = outcome.model_dir, outcome.rounds
        last = outcome.history[-1] if outcome.history else {}
        # the server's user-level ledger where the row protects whole clients, else DP-SGD's
        user_level = _privacy(flat).user_level
        epsilon = last.get("user_epsilon" if user_level else "epsilon_max")
    seconds = time.perf_counter() - start
    greedy, beam = score(model_dir, fold)
    return FoldResult(
        fold.name, greedy[0], greedy[1], beam[0], beam[1], epsilon, rounds, seconds, str(model_dir)
    )


def score(model_dir: Path, fold: Fold) -> tuple[tuple[float, float], tuple[float, float]]:
    """(WER, CER) greedy and with a lexicon + bigram LM of the fold's training transcripts."""
    from fedspeech.beam import BeamDecoder
    from fedspeech.evaluate import evaluate_manifest
    from fedspeech.lm import write_arpa, write_lexicon
    from fedspeech.modeldir import load_model_dir

    loaded = load_model_dir(model_dir)
    texts = [r.transcript for r in read_manifest(fold.train)]
    lm, lexicon = model_dir.parent / "train-lm.arpa", model_dir.parent / "train-lexicon.txt"
    write_arpa(texts, lm, order=2)
    write_lexicon({w for t in texts for w in t.split()}, lexicon, loaded.tokenizer)
    decoder = BeamDecoder(
        loaded.tokenizer, loaded.feature_config.frame_shift_s, beam_size=50, lexicon=lexicon, lm=lm
    )
    greedy = evaluate_manifest(loaded, fold.evaluate, progress=False)
    beam = evaluate_manifest(loaded, fold.evaluate, decoder=decoder, progress=False)
    return (greedy.wer, greedy.cer), (beam.wer, beam.cer)


def run_row(
    task: str,
    mode: str,
    epsilon: float | None,
    folds: Sequence[str],
    extra: str,
    name: str | None = None,
    engine: str = "flower",
) -> Path:
    """Run every fold of one row; write its JSON and its MLflow summary run.

    On the local engine the folds share one pool of workers (``kept_workers``): only the first
    fold waits for their imports.
    """
    from fedspeech.app.local_engine import kept_workers

    name = name or row_name(mode, epsilon)
    flat = recipe_config(task, mode, epsilon, extra)
    cfg = resolve_run_config(None, flat, cwd=ROOT)  # fail before any training
    work = WORK / task
    results = []
    with kept_workers():
        for fold in TASKS[task](work / "folds", folds):
            log.info("%s %s: fold %s", task, name, fold.name)
            out, run_name = work / name / fold.name, f"{task}-{name}-{fold.name}"
            result = run_fold(fold, flat, mode, out, run_name, engine)
            log.info("%s %s: fold %s -> %s", task, name, fold.name, asdict(result))
            results.append(result)
    summary = summarize(task, name, mode, flat, results, extra, folds, engine)
    _save(summary, cfg, work / name)
    return RESULTS / task / f"{name}.json"


def _save(summary: dict[str, Any], cfg: RunConfig, run_dir: Path) -> None:
    """The row's JSON in experiments/results, its MLflow run, and a one-line verdict."""
    out = RESULTS / summary["task"] / f"{summary['row']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    track(cfg, summary, run_dir)
    print(
        f"{summary['task']} {summary['row']}: WER {summary['wer']:.3f} "
        f"(beam {summary['beam_wer']:.3f}), CER {summary['cer']:.3f} "
        f"(beam {summary['beam_cer']:.3f}), epsilon {summary['epsilon']}, "
        f"{summary['seconds']:.0f} s -> {out}"
    )


def summarize(
    task: str,
    name: str,
    mode: str,
    flat: dict[str, Any],
    results: Sequence[FoldResult],
    extra: str,
    folds: Sequence[str],
    engine: str = "flower",
) -> dict[str, Any]:
    """Means over folds (and the folds themselves) for the JSON and the results page."""
    command = f"python experiments/recipes.py {task} {mode}"
    if mode == "fed-dp":
        command += f" --epsilon {flat['target-epsilon']:g}"
    if folds:
        command += f" --folds {','.join(folds)}"
    if extra:
        command += f' --run-config "{extra}"'
    if name not in (mode, row_name(mode, flat.get("target-epsilon") or None)):
        command += f" --row {name}"
    if engine != "flower":
        command += f" --engine {engine}"
    epsilons = [r.epsilon for r in results if r.epsilon is not None]
    return {
        "task": task,
        "row": name,
        "mode": mode,
        "command": command,
        "run_config": flat,
        "folds": [asdict(r) for r in results],
        "wer": statistics.fmean(r.wer for r in results),
        "cer": statistics.fmean(r.cer for r in results),
        "beam_wer": statistics.fmean(r.beam_wer for r in results),
        "beam_cer": statistics.fmean(r.beam_cer for r in results),
        "epsilon": max(epsilons) if epsilons else None,
        "delta": _delta(mode, flat),
        "privacy_unit": _unit(mode, flat),
        "rounds": max(r.rounds for r in results),
        "seconds": sum(r.seconds for r in results),
        "measured": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores",
    }


def _privacy(flat: dict[str, Any]) -> PrivacyConfig:
    """The row's privacy unit and user-level delta (the rest of ``flat`` is not needed)."""
    keys = {"privacy-unit": "privacy_unit", "user-delta": "user_delta"}
    return PrivacyConfig(**{field: flat[key] for key, field in keys.items() if key in flat})


def _unit(mode: str, flat: dict[str, Any]) -> str | None:
    """What a row's epsilon protects: a client's sample (DP-SGD), a whole client, or nothing."""
    privacy = _privacy(flat)
    if privacy.user_level:
        return privacy.privacy_unit
    return "sample" if mode == "fed-dp" else None


def _delta(mode: str, flat: dict[str, Any]) -> float | None:
    privacy = _privacy(flat)
    if privacy.user_level:
        return float(privacy.user_delta)
    return float(flat.get("delta", 1e-5)) if mode == "fed-dp" else None


def track(cfg: RunConfig, summary: dict[str, Any], run_dir: Path) -> None:
    """One MLflow run per row: the recipe as params, per-fold metrics at steps 1..k, the means."""
    from dataclasses import replace

    from fedspeech_server.tracking import open_tracker

    fed = replace(
        cfg.fed, experiment_name=EXPERIMENT, run_name=f"{summary['task']}-{summary['row']}"
    )
    tracker = open_tracker(replace(cfg, fed=fed), run_dir, None)
    tracker.log_params({**summary["run_config"], "task": summary["task"], "row": summary["row"]})
    keys = ("wer", "cer", "beam_wer", "beam_cer", "seconds")
    for step, fold in enumerate(summary["folds"], start=1):
        metrics = {k: fold[k] for k in keys}
        if fold["epsilon"] is not None:
            metrics["epsilon"] = fold["epsilon"]
        tracker.log_round(step, metrics)
    tracker.log_round(
        len(summary["folds"]) + 1, {f"mean_{k}": summary[k] for k in keys if k != "seconds"}
    )
    tracker.finish(None)  # no single model: one per fold


# ------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``TASK MODE [--epsilon E] [--folds A,B] [--run-config "k=v"]`` or ``report``."""
    from fedspeech.app.interrupts import stop_on_signals
    from fedspeech.app.simulate import ENGINES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=[*TASKS, "report"])
    parser.add_argument("mode", nargs="?", choices=MODES)
    parser.add_argument("--epsilon", type=float, help="fed-dp: every client's target epsilon")
    parser.add_argument("--folds", default="", help="only these folds (e.g. theo,jackson; dev)")
    parser.add_argument("--run-config", default="", help="extra overrides (tuning runs)")
    parser.add_argument("--row", help="name of the row (default: the mode, e.g. fed-dp-eps8)")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=ENGINES[0],
        help="simulate --engine of the federated rows (local: the folds share their workers)",
    )
    args = parser.parse_args(argv)
    setup_logging(0)
    stop_on_signals()  # a killed row stops its simulation's processes too
    if args.task == "report":
        from experiments.report import write_report

        print(write_report(RESULTS, ROOT / "docs"))
        return 0
    if args.mode is None:
        parser.error("a task needs a mode")
    folds = [f for f in args.folds.split(",") if f]
    if args.mode == "pretrain":
        pretrain(args.task, args.run_config)
        return 0
    run_row(args.task, args.mode, args.epsilon, folds, args.run_config, args.row, args.engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
