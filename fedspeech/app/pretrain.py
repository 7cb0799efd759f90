"""Public pre-training: a starting model that costs the clients no privacy.

Two ways: ``fedspeech pretrain`` (``pretrain``) trains one from public manifests, checkpointed
every epoch and resumable; ``public_pretrained_model`` is what ``simulate`` does with
``pretrain-utterances``, described next.

DP-SGD from random weights on a few hundred utterances per client learns next to nothing at a
useful epsilon (docs/results.md). Weights trained on *public* data are free to use: the server
trains them before round 1 and sends them as round 1's global model. With ``pretrain-utterances``
> 0, ``fedspeech simulate`` builds a synthetic corpus with other sentences and voices than the
clients' (seed ``synthetic-seed + PUBLIC_SEED_OFFSET``), trains the run's model on it without DP
for ``pretrain-epochs``, and uses the result as ``init-model``. The model is cached in
``data-dir`` by everything that determines it, so later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fedspeech.config import RunConfig

log = logging.getLogger("fedspeech")

PUBLIC_SEED_OFFSET = 1000  # the public corpus's seed: never one a client corpus uses by default


def public_pretrained_model(cfg: RunConfig, data_dir: str | Path) -> Path:
    """The model directory pre-trained on the public synthetic corpus (built once, then reused).

    Raises:
        ConfigError: ``pretrain-utterances`` is 0 (nothing to pre-train).
    """
    from fedspeech.config import ConfigError
    from fedspeech_client.central import train_central
    from fedspeech_features.corpora.synthetic import build_synthetic_corpus

    fed = cfg.fed
    if fed.pretrain_utterances < 1:
        raise ConfigError("pretrain-utterances must be >= 1 to pre-train")
    seed = cfg.data.synthetic_seed + PUBLIC_SEED_OFFSET
    train = replace(
        cfg.train, dp=False, epochs=fed.pretrain_epochs, noise_multiplier=None, target_epsilon=None
    )
    recipe = {
        "utterances": fed.pretrain_utterances,
        "seed": seed,
        "features": cfg.features.__dict__,
        "model": cfg.model.__dict__,
        # where it trains is not what it trains: the cache serves a CPU and a GPU run alike
        "train": {k: v for k, v in train.__dict__.items() if k != "device"},
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    model_dir = Path(data_dir) / f"pretrained-{key}"
    if (model_dir / "config.json").is_file():
        log.info("public pre-trained model: %s (cached)", model_dir)
        return model_dir
    manifest, _ = build_synthetic_corpus(
        Path(data_dir) / f"public-n{fed.pretrain_utterances}-s{seed}-{cfg.features.sample_rate}",
        num_utterances=fed.pretrain_utterances,
        seed=seed,
        sample_rate=cfg.features.sample_rate,
    )
    log.info(
        "public pre-training: %d synthetic utterances, %d epochs, no DP (costs no privacy)",
        fed.pretrain_utterances,
        fed.pretrain_epochs,
    )
    central = replace(cfg, train=train, fed=replace(fed, init_model=""))
    train_central(manifest, central, model_dir)
    return model_dir


@dataclass(frozen=True)
class PretrainResult:
    """A finished ``fedspeech pretrain``: the model directory and the record the card is made of."""

    model_dir: Path
    record_file: Path
    record: dict[str, Any]


def pretrain(
    train_manifests: Sequence[Path],
    dev_manifests: Mapping[str, Path],
    cfg: RunConfig,
    run_dir: Path,
    *,
    epochs: int,
    resume: bool = False,
    speeds: Sequence[float] = (),
    eval_manifests: Mapping[str, Path] | None = None,
    command: str = "",
) -> PretrainResult:
    """Train a public model on ``train_manifests`` (non-private, FastGRU), epoch by epoch.

    ``speeds`` (e.g. 0.9, 1.1) adds speed-perturbed copies of every training utterance; each
    epoch trains on one version per utterance. After every epoch the dev sets are scored
    (greedy CER/WER) and the state is checkpointed in ``run_dir/checkpoint`` (replaced whole);
    the epoch with the lowest CER on the *first* dev set so far is kept in ``run_dir/best``.
    ``resume`` continues after the last finished epoch exactly as the uninterrupted run would
    have (``fedspeech_client.epochs``). The end writes ``run_dir/model`` (the best dev epoch,
    else the last), scores it once on ``eval_manifests`` (never used to choose anything), and
    writes ``run_dir/pretrain.json``: data (utterances, speakers, hours per manifest),
    configuration, every epoch's loss and dev scores, the chosen epoch, its eval scores, the
    command and its seconds.

    Raises:
        ConfigError: a fresh run in a folder that holds one, a resume with other settings or
            without a checkpoint, dp = true (public pre-training spends no privacy), epochs < 1.
        DeviceError: the run config's ``device`` is not on this machine.
        FedspeechDataError: a training manifest without a usable utterance.
    """
    from fedspeech.config import ConfigError
    from fedspeech.devices import resolve_device
    from fedspeech.model import BiGRUCTC, plain_state_dict, without_adapters
    from fedspeech.modeldir import load_model_dir, save_model_dir
    from fedspeech.pipeline import initial_weights, load_examples
    from fedspeech_client.epochs import load_epoch_state, save_epoch_state, train_epochs
    from fedspeech_features.errors import FedspeechDataError
    from fedspeech_features.files import atomic_write
    from fedspeech_features.manifest import read_manifest
    from fedspeech_features.text import CharTokenizer

    if cfg.train.dp:
        raise ConfigError("pretrain trains on public data without DP: set dp = false")
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if any(not 0.5 <= f <= 2.0 or f == 1.0 for f in speeds):
        raise ConfigError(f"speed factors must be in [0.5, 2] and not 1, got {list(speeds)}")
    device = resolve_device(cfg.train.device)
    eval_manifests = dict(eval_manifests or {})
    settings = {
        "train": [str(p.resolve()) for p in train_manifests],
        "dev": {k: str(v.resolve()) for k, v in dev_manifests.items()},
        "epochs": epochs,
        "speeds": sorted(speeds),
        # without the device: a pre-training may resume on another one (checkpoints are CPU)
        "run_config": {k: v for k, v in cfg.to_flat().items() if k != "device"},
    }
    checkpoint, settings_file = run_dir / "checkpoint", run_dir / "pretrain_settings.json"
    state = load_epoch_state(checkpoint)
    if resume:
        if state is None:
            raise ConfigError(f"{run_dir}: no pre-training checkpoint to resume")
        saved = json.loads(settings_file.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings if k != "epochs" and saved.get(k) != settings[k])
        if changed:
            raise ConfigError(f"--resume with other {', '.join(changed)} than {settings_file}")
        log.info("resuming the pre-training in %s after epoch %d", run_dir, state.epochs_done)
    elif state is not None:
        raise ConfigError(f"{run_dir} holds a pre-training: --resume it or use another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(settings_file, json.dumps(settings, indent=2) + "\n")

    start = time.perf_counter()
    examples: list[Any] = []
    variants: list[list[Any]] = []
    data: list[dict[str, Any]] = []
    for manifest in train_manifests:
        found, report, summary = load_examples(manifest, cfg.features)
        log.info("%s", summary)
        if not found:
            raise FedspeechDataError(
                f"{manifest}: no usable utterances ({len(report.skipped)} skipped)"
            )
        examples += found
        if speeds:
            variants += _speed_variants(manifest, found, cfg, speeds)
        data.append(
            {
                "manifest": str(manifest),
                "utterances": len(found),
                "speakers": len({e.speaker for e in found}),
                "hours": round(summary.audio_minutes / 60, 3),
            }
        )
    dev_rows = {name: read_manifest(path) for name, path in dev_manifests.items()}
    tokenizer = CharTokenizer()
    model_config = cfg.model.model_config(cfg.features.frame_dim, tokenizer.vocab_size)
    torch.manual_seed(cfg.train.seed)
    model = BiGRUCTC(model_config)
    model.load_state_dict(initial_weights(cfg, model_config))
    log.info(
        "pre-training %s parameters on %d utterances (%.2f h%s) for %d epochs, no DP, on %s",
        f"{sum(p.numel() for p in model.parameters()):,}",
        len(examples),
        sum(d["hours"] for d in data),
        f", speeds 1 and {', '.join(f'{f:g}' for f in speeds)}" if speeds else "",
        epochs,
        device,
    )
    best_dir = run_dir / "best"
    for epoch_state in train_epochs(
        model,
        examples,
        cfg.train,
        epochs,
        resume=state,
        device=device,
        variants=variants,
        frame_block=cfg.features.time_block,
    ):
        scores = _dev_scores(epoch_state.weights, model_config, cfg, tokenizer, dev_rows, device)
        epoch_state.history[-1]["dev"] = scores
        if _best_epoch(epoch_state.history) == epoch_state.epochs_done:
            save_model_dir(best_dir, epoch_state.weights, model_config, cfg.features, tokenizer)
        save_epoch_state(checkpoint, epoch_state)  # after best/: a resume never lacks its best
        log.info(
            "epoch %d/%d saved%s",
            epoch_state.epochs_done,
            epochs,
            "".join(f"; {k} CER {100 * v['cer']:.1f}%" for k, v in scores.items()),
        )
        state = epoch_state
    assert state is not None
    chosen = _best_epoch(state.history)
    weights = state.weights
    if chosen != state.epochs_done:
        weights = plain_state_dict(load_model_dir(best_dir).model)
    log.info("the model is epoch %d (%s)", chosen, "best on dev" if dev_rows else "the last")

    def score(sets: Mapping[str, Sequence[Any]], bias: float = 0.0) -> dict[str, Any]:
        return _dev_scores(weights, model_config, cfg, tokenizer, sets, device, bias)

    decoding = _tune_blank_bias(score, dev_rows)
    evaluated = {name: read_manifest(path) for name, path in eval_manifests.items()}
    plain = score(evaluated)
    tuned = score(evaluated, bias) if (bias := decoding["blank_bias"]) else plain
    record = {
        "data": data,
        "hours": round(sum(d["hours"] for d in data), 3),
        "speakers": sum(d["speakers"] for d in data),
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": state.history,
        "chosen_epoch": chosen,
        "dev": state.history[chosen - 1].get("dev", {}),
        "eval": plain,
        "decoding": decoding,  # greedy with the blank bias tuned on the first dev set
        "eval_blank_bias": tuned,
        "settings": settings,
        "command": command,
        "machine": _machine(device),
        "seconds_this_session": round(time.perf_counter() - start, 1),
        "seconds_training": round(sum(h.get("seconds", 0.0) for h in state.history), 1),
    }
    provenance = {
        "mode": "pretrain",
        "dp": False,
        **{k: record[k] for k in ("data", "hours", "chosen_epoch", "dev", "eval")},
        "decoding": {k: decoding[k] for k in ("blank_bias", "tuned_on")},
    }
    weights, plain_config = without_adapters(weights, model_config)
    model_dir = save_model_dir(
        run_dir / "model", weights, plain_config, cfg.features, tokenizer, provenance
    )
    record_file = run_dir / "pretrain.json"
    atomic_write(record_file, json.dumps(record, indent=2) + "\n")
    return PretrainResult(model_dir, record_file, record)


def _speed_variants(
    manifest: Path, examples: Sequence[Any], cfg: RunConfig, speeds: Sequence[float]
) -> list[list[Any]]:
    """Speed-perturbed versions of ``examples`` (one list per example, in their order).

    A version that was skipped (a copy too short for its transcript at a fast speed) is left
    out of that example's list: the example then trains on its other versions.
    """
    from fedspeech.pipeline import load_examples

    by_speed = []
    for factor in speeds:
        found, _, summary = load_examples(manifest, cfg.features, speed=factor)
        log.info("speed %g: %s", factor, summary)
        by_speed.append({e.path: e for e in found})
    return [[v[e.path] for v in by_speed if e.path in v] for e in examples]


def _machine(device: torch.device) -> str:
    """Where the training ran, in words (CPU threads or the GPU's name)."""
    import os
    import platform

    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _best_epoch(history: Sequence[Mapping[str, Any]]) -> int:
    """The 1-based epoch with the lowest CER on the first dev set (the last epoch if none)."""
    scored = [
        (h["dev"][next(iter(h["dev"]))]["cer"], i) for i, h in enumerate(history) if h.get("dev")
    ]
    return min(scored)[1] + 1 if scored else len(history)


def _dev_scores(
    weights: Mapping[str, Any],
    model_config: Any,
    cfg: RunConfig,
    tokenizer: Any,
    dev_rows: Mapping[str, Sequence[Any]],
    device: torch.device,
    blank_bias: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Greedy WER/CER of ``weights`` on each dev set (in memory: no model directory), on ``device``,
    decoded with ``blank_bias`` (``fedspeech.decoding.GreedyDecoder``)."""
    from fedspeech.decoding import GreedyDecoder
    from fedspeech.evaluate import evaluate_manifest
    from fedspeech.model import BiGRUCTC
    from fedspeech.modeldir import LoadedModel

    if not dev_rows:
        return {}
    model = BiGRUCTC(model_config).eval().to(device)
    model.load_state_dict(dict(weights))
    loaded = LoadedModel(model, model_config, cfg.features, tokenizer)
    decoder = GreedyDecoder(tokenizer, cfg.features.frame_shift_s, blank_bias=blank_bias)
    out = {}
    for name, rows in dev_rows.items():
        result = evaluate_manifest(loaded, rows, decoder=decoder, progress=False)
        out[name] = {"wer": result.wer, "cer": result.cer, "utterances": result.scored}
    return out


BLANK_BIAS_GRID = tuple(i / 4 for i in range(9))  # 0, 0.25, ..., 2: the greedy decoder's blank bias


def _tune_blank_bias(
    score: Callable[[Mapping[str, Sequence[Any]], float], dict[str, Any]],
    dev_rows: Mapping[str, Sequence[Any]],
) -> dict[str, Any]:
    """The blank bias of ``BLANK_BIAS_GRID`` with the lowest CER on the first dev set (the
    smallest of equals; 0 without dev sets), and that set's WER/CER with every candidate.
    ``score(sets, bias)``: the model's scores on ``sets`` decoded with ``bias``."""
    if not dev_rows:
        return {"blank_bias": 0.0, "tuned_on": None, "dev_by_bias": {}}
    name = next(iter(dev_rows))
    scores = {bias: score({name: dev_rows[name]}, bias)[name] for bias in BLANK_BIAS_GRID}
    best = min(scores, key=lambda b: (scores[b]["cer"], b))
    log.info(
        "blank bias %g: %s CER %.1f%% (%.1f%% with 0)",
        best,
        name,
        100 * scores[best]["cer"],
        100 * scores[0.0]["cer"],
    )
    return {
        "blank_bias": best,
        "tuned_on": name,
        "dev_by_bias": {f"{b:g}": scores[b] for b in scores},
    }
