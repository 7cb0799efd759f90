"""A pre-trained model made shippable: float16 weights, its training record and a model card.

``export_model`` turns a finished ``fedspeech pretrain`` run into a model directory that
``load_model_dir`` (and so ``init-model = "@name"`` and ``fedspeech transcribe --model name``)
reads: ``model.safetensors`` (float16: half the bytes; widened to float32 on load),
``config.json``, ``pretrain.json`` (the run's record, copied as the recipe wrote it) and
``card.md``. Every number on the card is rendered from ``pretrain.json`` by ``render_card``:
nothing on it is typed by hand, and ``tests/test_shipped_model.py`` re-renders the shipped card
from the shipped record to prove it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("fedspeech")

CARD_FILE = "card.md"
RECORD_FILE = "pretrain.json"
SOURCES_KEY = "sources"  # in pretrain.json after export: licence and origin per training manifest


def export_model(
    run_dir: Path,
    out_dir: Path,
    *,
    name: str,
    sources: Mapping[str, Mapping[str, str]],
    recipe: str = "",
) -> Path:
    """Write ``run_dir``'s model as a shippable model directory ``out_dir`` (replaced whole).

    Args:
        run_dir: a finished ``fedspeech pretrain`` folder (``model/`` and ``pretrain.json``).
        out_dir: the model directory to write.
        name: the model's name (``@name``).
        sources: per training manifest (its file stem), ``licence`` and ``source`` texts.
        recipe: the command that rebuilds the model (shown on the card).

    Raises:
        ValueError: a training manifest without a ``sources`` entry (a card must name every
            licence), or a weight that float16 cannot hold.
    """
    import torch
    from safetensors.torch import save_file

    from fedspeech.model import plain_state_dict
    from fedspeech.modeldir import load_model_dir
    from fedspeech_features.files import atomic_directory, atomic_write

    record = json.loads((run_dir / RECORD_FILE).read_text(encoding="utf-8"))
    stems = [Path(d["manifest"]).stem for d in record["data"]]
    missing = [s for s in stems if s not in sources]
    if missing:
        raise ValueError(f"no licence/source given for the training manifests {missing}")
    record = {
        **record,
        "name": name,
        "recipe": recipe,
        SOURCES_KEY: {s: dict(sources[s]) for s in stems},
    }
    loaded = load_model_dir(run_dir / "model")
    weights = plain_state_dict(loaded.model)
    largest = max(float(w.abs().max()) for w in weights.values())
    if largest > float(torch.finfo(torch.float16).max):
        raise ValueError(f"a weight of magnitude {largest:g} does not fit float16")
    half = {k: v.to(torch.float16).contiguous() for k, v in weights.items()}
    rounding = max(float((half[k].float() - w).abs().max()) for k, w in weights.items())
    record["float16_max_rounding"] = rounding
    config = json.loads((run_dir / "model" / "config.json").read_text(encoding="utf-8"))
    with atomic_directory(out_dir) as tmp:
        save_file(half, str(tmp / "model.safetensors"), metadata={"format": "fedspeech-model"})
        atomic_write(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        atomic_write(tmp / RECORD_FILE, json.dumps(record, indent=2) + "\n")
        atomic_write(tmp / CARD_FILE, render_card(record))
        for path in tmp.iterdir():  # package data: readable by every user (a container's too)
            path.chmod(0o644)
        tmp.chmod(0o755)
    log.info("exported %s to %s (float16, largest rounding %.2g)", name, out_dir, rounding)
    return out_dir


def render_card(record: Mapping[str, Any]) -> str:
    """The model card (Markdown) of an exported ``pretrain.json`` record."""
    flat = record["settings"]["run_config"]
    chosen = record["chosen_epoch"]
    epochs = record["epochs"]
    hours_trained = sum(e.get("seconds", 0.0) for e in epochs) / 3600
    speeds = record["settings"].get("speeds") or []
    lines = [
        f"# {record['name']}",
        "",
        f"A public English speech recognizer shipped with fedspeech: load it with "
        f'`init-model = "@{record["name"]}"` (the start of a federated DP fine-tuning) or '
        f"`fedspeech transcribe --model {record['name']} audio.flac`. It was trained on "
        "public speech only, without DP: using it costs no client any privacy.",
        "",
        "## Model",
        "",
        f"- Bidirectional {flat['rnn-cell'].upper()} CTC acoustic model, {flat['num-layers']} "
        f"layers x {flat['hidden-size']} units per direction, {record['parameters']:,} "
        f"parameters, characters out (greedy decoding; no language model).",
        f"- Features: {flat['n-mfcc']} MFCC from {flat['n-mels']} mel bands, "
        f"{flat['win-ms']:g} ms windows every {flat['hop-ms']:g} ms, per-utterance CMVN, "
        f"{flat['stack']} frames stacked and subsampled by {flat['subsample']}; audio at "
        f"{flat['sample-rate']} Hz (other rates are resampled).",
        f"- Weights stored in float16 (largest rounding {record['float16_max_rounding']:.1e}); "
        "loaded as float32.",
        "",
        "## Training data",
        "",
        f"{record['hours']:.2f} hours, {record['speakers']} speakers (before speed perturbation).",
        "",
        "| manifest | utterances | speakers | hours | licence | source |",
        "|---|---:|---:|---:|---|---|",
    ]
    for data in record["data"]:
        src = record[SOURCES_KEY][Path(data["manifest"]).stem]
        lines.append(
            f"| {Path(data['manifest']).stem} | {data['utterances']} | {data['speakers']} | "
            f"{data['hours']:.2f} | {src['licence']} | {src['source']} |"
        )
    lines += [
        "",
        "## Training",
        "",
        f"- {len(epochs)} epochs of Adam (lr {flat['lr']:g}, one warm-up epoch, then a cosine "
        f"to 5%), batches of {flat['batch-size']}, gradient clipping at {flat['grad-clip']:g}, "
        f"dropout {flat['dropout']:g}, SpecAugment {'on' if flat['spec-augment'] else 'off'}, "
        + _tempo(flat)
        + (
            f"speed perturbation {', '.join(f'{s:g}' for s in speeds)} (one version of every "
            "utterance per epoch)."
            if speeds
            else "no speed perturbation."
        ),
        f"- The shipped weights are epoch {chosen}: the lowest CER on the first dev set.",
        f"- Training time: {hours_trained:.2f} hours on {record['machine']}.",
        "",
        "## Scores (greedy decoding, speakers never trained on)",
        "",
    ]
    decoding = record.get("decoding") or {"blank_bias": 0.0}
    bias = decoding["blank_bias"]
    tuned_dev = decoding.get("dev_by_bias", {}).get(f"{bias:g}")
    if bias:
        lines += [
            f"Two greedy decodings: plain best path (blank bias 0), and with blank bias {bias:g}"
            f" added to the blank's log-probability (fewer inserted characters), the value of "
            f"{', '.join(decoding['dev_by_bias'])} with the lowest CER on {decoding['tuned_on']}."
            f" `fedspeech transcribe`/`evaluate` use {bias:g} by default (`--blank-bias 0` for"
            " the plain path); federated rounds score with the plain path.",
            "",
            f"| set | role | utterances | WER | CER | WER (bias {bias:g}) | CER (bias {bias:g}) |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
    else:
        lines += ["| set | role | utterances | WER | CER |", "|---|---|---:|---:|---:|"]
    rows: list[tuple[str, Mapping[str, Any], Mapping[str, Any]]] = [
        ("dev (chose the epoch)", record["dev"], {})
    ]
    if tuned_dev:
        rows = [
            ("dev (chose the epoch and bias)", record["dev"], {decoding["tuned_on"]: tuned_dev})
        ]
    rows.append(("eval", record["eval"], record.get("eval_blank_bias", {})))
    for role, scores, with_bias in rows:
        for set_name, s in scores.items():
            line = (
                f"| {set_name} | {role} | {s['utterances']} | {100 * s['wer']:.1f}% | "
                f"{100 * s['cer']:.1f}% |"
            )
            if bias:
                t = with_bias.get(set_name)
                line += f" {100 * t['wer']:.1f}% | {100 * t['cer']:.1f}% |" if t else " | |"
            lines.append(line)
    lines += [
        "",
        "Per-epoch loss and dev scores are in `pretrain.json` beside this card.",
        "",
        "## Rebuild",
        "",
        "```",
        record["recipe"] or record["command"],
        "```",
        "",
        "The recorded training command was:",
        "",
        "```",
        record["command"],
        "```",
        "",
        "## Limits",
        "",
        "- English read speech; characters only (a-z, space, apostrophe): digits and "
        "punctuation are never written.",
        "- Small data: expect high error rates on accented, spontaneous or noisy speech. It "
        "exists to be adapted (federated DP fine-tuning), not to be used as it is.",
        "",
    ]
    return "\n".join(lines)


def _tempo(flat: Mapping[str, Any]) -> str:
    """The tempo augmentation of a run config, for the card (older records lack the keys)."""
    share = flat.get("tempo-augment", 0.0)
    if not share:
        return "no tempo augmentation, "
    return f"tempo slow-down of {100 * share:g}% of the utterances (1-{flat['tempo-max']:g}x), "
