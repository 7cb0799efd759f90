"""``fedspeech transcribe`` and ``fedspeech evaluate``: use a trained model directory.

transcribe output (stdout, or ``--output``):

* ``text``: one ``path<TAB>text`` line per file, however many (scripts can rely on it).
  Files that fail are left out of stdout and named in an error on stderr.
* ``json``: a list with ``{path, text, words: [{word, start, end, confidence}], confidence,
  duration_s}`` per file (``confidence`` null when nothing was decoded: a silent file), or
  ``{path, error}`` for a file that failed.
* ``srt``: SubRip subtitles. One file: to stdout or ``--output FILE``; several: ``--output DIR`` gets
  one ``<name>.srt`` per audio file (``<name>`` = the audio file name without its extension, its
  folder's relative path prefixed when names would clash).

Exit codes: 0 if every file was transcribed; 1 if some (or all) failed (the others are still
written, the failures named on stderr); 2 for a bad model directory, missing input or bad
options. ``evaluate`` exits 1 if nothing could be scored; it prints its scores as text or
(``--format json``) one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from fedspeech.app.cli_common import add_format_option, add_renamed

log = logging.getLogger("fedspeech")


MODEL_HELP = "a model directory, or a shipped model's name (en-public-small or @en-public-small)"


def register(sub: Any) -> None:
    """Add the ``transcribe`` and ``evaluate`` commands to the top-level subparsers."""
    p = sub.add_parser("transcribe", help="transcribe audio files or folders with a model")
    p.add_argument("--model", type=Path, required=True, help=MODEL_HELP)
    p.add_argument("audio", nargs="+", type=Path, metavar="AUDIO", help="audio files or folders")
    p.add_argument(
        "--format",
        choices=["text", "json", "srt"],
        default="text",
        help="path<TAB>text lines, JSON with word times and confidences, or SubRip subtitles",
    )
    add_renamed(
        p,
        ("-o", "--output"),
        "--out",
        type=Path,
        metavar="PATH",
        help="write here instead of stdout (--format srt with several files: a folder)",
    )
    p.add_argument(
        "--max-chunk",
        type=_chunk_seconds,
        default=20.0,
        help="longest chunk long audio is cut into, seconds (at least 1)",
    )
    _decoder_options(p)
    p.set_defaults(handler=_transcribe)

    p = sub.add_parser("evaluate", help="WER and CER of a model on a manifest")
    p.add_argument("--model", type=Path, required=True, help=MODEL_HELP)
    p.add_argument("--manifest", type=Path, required=True, help="manifest.tsv with references")
    add_format_option(p, json_flag=True)
    _decoder_options(p)
    p.set_defaults(handler=_evaluate)


def _chunk_seconds(text: str) -> float:
    """``--max-chunk``: a number of seconds >= 1 (a chunk must hold at least a word)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be at least 1 second, got {text}")
    return value


def _decoder_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=int, default=0, help="beam size (0: greedy decoding)")
    p.add_argument("--lm", type=Path, help="KenLM word LM (ARPA or binary) for beam search")
    p.add_argument("--lexicon", type=Path, help="word list / lexicon restricting beam search")
    p.add_argument("--lm-weight", type=float, default=2.0, help="LM weight in beam search")
    p.add_argument("--word-score", type=float, default=0.0, help="score added per word")
    p.add_argument(
        "--blank-bias",
        type=float,
        help="greedy decoding: added to the blank's log-probability (> 0: fewer characters);"
        " default: the value tuned for the model (its card), else 0",
    )
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    p.add_argument(
        "--device",
        type=_device_name,
        default="auto",
        help="where the model runs: auto (CUDA when available, else CPU), cpu, cuda or cuda:N",
    )


def _device_name(text: str) -> str:
    """``--device``: a device's spelling (whether it exists is checked once the command runs)."""
    from fedspeech.devices import DeviceError, check_device_name

    try:
        return check_device_name(text, key="--device")
    except DeviceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _setup(args: argparse.Namespace) -> Any:
    """Load the model dir onto ``--device`` and build the decoder; returns (loaded, decoder)."""
    import torch

    from fedspeech.decoding import make_decoder
    from fedspeech.devices import resolve_device
    from fedspeech.modeldir import load_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, key="--device")  # DeviceError: exit 2, before loading
    loaded = load_model_dir(args.model)
    loaded.model.to(device)
    log.debug("model on %s", device)
    greedy = args.beam == 0 and args.lexicon is None and args.lm is None
    blank_bias = args.blank_bias
    if blank_bias is None:  # the model's own tuned value, for greedy decoding
        blank_bias = loaded.blank_bias if greedy else 0.0
    if greedy:
        log.info("greedy decoding, blank bias %g", blank_bias)
    try:
        decoder = make_decoder(
            loaded.tokenizer,
            loaded.feature_config.frame_shift_s,
            beam_size=args.beam,
            lexicon=args.lexicon,
            lm=args.lm,
            lm_weight=args.lm_weight,
            word_score=args.word_score,
            blank_bias=blank_bias,
        )
    except ValueError as exc:
        from fedspeech.config import ConfigError

        raise ConfigError(str(exc)) from exc  # the CLI reports it as a usage error (exit 2)
    return loaded, decoder


def _transcribe(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from fedspeech.config import ConfigError
    from fedspeech.transcribe import Transcriber, find_audio_files, to_srt

    files = find_audio_files(args.audio)
    if not files:
        raise ConfigError(f"no audio files in {[str(a) for a in args.audio]}")
    several = len(files) > 1 or args.audio[0].is_dir()
    if args.format == "srt" and several and (args.output is None or args.output.is_file()):
        raise ConfigError("--format srt with several files needs --output DIR (one .srt per file)")
    loaded, decoder = _setup(args)
    transcriber = Transcriber(loaded, decoder, max_chunk_s=args.max_chunk)
    results = []
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        for t in transcriber.transcribe_files(files):
            if t.error:
                log.error("%s", t.error)
            results.append(t)
    ok = [t for t in results if t.hypothesis is not None]
    if args.format == "json":
        _emit(json.dumps([t.to_dict() for t in results], indent=2) + "\n", args.output)
    elif args.format == "text":
        lines = [f"{t.path}\t{t.hypothesis.text}\n" for t in ok if t.hypothesis]
        _emit("".join(lines), args.output)
    elif not several:
        for t in ok:
            if t.hypothesis:
                _emit(to_srt(t.hypothesis), args.output)
    else:
        args.output.mkdir(parents=True, exist_ok=True)
        names = _srt_names([t.path for t in ok])
        for t, name in zip(ok, names, strict=True):
            if t.hypothesis:
                (args.output / name).write_text(to_srt(t.hypothesis), encoding="utf-8")
        log.info("wrote %d subtitle files to %s", len(ok), args.output)
    failed = len(results) - len(ok)
    log.log(
        logging.ERROR if failed else logging.INFO,
        "transcribed %d of %d files (%.1f s of audio)%s",
        len(ok),
        len(results),
        sum(t.duration_s for t in ok),
        f"; {failed} failed (named above)" if failed else "",
    )
    return 1 if failed else 0


def _srt_names(paths: list[Path]) -> list[str]:
    """``stem.srt`` per file; where stems clash, the parent folders are prefixed until unique."""
    names = [f"{p.stem}.srt" for p in paths]
    for depth in range(1, 1 + max((len(p.parts) for p in paths), default=0)):
        if len(set(names)) == len(names):
            break
        names = ["__".join([*p.parent.parts[-depth:], p.stem]) + ".srt" for p in paths]
    return names


def _emit(text: str, out: Path | None) -> None:
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        from fedspeech_features.files import atomic_write

        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, text)
        log.info("wrote %s", out)


def _evaluate(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from fedspeech.evaluate import evaluate_manifest

    loaded, decoder = _setup(args)
    with logging_redirect_tqdm():
        result = evaluate_manifest(loaded, args.manifest, decoder=decoder)
    if args.format == "json":
        print(json.dumps({**result.to_dict(), "model": str(args.model)}, indent=2))
    else:
        print(f"WER      {result.wer:.2%}")
        print(f"CER      {result.cer:.2%}")
        print(f"scored   {result.scored} utterances")
        print(f"skipped  {len(result.skipped)} utterances")
    return 0 if result.scored else 1
