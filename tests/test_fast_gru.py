"""FastGRU: same function as nn.GRU, exact per-sample gradients through Opacus, same DP training.

The exactness tests run on every device present (``tests.conftest.DEVICES``: the CPU, and CUDA
where there is one), in float64 so that the tolerances hold for the GPU kernels too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import opacus
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule, PrivacyEngine
from opacus.layers import DPGRU, DPLSTM
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fedspeech_client.dp_sgd
from fedspeech.adapters import merged_state
from fedspeech.fast_gru_grad_sampler import (
    FastGRU,
    fresh_grad_samples_taken,
    per_sample_grads_only,
)
from fedspeech.model import (
    BiGRUCTC,
    convert_model,
    load_plain_state_dict,
    plain_state_dict,
    set_trainable,
)
from fedspeech.model_config import ModelConfig, Trainable
from fedspeech_client.batching import CTCBatch, ctc_loss
from fedspeech_client.train import TrainConfig, train_local
from tests.conftest import DEVICES

# Opacus's PrivacyEngine without secure_mode (no torchcsprng here; these tests add no noise).
# The Opacus / torch warnings every module sees are filtered in pyproject.toml.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Secure RNG turned off:UserWarning:opacus.privacy_engine"
)


def _reference_gru(gru: FastGRU) -> nn.GRU:
    ref = nn.GRU(
        gru.input_size,
        gru.hidden_size,
        gru.num_layers,
        batch_first=True,
        bidirectional=gru.bidirectional,
    )
    ref.load_state_dict(gru.state_dict())  # same keys: strict load
    param = next(gru.parameters())
    return ref.to(device=param.device, dtype=param.dtype)


def _ctc_batch(
    lengths: list[int],
    dim: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
) -> CTCBatch:
    """Random frames (padding filled with noise too) and one-or-two-symbol labels, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), max(lengths), dim, generator=g, dtype=dtype)  # (B, T, D)
    label_lens = torch.tensor([min(2, n) for n in lengths])  # (B,): CTC needs L <= T
    labels = torch.randint(1, 29, (len(lengths), 2), generator=g)  # (B, 2)
    return CTCBatch(feats, torch.tensor(lengths), labels, label_lens).to(torch.device(device))


def _worst_per_sample_error(dp_model: BiGRUCTC, batch: CTCBatch) -> float:
    """Max relative error of Opacus's grad_sample vs. each utterance's own backward pass.

    Relative to each parameter's largest per-example gradient entry. The reference runs the
    plain model (fused, packed nn.GRU) on each utterance alone, cut to its length.
    """
    reference = convert_model(dp_model, dp=False)
    gsm = GradSampleModule(dp_model, batch_first=True, loss_reduction="mean")
    assert per_sample_grads_only(gsm) == 2 * len(dp_model.rnn.ih)  # as DP-SGD runs it
    ctc_loss(gsm(batch.feats, batch.feat_lens), batch).backward()
    samples = {
        name.removeprefix("_module."): p.grad_sample
        for name, p in gsm.named_parameters()
        if p.requires_grad
    }
    assert all(s is not None for s in samples.values()), "a trained weight has no grad_sample"
    # The projections' summed gradients were skipped: only the per-sample ones exist.
    assert all(p.grad is None for name, p in dp_model.rnn.named_parameters() if "_l" in name)
    worst = 0.0
    for i in range(batch.size):
        n, m = int(batch.feat_lens[i]), int(batch.label_lens[i])
        single = CTCBatch(
            batch.feats[i : i + 1, :n], batch.feat_lens[i : i + 1], batch.labels[i : i + 1, :m],
            batch.label_lens[i : i + 1],
        )  # fmt: skip
        reference.zero_grad()
        ctc_loss(reference(single.feats, single.feat_lens), single).backward()
        for name, p in reference.named_parameters():
            if name not in samples:  # fixed in the DP model
                continue
            assert p.grad is not None
            scale = p.grad.abs().max().clamp_min(1e-30)
            worst = max(worst, float((samples[name][i] - p.grad).abs().max() / scale))
    return worst


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_forward_and_gradients_equal_packed_nn_gru(
    bidirectional: bool, num_layers: int, device: str
) -> None:
    # Prepare: ragged, unsorted lengths; padding frames hold noise
    torch.manual_seed(0)
    gru = FastGRU(5, 4, num_layers, bidirectional=bidirectional).double().to(device)
    ref = _reference_gru(gru)
    lengths = torch.tensor([5, 9, 1, 7])  # CPU, as pack_padded_sequence wants them
    x = torch.randn(4, 9, 5, dtype=torch.float64).to(device)
    weights = torch.randn(4, 9, 4 * (2 if bidirectional else 1), dtype=torch.float64).to(device)
    # Execute
    y, h_n = gru(x, lengths)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    y_ref, h_ref = ref(packed)
    y_ref, _ = pad_packed_sequence(y_ref, batch_first=True, total_length=9)
    ((y * weights).sum() + h_n.square().sum()).backward()
    ((y_ref * weights).sum() + h_ref.square().sum()).backward()
    # Assert: outputs (zero on padding), final states and summed gradients agree (float64)
    assert y.device.type == device
    assert all(p.grad is not None and p.grad.device.type == device for p in gru.parameters())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(h_n, h_ref, rtol=0, atol=1e-12)
    for (name, p), (ref_name, q) in zip(
        gru.named_parameters(), ref.named_parameters(), strict=True
    ):
        assert name == ref_name and p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)


def test_state_dict_is_that_of_nn_gru() -> None:
    gru = FastGRU(3, 2, 2, bidirectional=True)
    ref = nn.GRU(3, 2, 2, batch_first=True, bidirectional=True)
    assert list(gru.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in gru.named_parameters()] == [n for n, _ in ref.named_parameters()]
    gru.load_state_dict(ref.state_dict())  # strict, both ways
    ref.load_state_dict(gru.state_dict())
    assert torch.equal(gru.ih[3].weight, ref.weight_ih_l1_reverse)  # projections share tensors
    assert sum(p.numel() for p in gru.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("frontend_dim", [0, 4])
def test_per_sample_gradients_equal_single_example_backward(
    bidirectional: bool, num_layers: int, frontend_dim: int, device: str
) -> None:
    """Opacus's grad_sample (FastGRU) == every utterance's own gradient; float64, < 1e-9.

    With and without a front-end: without one, the GRU's input needs no gradient and Opacus's
    FastGRU-level hook fires before the projections' hooks; with one, after them.
    """
    torch.manual_seed(1)
    cfg = ModelConfig(
        input_dim=5,
        hidden_size=3,
        num_layers=num_layers,
        bidirectional=bidirectional,
        dropout=0.0,
        frontend_dim=frontend_dim,
    )
    model = BiGRUCTC(cfg, dp=True).double().to(device)
    assert isinstance(model.rnn, FastGRU)
    batch = _ctc_batch([4, 8, 1, 6, 8], 5, device=device)  # unsorted
    worst = _worst_per_sample_error(model, batch)
    assert worst < 1e-9, f"max relative per-sample gradient error {worst:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("trainable", "freeze_layers", "expected"),
    [("head", 0, 4), ("norm-bias", 0, 1 + 2 * 4 + 4), ("norm-bias", 1, 4 + 4)],
)
def test_per_sample_gradients_are_exact_for_every_trainable_subset(
    trainable: Trainable, freeze_layers: int, expected: int, device: str
) -> None:
    """Only the chosen weights get per-sample gradients, each equal to the utterance's own."""
    torch.manual_seed(2)
    cfg = ModelConfig(input_dim=5, hidden_size=3, num_layers=2, dropout=0.0, frontend_dim=4)
    model = BiGRUCTC(cfg, dp=True).double().to(device)
    trained = set_trainable(model, trainable, freeze_layers)
    assert len(trained) == expected  # front-end bias, 4 GRU biases a layer, LayerNorm + head 4
    batch = _ctc_batch([4, 8, 1, 6, 8], 5, device=device)
    worst = _worst_per_sample_error(model, batch)
    assert worst < 1e-9, f"max relative per-sample gradient error {worst:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("trainable", "freeze_layers", "expected"),
    [("adapters", 0, 4 + 4), ("adapters", 1, 2 + 4), ("all", 0, 2 + 8 * 2 + 4 + 4)],
)
def test_per_sample_gradients_are_exact_with_adapters(
    trainable: Trainable, freeze_layers: int, expected: int, device: str
) -> None:
    """Low-rank adapters' B factors (and whatever else trains) get exact per-sample gradients.

    B is drawn away from its zero start, so the gradient also flows through every adapter into
    the layer below; A stays fixed and gets none. The adapted DP model equals the plain one with
    the adapters merged into its input projections.
    """
    torch.manual_seed(3)
    cfg = ModelConfig(
        input_dim=5, hidden_size=3, num_layers=2, dropout=0.0, frontend_dim=4, adapter_rank=2
    )
    model = BiGRUCTC(cfg, dp=True).double().to(device)
    assert model.adapters is not None
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.normal_()
    trained = set_trainable(model, trainable, freeze_layers)
    assert len(trained) == expected  # 4 adapters (one per layer and direction) + head 4
    batch = _ctc_batch([4, 8, 1, 6, 8], 5, device=device)
    worst = _worst_per_sample_error(model, batch)
    assert worst < 1e-9, f"max relative per-sample gradient error {worst:.3g}"
    plain = BiGRUCTC(dataclasses.replace(cfg, adapter_rank=0)).double().to(device)
    load_plain_state_dict(plain, merged_state(plain_state_dict(model)))
    valid = torch.arange(8, device=device)[None, :] < batch.feat_lens.to(device)[:, None]
    with torch.no_grad():
        diff = model(batch.feats, batch.feat_lens) - plain(batch.feats, batch.feat_lens)
    assert float(diff[valid].abs().max()) < 1e-12


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    dim=st.integers(1, 4),
    hidden=st.integers(3, 4),  # LayerNorm over < 3 units has (almost) zero gradients
    num_layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_per_sample_gradients_randomized(
    lengths: list[int], dim: int, hidden: int, num_layers: int, bidirectional: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        input_dim=dim,
        hidden_size=hidden,
        num_layers=num_layers,
        bidirectional=bidirectional,
        dropout=0.0,
    )
    model = BiGRUCTC(cfg, dp=True).double()
    batch = _ctc_batch(lengths, dim, seed=seed)
    # Forward equals the fused packed nn.GRU on every valid frame...
    plain = convert_model(model, dp=False)
    valid = torch.arange(max(lengths))[None, :] < batch.feat_lens[:, None]  # (B, T)
    with torch.no_grad():
        diff = (model(batch.feats, batch.feat_lens) - plain(batch.feats, batch.feat_lens))[valid]
    assert float(diff.abs().max()) < 1e-12
    # ... and per-sample gradients equal per-example backward passes.
    assert _worst_per_sample_error(model, batch) < 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_padding_values_never_matter(device: str) -> None:
    torch.manual_seed(2)
    gru = FastGRU(3, 4, 2, bidirectional=True).double().to(device)
    gsm = GradSampleModule(gru, batch_first=True, loss_reduction="sum")
    lengths = torch.tensor([2, 5])
    x = torch.randn(2, 5, 3, dtype=torch.float64).to(device)
    results = []
    for fill in (0.0, float("nan"), 1e30):
        x_pad = x.clone()
        x_pad[0, 2:] = fill  # the first utterance's padding
        y, _ = gsm(x_pad, lengths)
        y.square().sum().backward()
        results.append((y.detach(), [p.grad_sample.clone() for p in gsm.parameters()]))
        gsm.zero_grad()
    for y, samples in results[1:]:
        torch.testing.assert_close(y, results[0][0], rtol=0, atol=0)
        for got, want in zip(samples, results[0][1], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("summed_grads", "fresh"), [(True, False), (False, False), (False, True)])
def test_privacy_engine_clips_per_sample_gradients_from_fast_gru(
    device: str, summed_grads: bool, fresh: bool
) -> None:
    """End to end: make_private (hooks), no noise, every utterance clipped.

    The step must be ``-lr/B * sum_i clip(g_i)`` with ``g_i`` each utterance's gradient in the
    plain (nn.GRU) model: Opacus's optimizer clipped exactly FastGRU's per-sample gradients,
    whether or not autograd also computed the projections' summed gradients (DP-SGD skips them),
    and whether or not Opacus kept them as they came (``fresh_grad_samples_taken``, as DP-SGD runs).
    """
    torch.manual_seed(3)
    cfg = ModelConfig(input_dim=5, hidden_size=4, num_layers=2, dropout=0.0)
    model = BiGRUCTC(cfg, dp=True).double().to(device)
    plain = convert_model(model, dp=False)  # on the same device
    batch = _ctc_batch([6, 3, 8], 5, seed=4, device=device)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(3, 1)), 3)
    lr, clip = 0.5, 1e-3
    gsm, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        noise_generator=torch.Generator(device=device),  # as fedspeech_client.dp_sgd passes it
    )
    assert isinstance(optimizer, DPOptimizer)
    if not summed_grads:
        per_sample_grads_only(gsm)
    before = {name: p.detach().clone() for name, p in plain.named_parameters()}
    with fresh_grad_samples_taken() if fresh else contextlib.nullcontext(False) as taken:
        assert taken == fresh
        ctc_loss(gsm(batch.feats, batch.feat_lens), batch).backward()
    optimizer.step()
    expected = {name: torch.zeros_like(p) for name, p in before.items()}
    for i in range(batch.size):
        n = int(batch.feat_lens[i])
        single = CTCBatch(batch.feats[i : i + 1, :n], batch.feat_lens[i : i + 1],
                          batch.labels[i : i + 1], batch.label_lens[i : i + 1])  # fmt: skip
        plain.zero_grad()
        ctc_loss(plain(single.feats, single.feat_lens), single).backward()
        grads = {name: p.grad for name, p in plain.named_parameters() if p.grad is not None}
        norm = torch.stack([g.norm() for g in grads.values()]).norm()
        assert norm > clip
        for name, g in grads.items():
            expected[name] += g * (clip / (norm + 1e-6))  # Opacus's flat clipping factor
    trained = dict(model.named_parameters())
    for name, start in before.items():
        want = start - lr * expected[name] / batch.size
        torch.testing.assert_close(trained[name].detach(), want, rtol=0, atol=1e-12)


@dataclass(frozen=True)
class _Utt:
    feats: torch.Tensor
    labels: torch.Tensor


def test_dp_training_follows_the_same_loss_curve_as_opacus_dpgru(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Client DP-SGD path (Poisson sampling, clipping, SGD), same seeds: fast vs DPGRU.

    Both see the same batches and per-sample gradients agree to float32 rounding, so each epoch's
    loss agrees to rounding. Two random draws are made equal on purpose: the noise is negligible
    (Opacus draws it parameter by parameter in ``parameters()`` order, which differs between
    nn.GRU's and DPGRU's layouts) and dropout is off (the same dropout draws land on different
    frames: DPGRU's padded output is a transposed view). With both, the runs are statistically
    equal but not identical; docs/dp_gru.md compares those curves over several seeds.
    """
    g = torch.Generator().manual_seed(5)
    examples = [
        _Utt(torch.randn(int(torch.randint(8, 20, (1,), generator=g)), 6, generator=g),
             torch.randint(1, 29, (3,), generator=g))
        for _ in range(12)
    ]  # fmt: skip
    cfg = TrainConfig(
        epochs=1, batch_size=4, lr=0.05, optimizer="sgd", noise_multiplier=1e-6, dp_seed=7
    )
    torch.manual_seed(0)
    start = BiGRUCTC(ModelConfig(input_dim=6, hidden_size=8, num_layers=2, dropout=0.0))

    def curve() -> tuple[list[float], dict[str, torch.Tensor]]:
        model, losses, state = convert_model(start, dp=False), [], None
        for _ in range(4):  # four calls of one epoch: the ledger carries over, like FL rounds
            result = train_local(model, examples, cfg, privacy_state=state)
            load_plain_state_dict(model, result.state_dict)
            losses.append(result.metrics["train-loss"])
            state = result.privacy_state
        return losses, result.state_dict

    fast_losses, fast_state = curve()
    opacus = functools.partial(convert_model, dp_rnn="opacus")
    monkeypatch.setattr(fedspeech_client.dp_sgd, "convert_model", opacus)
    opacus_losses, opacus_state = curve()
    assert fast_losses == pytest.approx(opacus_losses, rel=1e-4)
    assert fast_losses[-1] < fast_losses[0]  # it learns
    for name, value in opacus_state.items():
        torch.testing.assert_close(fast_state[name], value, rtol=0, atol=1e-5)


def test_model_selects_the_dp_recurrent_layer() -> None:
    gru = ModelConfig(input_dim=4, hidden_size=3, num_layers=1)
    assert isinstance(BiGRUCTC(gru, dp=True).rnn, FastGRU)
    assert isinstance(BiGRUCTC(gru, dp=True, dp_rnn="opacus").rnn, DPGRU)
    lstm = ModelConfig(input_dim=4, hidden_size=3, num_layers=1, cell="lstm")
    assert isinstance(BiGRUCTC(lstm, dp=True).rnn, DPLSTM)  # no fast LSTM: Opacus's layer
    with pytest.raises(ValueError, match="dp_rnn"):
        BiGRUCTC(gru, dp=True, dp_rnn="cudnn")  # type: ignore[arg-type]


def test_rejects_what_it_does_not_support() -> None:
    with pytest.raises(ValueError, match="batch-first"):
        FastGRU(3, 2, batch_first=False)
    gru = FastGRU(3, 2)
    with pytest.raises(ValueError, match="lengths"):
        gru(torch.zeros(2, 4, 3), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="lengths"):
        gru(torch.zeros(2, 4, 3), torch.tensor([5, 4]))


class _Twice(nn.Module):
    """One Linear applied twice in a pass: Opacus adds its two per-sample gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.tanh(self.linear(x)))


def test_fresh_grad_samples_equal_opacus_own_also_for_a_module_used_twice() -> None:
    # Prepare: the same model and batch (5 samples), hooked by Opacus
    torch.manual_seed(0)
    model, x = GradSampleModule(_Twice().double()), torch.randn(5, 3, dtype=torch.double)

    def per_sample() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
        return {n: p.grad_sample.clone() for n, p in model.named_parameters()}

    # Execute: Opacus's accumulation, then the fresh one
    expected = per_sample()
    with fresh_grad_samples_taken() as taken:
        got = per_sample()
    # Assert: the same per-sample gradients (the second use added, not written into the first)
    assert taken
    assert got.keys() == expected.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_fresh_grad_samples_leave_other_opacus_versions_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import opacus.grad_sample.grad_sample_module as gsm_module

    original = gsm_module.create_or_accumulate_grad_sample
    monkeypatch.setattr(opacus, "__version__", "1.7.0")
    with fresh_grad_samples_taken() as taken:
        assert not taken and gsm_module.create_or_accumulate_grad_sample is original
    monkeypatch.undo()
    with fresh_grad_samples_taken() as taken:
        assert taken and gsm_module.create_or_accumulate_grad_sample is not original
    assert gsm_module.create_or_accumulate_grad_sample is original  # restored
