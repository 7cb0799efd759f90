"""Real-time factor of ``fedspeech transcribe`` on one CPU thread: greedy, beam, beam + LM.

    python benchmarks/transcribe_rtf.py [--threads 1] [--seconds 180] [--beam 50] [--repeats 2]

RTF = processing seconds / audio seconds (lower is faster; 0.01 = 100x real time). Runs the same
``Transcriber`` as the CLI (chunking, cross-file batching, decoding) over LibriSpeech sentences
from ../shared/data (or $FEDSPEECH_SHARED_DATA) with the default-size model (ModelConfig
defaults: 3-layer BiGRU-256, frames from FeatureConfig defaults). The weights are UNTRAINED
(seeded): feature and model time do not depend on the weights, but beam search does, since an
untrained model's flat posteriors prune badly (a trained model's beam is usually faster). The
beam + LM row uses a bigram ARPA of the same set's transcripts as lexicon and LM.

Columns: audio decoding (file -> waveform) is timed apart; "proc" = features + model + decode.
The best of ``--repeats`` passes is shown per row. A second section transcribes one long file
(``--long-seconds``, default 10 minutes: the first three utterances tiled with 1 s of digital
silence between them, as in tests/test_transcribe.py) through the same chunking, greedy, and
compares its RTF with the short files' (ratio long / short: chunking a long file should cost
about the same per audio second). A last section times the recurrent stack alone at batch 1 and
batched, to show where the model time goes.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install

from fedspeech.decoding import make_decoder
from fedspeech.lm import write_arpa
from fedspeech.model import BiGRUCTC, count_parameters
from fedspeech.model_config import ModelConfig
from fedspeech.modeldir import LoadedModel
from fedspeech.transcribe import Transcriber, TranscribeStats
from fedspeech_features.audio import load_audio
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.text import CharTokenizer, normalize_transcript

TARGET_GREEDY_RTF = 0.01  # issue 3: greedy decoding 100x faster than real time on one thread


def _shared_data() -> Path:
    override = os.environ.get("FEDSPEECH_SHARED_DATA")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "data"


def _utterances(seconds: float) -> tuple[list[Path], list[str]]:
    """Files adding up to ``seconds`` of audio, and every transcript of the set (for the LM)."""
    manifest = _shared_data() / "librispeech_samples" / "manifest.tsv"
    paths, texts, total = [], [], 0.0
    with manifest.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            texts.append(normalize_transcript(row["transcript"]))
            if total < seconds:
                paths.append(manifest.parent / row["path"])
                total += float(row["duration_s"])
    return paths, texts


def _run(transcriber: Transcriber, paths: list[Path], repeats: int) -> TranscribeStats:
    """Best (lowest processing time) of ``repeats`` passes over all files, after a warm-up."""
    list(transcriber.transcribe_files(paths[:2], progress=False))
    best: TranscribeStats | None = None
    for _ in range(repeats):
        transcriber.stats = TranscribeStats()
        list(transcriber.transcribe_files(paths, progress=False))
        s = transcriber.stats
        if best is None or _proc(s) < _proc(best):
            best = s
    assert best is not None
    return best


def _proc(s: TranscribeStats) -> float:
    return s.feature_s + s.model_s + s.decode_s


def _long_file(paths: list[Path], seconds: float, out: Path) -> Path:
    """A WAV of ``seconds``: ``paths`` with 1 s of silence after each, repeated (16 kHz)."""
    rate = 16_000
    gap = np.zeros(rate, dtype=np.float32)
    unit = np.concatenate([part for p in paths for part in (load_audio(p, rate), gap)])
    wave = np.tile(unit, int(np.ceil(seconds * rate / len(unit))))[: int(seconds * rate)]
    sf.write(out, wave, rate, subtype="PCM_16")
    return out


def _rnn_only(model: BiGRUCTC, frames: int, batch: int) -> float:
    """Seconds per audio second of the whole model on random frames of ``batch`` utterances."""
    x = torch.randn(batch, frames, model.cfg.input_dim)
    lengths = torch.full((batch,), frames)
    with torch.inference_mode():
        model(x, lengths)
        start = time.perf_counter()
        model(x, lengths)
        elapsed = time.perf_counter() - start
    return elapsed / (batch * frames * FeatureConfig().frame_shift_s)


def main(argv: list[str] | None = None) -> int:
    """Print the RTF table; exit status 0 (the verdict line says whether the goal was met)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    parser.add_argument("--seconds", type=float, default=180.0, help="audio to transcribe")
    parser.add_argument("--beam", type=int, default=50, help="beam size of the beam rows")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--long-seconds", type=float, default=600.0, help="the long file's audio")
    args = parser.parse_args(argv)

    if not (_shared_data() / "librispeech_samples" / "manifest.tsv").is_file():
        print("../shared/data/librispeech_samples not found: set FEDSPEECH_SHARED_DATA")
        return 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    features = FeatureConfig()
    tokenizer = CharTokenizer()
    model = BiGRUCTC(ModelConfig(input_dim=features.frame_dim, vocab_size=tokenizer.vocab_size))
    loaded = LoadedModel(model.eval(), model.cfg, features, tokenizer)
    paths, texts = _utterances(args.seconds)
    shift = features.frame_shift_s
    print(
        f"transcribe RTF, {args.threads} thread(s), torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"model: {model.cfg.num_layers}-layer {model.cfg.cell.upper()}-{model.cfg.hidden_size} "
        f"(bidirectional={model.cfg.bidirectional}), {count_parameters(model):,} parameters, "
        f"UNTRAINED weights; features {features.frame_dim}-dim every {shift * 1000:.0f} ms"
    )
    header = (
        f"{'decoder':22} {'audio s':>8} {'load s':>7} {'feat s':>7} {'model s':>8} "
        f"{'decode s':>9} {'proc RTF':>9} {'x realtime':>11}"
    )
    print(f"{len(paths)} LibriSpeech utterances\n{header}\n{'-' * len(header)}")
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(limits=args.threads):
        lm = write_arpa(texts, Path(tmp) / "lm.arpa", order=2)
        decoders = {
            "greedy": make_decoder(tokenizer, shift),
            f"beam {args.beam}": make_decoder(tokenizer, shift, beam_size=args.beam),
            f"beam {args.beam} + lexicon + LM": make_decoder(
                tokenizer, shift, beam_size=args.beam, lm=lm
            ),
        }
        rtf = {}
        for label, decoder in decoders.items():
            s = _run(Transcriber(loaded, decoder), paths, args.repeats)
            rtf[label] = _proc(s) / s.audio_s
            print(
                f"{label:22} {s.audio_s:8.1f} {s.load_s:7.2f} {s.feature_s:7.2f} {s.model_s:8.2f} "
                f"{s.decode_s:9.2f} {rtf[label]:9.4f} {1 / rtf[label]:10.0f}x"
            )
        long_path = _long_file(paths[:3], args.long_seconds, Path(tmp) / "long.wav")
        greedy = Transcriber(loaded, decoders["greedy"])
        long = _run(greedy, [long_path], args.repeats)
        long_rtf = _proc(long) / long.audio_s
        print(
            f"\none {long.audio_s / 60:.0f}-minute file, greedy: wall {long.load_s + _proc(long):.2f} s "
            f"(load {long.load_s:.2f} s), proc RTF {long_rtf:.4f}, {1 / long_rtf:.0f}x real time; "
            f"ratio long / short files: {long_rtf / rtf['greedy']:.2f}"
        )
        print("\nmodel alone on random frames (seconds per audio second):")
        for frames, batch in ((667, 1), (667, 8), (6667, 1)):
            print(
                f"  {frames * shift:6.0f} s x batch {batch}: {_rnn_only(model, frames, batch):.4f}"
            )
    verdict = "reached" if rtf["greedy"] <= TARGET_GREEDY_RTF else "NOT reached"
    print(f"goal greedy RTF <= {TARGET_GREEDY_RTF} on {args.threads} thread(s): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
