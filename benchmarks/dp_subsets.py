"""Cost of one DP-SGD step by trainable subset (``trainable``), en-public-small's shape.

    python benchmarks/dp_subsets.py [--repeats 7] [--threads 1] [--batch 16] [--frames 170]

Variants, interleaved in one process (all, norm-bias, head, head-recompute, all, ...) on the same
batch and weights (3x256 BiGRU, 120-dim frames, LayerNorm + head; Opacus ``make_private`` with
FastGRU, noise 1.0, clipping 1.0, Adam; the projections' summed weight gradients skipped and
Opacus keeping each first per-sample gradient as it comes, as ``fedspeech_client.dp_sgd`` runs
it: ``per_sample_grads_only``, ``fresh_grad_samples_taken``):

    all             every weight trains (3.0M)
    all-summed      ``all`` with autograd also computing the projections' summed weight
                    gradients, which DP-SGD never uses (as before they were skipped)
    all-zero-filled ``all`` with Opacus's own accumulation: each per-sample gradient copied into
                    a zero-filled tensor (as before ``fresh_grad_samples_taken``)
    norm-bias       every bias + the head (BitFit)
    head            the output LayerNorm + Linear (15.9k): the frozen GRU layers return the fused
                    kernel's states, nothing is recomputed for autograd
    head-recompute  ``head`` with the FastGRU gate path forced on in every layer, as before the
                    frozen layers skipped it (what the skip saves)
    adapters-r8     rank-8 low-rank adapters' B on every GRU input projection + the head (52.8k)
    non-dp          ``all`` without DP-SGD, as non-private clients train (FastGRU, summed
                    gradients, no Opacus): what DP costs a step at the same batch

Prints the median seconds per step and each variant's ratio to ``all``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install

import fedspeech.fast_gru as fast_gru
from fedspeech.fast_gru_grad_sampler import fresh_grad_samples_taken, per_sample_grads_only
from fedspeech.model import BiGRUCTC, set_trainable, with_fresh_adapters
from fedspeech.model_config import ModelConfig, Trainable
from fedspeech_client.batching import CTCBatch, ctc_loss

# name -> (trainable, force the gate path on, adapter rank, keep the summed gradients,
# Opacus's zero-filled copies, DP-SGD)
VARIANTS: dict[str, tuple[Trainable, bool, int, bool, bool, bool]] = {
    "all": ("all", False, 0, False, False, True),
    "all-summed": ("all", False, 0, True, False, True),
    "all-zero-filled": ("all", False, 0, False, True, True),
    "norm-bias": ("norm-bias", False, 0, False, False, True),
    "head": ("head", False, 0, False, False, True),
    "head-recompute": ("head", True, 0, False, False, True),
    "adapters-r8": ("adapters", False, 8, False, False, True),
    "non-dp": ("all", False, 0, True, False, False),
}
SHAPE = ModelConfig(input_dim=120, hidden_size=256, num_layers=3)


def _step_fn(
    trainable: Trainable,
    rank: int,
    summed: bool,
    private: bool,
    batch: CTCBatch,
    state: dict[str, torch.Tensor],
) -> Callable[[], None]:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    cfg = dataclasses.replace(SHAPE, adapter_rank=rank)
    model = BiGRUCTC(cfg, dp=True)
    model.load_state_dict(with_fresh_adapters(state, cfg))
    params = set_trainable(model, trainable)
    if not private:  # as fedspeech_client.train's non-private epochs
        plain_opt = torch.optim.Adam(params, lr=1e-3)

        def plain_step() -> None:
            plain_opt.zero_grad()
            ctc_loss(model(batch.feats, batch.feat_lens), batch).backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)  # TrainConfig.grad_clip's default
            plain_opt.step()

        return plain_step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine()
        loader = DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=batch.size)
        gsm, opt, _ = engine.make_private(
            module=model,
            optimizer=torch.optim.Adam(params, lr=1e-3),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    if not summed:
        per_sample_grads_only(gsm)

    def step() -> None:
        opt.zero_grad()
        ctc_loss(gsm(batch.feats, batch.feat_lens), batch).backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=170)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, t = args.batch, args.frames
    lengths = torch.linspace(t, 0.6 * t, b).round().long()  # (B,) sorted, as collate_ctc gives
    batch = CTCBatch(
        torch.randn(b, t, 120), lengths, torch.randint(1, 29, (b, 20)), torch.full((b,), 20)
    )
    weights = BiGRUCTC(SHAPE, dp=True).state_dict()
    steps = {
        name: _step_fn(t, rank, summed, private, batch, weights)
        for name, (t, _, rank, summed, _, private) in VARIANTS.items()
    }
    skip = fast_gru._needs_grad
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, (_, recompute, _, _, zero_filled, _) in VARIANTS.items():
            fast_gru._needs_grad = (lambda *_: torch.is_grad_enabled()) if recompute else skip
            fresh = contextlib.nullcontext() if zero_filled else fresh_grad_samples_taken()
            start = time.perf_counter()
            with fresh:
                steps[name]()
            if repeat:
                times[name].append(time.perf_counter() - start)
    fast_gru._needs_grad = skip
    base = statistics.median(times["all"])
    print(
        f"DP-SGD step, batch {b} x {t} frames, {args.threads} thread(s), median of {args.repeats}"
    )
    print("| variant | s / step | vs all |\n|---|---:|---:|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.3f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
