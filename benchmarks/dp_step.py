"""Cost of one training step: non-private fused nn.GRU vs. Opacus DPGRU DP-SGD vs. FastGRU DP-SGD.

    python benchmarks/dp_step.py [--configs small,large] [--threads 1,all] [--repeats 3]
                                 [--device auto|cpu|cuda]

Every variant trains the same ``BiGRUCTC`` (120-dim input, vocabulary 29, LayerNorm + linear head,
CTC loss, Adam, dropout 0.1) from the same weights on the same batch, whose utterance lengths are
spread evenly from T down to 0.6 T (sorted, as ``collate_ctc`` delivers them):

    a           non-private, fused ``nn.GRU`` on a packed batch: the plain training path
    b           DP-SGD, Opacus ``DPGRU`` (hooks on every time step): PrivacyEngine.make_private
    c           DP-SGD, ``FastGRU`` (ours): PrivacyEngine.make_private, the client default
    a-unpacked  reference: non-private ``nn.GRU`` without packing. It ignores the lengths, so it is
                not the model on a ragged batch; it shows the fused kernel's best case
    c-nodp      reference: ``FastGRU`` without Opacus (non-private), to isolate Opacus's share

DP steps use noise 1.0, clipping 1.0 and Poisson-sampling mode; the step itself (forward, loss,
backward, clip + noise + Adam) runs on the fixed batch.

Device: ``--device`` (the run-config key's values: ``auto`` = CUDA when available, else CPU)
puts the models, the batch and the DP noise there; on CUDA every timed step ends with
``torch.cuda.synchronize`` and memory is the CUDA allocator's peak (``max_memory_allocated``
above what was allocated before the first step), one column, not the process RSS.

Time: seconds per step; rounds interleave the variants (a, b, c, ... a, b, c) in one process per
thread count; best and median of ``--repeats`` rounds after one warm-up step each.

Memory: torch's CPU tensors come from malloc, which tracemalloc does not see, so every
(variant, config, threads) runs in a fresh process that builds everything, then runs a warm-up
and 3 steps; "peak" is the process's peak RSS (``VmHWM``, reset just before the first step)
minus its RSS at that moment: activations, gradients, per-sample gradients, optimizer state and
temporaries of the step, not the model or the batch. Under glibc's default allocator this
includes freed heap that malloc keeps (what a user's process really holds). The "live" column
repeats the 1-thread run with ``MALLOC_MMAP_THRESHOLD_=65536``: every block >= 64 KiB then gets
its own mapping, returned on free, so RSS tracks live tensor bytes (that setting slows steps
down; it is for measuring only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install

from fedspeech.devices import DeviceError, resolve_device
from fedspeech.model import BiGRUCTC, convert_model
from fedspeech.model_config import ModelConfig
from fedspeech_client.batching import CTCBatch, ctc_loss

# (batch, frames, hidden units per direction, layers), from issue 5.
CONFIGS = {"small": (16, 200, 128, 2), "large": (32, 300, 256, 3)}
VARIANTS = ["a", "b", "c", "a-unpacked", "c-nodp"]
MEMORY_STEPS = 3
LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
Step = Callable[[], None]


def _batch(config: str) -> CTCBatch:
    batch, frames, _, _ = CONFIGS[config]
    g = torch.Generator().manual_seed(0)
    lengths = torch.linspace(frames, int(0.6 * frames), batch).long()  # (B,) decreasing
    label_lens = lengths // 6  # (B,): about one character per 6 model frames
    labels = torch.randint(1, 29, (batch, int(label_lens.max())), generator=g)  # (B, L)
    return CTCBatch(torch.randn(batch, frames, 120, generator=g), lengths, labels, label_lens)


def _step_fn(variant: str, config: str, device: torch.device) -> Step:
    """A closure running one training step of ``variant`` on ``device`` (model, optimizer, batch
    built here); on CUDA it returns once the GPU has finished the step."""
    batch_size, _, hidden, layers = CONFIGS[config]
    torch.manual_seed(0)
    base = BiGRUCTC(ModelConfig(input_dim=120, hidden_size=hidden, num_layers=layers)).to(device)
    batch = _batch(config).to(device)
    if variant in ("a", "a-unpacked", "c-nodp"):
        net = convert_model(base, dp=variant == "c-nodp").train()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        forward = _unpacked_forward(net) if variant == "a-unpacked" else net

        def plain_step() -> None:
            optimizer.zero_grad()
            ctc_loss(forward(batch.feats, batch.feat_lens), batch).backward()
            nn.utils.clip_grad_norm_(
                net.parameters(), 5.0
            )  # as fedspeech_client.train's plain path
            optimizer.step()
            _sync(device)

        return plain_step
    from opacus import PrivacyEngine  # lazy: the plain variants' processes never import it

    import fedspeech.fast_gru_grad_sampler  # noqa: F401  (registers FastGRU's grad sampler)

    net = convert_model(base, dp=True, dp_rnn="opacus" if variant == "b" else "fast").train()
    loader = DataLoader(TensorDataset(torch.zeros(4 * batch_size, 1)), batch_size=batch_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    gsm, dp_optimizer, _ = engine.make_private(
        module=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )

    def dp_step() -> None:
        dp_optimizer.zero_grad()
        ctc_loss(gsm(batch.feats, batch.feat_lens), batch).backward()
        dp_optimizer.step()
        _sync(device)

    return dp_step


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unpacked_forward(net: BiGRUCTC) -> Callable[[Tensor, Tensor], Tensor]:
    """``BiGRUCTC.forward`` with the GRU run on the padded tensor (no packing, lengths ignored)."""

    def forward(feats: Tensor, lengths: Tensor) -> Tensor:
        y, _ = net.rnn(net.dropout(net.frontend(feats)))  # (B, T, 2H)
        return torch.log_softmax(net.head(net.norm(net.dropout(y))), dim=-1)  # (B, T, V)

    return forward


def _status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from /proc/self/status.

    Not ``ru_maxrss``: Linux carries that across exec, so a child would inherit the parent's peak.
    """
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024  # kB -> MiB


def _child(variant: str, config: str, threads: int, device: torch.device) -> None:
    """Fresh-process memory probe: prints ``{"peak_mib": ...}`` as one JSON line."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    step = _step_fn(variant, config, device)
    if device.type == "cuda":  # the allocator's own peak: the process RSS does not hold it
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        for _ in range(1 + MEMORY_STEPS):
            step()
        peak = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        print(json.dumps({"peak_mib": peak}))
        return
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0): setup's peak drops out
    before = _status_mib("VmRSS")
    for _ in range(1 + MEMORY_STEPS):
        step()
    print(json.dumps({"peak_mib": _status_mib("VmHWM") - before}))


def _memory(variant: str, config: str, threads: int, device: str, *, live: bool) -> float:
    env = {**os.environ, **(LIVE_ENV if live else {})}
    args = [sys.executable, __file__, "--child", variant, "--configs", config, "--device", device]
    out = subprocess.run(
        [*args, "--threads", str(threads)], env=env, check=True, capture_output=True, text=True
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_mib"])


def _times(config: str, threads: int, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of every variant, interleaved rounds, after one warm-up step each."""
    torch.set_num_threads(threads)
    steps = {v: _step_fn(v, config, device) for v in VARIANTS}
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="small,large")
    parser.add_argument("--threads", default="1,all", help="comma list; 'all' = os.cpu_count()")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the steps run: auto = CUDA when available, else CPU",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    cpus = os.cpu_count() or 1
    threads = [cpus if t == "all" else int(t) for t in args.threads.split(",")]
    try:
        device = resolve_device(args.device, key="--device")
    except DeviceError as exc:
        parser.error(str(exc))  # exit 2 with the reason, no traceback
    if args.child:
        _child(args.child, args.configs, threads[0], device)
        return
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, {cpus} CPUs, device {device} ({where}), repeats {args.repeats}"
    )
    for config in args.configs.split(","):
        b, t, h, n = CONFIGS[config]
        print(f"\n### B={b}, T={t}, H={h}, {n} layers, bidirectional ({config})\n")
        times = {n_thr: _times(config, n_thr, args.repeats, device) for n_thr in threads}
        peaks: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
        if not args.skip_memory:
            for v in VARIANTS:
                if device.type == "cuda":
                    peaks[v]["CUDA peak MiB"] = _memory(v, config, 1, args.device, live=False)
                    continue
                for n_thr in threads:
                    peaks[v][f"peak MiB, {n_thr} thr"] = _memory(
                        v, config, n_thr, args.device, live=False
                    )
                peaks[v]["live MiB, 1 thr"] = _memory(v, config, 1, args.device, live=True)
        _print_table(times, peaks)


def _print_table(
    times: dict[int, dict[str, list[float]]], peaks: dict[str, dict[str, float]]
) -> None:
    mem_cols = list(peaks["a"])
    head = [f"{n} thr: best / median s" for n in times] + mem_cols
    print("| variant | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for v in VARIANTS:
        cells = [f"{min(ts[v]):.3f} / {statistics.median(ts[v]):.3f}" for ts in times.values()]
        cells += [f"{peaks[v][c]:.0f}" for c in mem_cols]
        print(f"| {v} | " + " | ".join(cells) + " |")
    print()
    for n_thr, ts in times.items():
        best = {v: min(s) for v, s in ts.items()}
        print(
            f"- {n_thr} thread(s), best step: (c)/(a) = {best['c'] / best['a']:.2f} (goal <= 1.5), "
            f"(b)/(c) = {best['b'] / best['c']:.1f} (goal >= 5); "
            f"(c)/(a-unpacked) = {best['c'] / best['a-unpacked']:.2f}, "
            f"(c)/(c-nodp) = {best['c'] / best['c-nodp']:.2f}"
        )
    for col in mem_cols:
        ratio = peaks["c"][col] / peaks["a"][col]
        print(f"- {col}: (c)/(a) = {ratio:.2f} (goal <= 1.5), (b)/(c) = "
              f"{peaks['b'][col] / peaks['c'][col]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
