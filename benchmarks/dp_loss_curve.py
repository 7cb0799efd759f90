"""DP-SGD loss curves on real speech: FastGRU (client default) vs. Opacus DPGRU, same seeds.

    python benchmarks/dp_loss_curve.py [--utterances 600] [--epochs 6] [--seeds 3]

FSDD spoken digits from ../shared/data (or $FEDSPEECH_SHARED_DATA), a seeded subset, default
features; a 2-layer BiGRU-96 ``BiGRUCTC`` (dropout 0.1) trained from the same initial weights with
the client's recipe: Poisson sampling, per-sample clipping 1.0, noise 1.0, Adam 3e-3, CTC mean
loss, the same sampling and noise seeds for both layers. Per-sample gradients are identical to
float rounding (tests/test_fast_gru.py), but two random draws land differently: Opacus adds noise
parameter by parameter in ``parameters()`` order (nn.GRU's order for FastGRU, another for DPGRU),
and the dropout masks fall on other frames (DPGRU's padded output is a transposed view). So the
curves should agree within the seed-to-seed spread, which is printed alongside.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install

from fedspeech.model import BiGRUCTC, convert_model
from fedspeech.model_config import DPRNNImpl, ModelConfig
from fedspeech_client.batching import FeatureDataset, as_ctc_batch, collate_ctc, ctc_loss
from fedspeech_features.dataset import Example, extract_manifest
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.manifest import read_manifest
from fedspeech_features.mfcc import FeatureExtractor
from fedspeech_features.text import CharTokenizer


def _shared_data() -> Path:
    override = os.environ.get("FEDSPEECH_SHARED_DATA")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "data"


def _examples(n: int) -> list[Example]:
    rows = read_manifest(_shared_data() / "fsdd" / "manifest.tsv")
    rows = random.Random(0).sample(rows, n)
    examples, _ = extract_manifest(rows, FeatureExtractor(FeatureConfig()), None, CharTokenizer())
    return examples


def _curve(
    start: BiGRUCTC, examples: list[Example], impl: DPRNNImpl, seed: int, epochs: int
) -> tuple[list[float], float, float]:
    """Per-epoch mean training loss, seconds, and epsilon of one DP-SGD run (as fedspeech_client.dp_sgd)."""
    torch.manual_seed(seed)  # dropout
    net = convert_model(start, dp=True, dp_rnn=impl).train()
    loader = DataLoader(
        FeatureDataset(examples),
        batch_size=64,
        collate_fn=collate_ctc,
        generator=torch.Generator().manual_seed(seed),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    gsm, optimizer, dp_loader = engine.make_private(
        module=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=3e-3),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
        noise_generator=torch.Generator().manual_seed(seed + 1),
    )
    losses, begin = [], time.perf_counter()
    for _ in range(epochs):
        total, count = 0.0, 0
        for raw in dp_loader:
            optimizer.zero_grad()
            batch = as_ctc_batch(raw)
            if batch is None:  # empty Poisson draw: fedspeech_client.dp_sgd steps with noise only
                for p in optimizer.params:
                    p.grad_sample = torch.zeros((0, *p.shape))  # (0, *P)
            else:
                loss = ctc_loss(gsm(batch.feats, batch.feat_lens), batch)
                loss.backward()
                total, count = total + loss.item() * batch.size, count + batch.size
            optimizer.step()
        losses.append(total / count)
    return losses, time.perf_counter() - begin, engine.accountant.get_epsilon(delta=1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--utterances", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the")
    torch.set_num_threads(args.threads)
    examples = _examples(args.utterances)
    torch.manual_seed(0)
    start = BiGRUCTC(
        ModelConfig(input_dim=examples[0].feats.shape[1], hidden_size=96, num_layers=2)
    )
    runs: dict[str, list[list[float]]] = {"fast": [], "opacus": []}
    seconds: dict[str, float] = {"fast": 0.0, "opacus": 0.0}
    for seed in range(args.seeds):
        for impl in ("fast", "opacus"):
            losses, secs, eps = _curve(start, examples, impl, seed, args.epochs)
            runs[impl].append(losses)
            seconds[impl] += secs
    print(f"FSDD, {len(examples)} utterances, {args.seeds} seeds, epsilon {eps:.2f} at delta 1e-5")
    print(
        "\n| epoch | FastGRU loss (mean ± sd over seeds) | DPGRU loss | mean abs diff, same seed |"
    )
    print("|---|---|---|---|")
    for e in range(args.epochs):
        fast = [r[e] for r in runs["fast"]]
        opac = [r[e] for r in runs["opacus"]]
        diff = statistics.mean(abs(a - b) for a, b in zip(fast, opac, strict=True))
        print(f"| {e + 1} | {_mean_sd(fast)} | {_mean_sd(opac)} | {diff:.3f} |")
    per_epoch = {k: v / (args.seeds * args.epochs) for k, v in seconds.items()}
    print(
        f"\nseconds per epoch ({args.threads} thread): FastGRU {per_epoch['fast']:.2f}, "
        f"DPGRU {per_epoch['opacus']:.2f} ({per_epoch['opacus'] / per_epoch['fast']:.1f}x)"
    )


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


if __name__ == "__main__":
    main()
