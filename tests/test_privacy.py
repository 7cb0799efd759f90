"""Privacy: the ledger and its accountants, noise calibration, per-sample gradients, composition
across calls."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer

import fedspeech.fast_gru_grad_sampler  # noqa: F401  FastGRU's grad samplers, as dp_sgd registers them
from fedspeech.model import BiGRUCTC, convert_model, load_plain_state_dict
from fedspeech.model_config import ModelConfig
from fedspeech.privacy_ledger import (
    PrivacyBudgetError,
    PrivacyLedger,
    calibrate_noise_multiplier,
    epsilon_of,
)
from fedspeech_client.batching import CTCBatch, as_ctc_batch, collate_ctc, ctc_loss
from fedspeech_client.train import TrainConfig, train_local
from tests.conftest import tiny_model

DELTA = 1e-5


@dataclass(frozen=True)
class _Utt:
    feats: torch.Tensor
    labels: torch.Tensor


def _examples(n: int, *, seed: int = 0, dim: int = 6) -> list[_Utt]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        frames = int(torch.randint(6, 14, (1,), generator=g))
        labels = torch.randint(1, 29, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g)
        out.append(_Utt(torch.randn(frames, dim, generator=g), labels))
    return out


# ---------------------------------------------------------------- PrivacyLedger


def test_ledger_json_round_trip_and_epsilon_from_opacus() -> None:
    history = ((1.1, 0.25, 12), (0.9, 1 / 3, 7))
    ledger = PrivacyLedger(DELTA, history)
    restored = PrivacyLedger.from_json(ledger.to_json())
    assert restored == ledger
    reference = RDPAccountant()
    reference.history = list(history)
    assert restored.epsilon("rdp") == reference.get_epsilon(delta=DELTA)
    assert PrivacyLedger(DELTA).epsilon("rdp") == PrivacyLedger(DELTA).epsilon("prv") == 0.0
    with pytest.raises(ValueError, match="no delta"):
        PrivacyLedger.from_json('{"history": []}')
    with pytest.raises(ValueError, match="not a privacy ledger"):
        PrivacyLedger.from_json("[1, 2]")


def test_a_file_of_the_per_accountant_format_reads_with_the_delta_given() -> None:
    legacy = '{"mechanism": "prv", "history": [[1.0, 0.1, 50]]}'
    assert PrivacyLedger.from_json(legacy, delta=DELTA) == PrivacyLedger(DELTA, ((1.0, 0.1, 50),))


def test_the_same_history_is_evaluated_by_either_accountant() -> None:
    ledger = PrivacyLedger(DELTA, ((1.0, 0.1, 50),))
    for name, accountant in (("prv", PRVAccountant()), ("rdp", RDPAccountant())):
        accountant.history = [(1.0, 0.1, 50)]
        assert ledger.epsilon(name) == pytest.approx(accountant.get_epsilon(delta=DELTA), rel=1e-9)


def test_record_merges_consecutive_entries_and_delta_only_goes_down() -> None:
    ledger = PrivacyLedger(DELTA).record(1.0, 0.5).record(1.0, 0.5).record(1.0, 0.25, 3)
    assert ledger.history == ((1.0, 0.5, 2), (1.0, 0.25, 3)) and ledger.num_steps == 5
    assert ledger.at_delta(1e-3) is ledger  # a larger delta would shrink epsilon: refused
    smaller = ledger.at_delta(1e-7)
    assert smaller.delta == 1e-7 and smaller.epsilon() > ledger.epsilon()
    merged = ledger.merge(PrivacyLedger(1e-6, ((2.0, 0.1, 4),)))
    assert merged.delta == 1e-6 and merged.num_steps == 9


def test_prv_failure_falls_back_to_the_rdp_bound_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: Opacus's PRV composition failing as it does upstream (opacus#601)
    def broken(self: PRVAccountant, delta: float, **kwargs: object) -> float:
        raise RuntimeError("Discrete mean differs significantly from continuous mean.")

    monkeypatch.setattr(PRVAccountant, "get_epsilon", broken)
    ledger = PrivacyLedger(DELTA, ((0.8, 0.2, 30),))
    # Execute
    with caplog.at_level("WARNING"):
        eps = ledger.epsilon("prv")
        sigma = calibrate_noise_multiplier(
            target_epsilon=eps + 5, sample_rate=0.2, steps=10, prior=ledger, accountant="prv"
        )
    # Assert: the RDP epsilon of the same history, and a warning naming the history and delta
    assert eps == epsilon_of(ledger.history, DELTA, "rdp")
    assert sigma > 0
    assert "PRV accountant failed on history [(0.8, 0.2, 30)] at delta 1e-05" in caplog.text
    assert "RuntimeError" in caplog.text


def test_would_exceed_composes_with_history() -> None:
    ledger = PrivacyLedger(DELTA, ((1.0, 0.1, 100),))
    spent = ledger.epsilon()
    both = PrivacyLedger(DELTA, ((1.0, 0.1, 200),)).epsilon()
    assert not ledger.would_exceed(both + 1e-9, "rdp", 1.0, 0.1, 100)
    assert ledger.would_exceed(both - 1e-3, "rdp", 1.0, 0.1, 100)
    assert not ledger.would_exceed(spent, "rdp", 1.0, 0.1, 0)


def test_calibration_matches_opacus_and_respects_prior_history() -> None:
    fresh = calibrate_noise_multiplier(
        target_epsilon=4.0, sample_rate=0.1, steps=200, prior=PrivacyLedger(DELTA)
    )
    assert fresh == get_noise_multiplier(
        target_epsilon=4.0, target_delta=DELTA, sample_rate=0.1, steps=200
    )
    prior = PrivacyLedger(DELTA, ((2.0, 0.1, 100),))
    sigma = calibrate_noise_multiplier(target_epsilon=4.0, sample_rate=0.1, steps=100, prior=prior)
    total = prior.record(sigma, 0.1, 100).epsilon()
    assert 4.0 - 0.01 <= total <= 4.0
    with pytest.raises(PrivacyBudgetError):
        calibrate_noise_multiplier(
            target_epsilon=prior.epsilon(), sample_rate=0.1, steps=1, prior=prior
        )


# ---------------------------------------------------------------- per-sample gradients


def test_per_sample_gradients_equal_single_example_backward() -> None:
    """grad_sample of Opacus's GradSampleModule (DPGRU) == each utterance's own gradient.

    The reference is the plain fused nn.GRU model run on one utterance at a time (float64).
    Tolerance: relative error <= 1e-9 of each parameter's largest gradient entry.
    """
    # Prepare: a 2-layer BiGRU with front-end, 4 utterances of different lengths
    torch.manual_seed(0)
    cfg = ModelConfig(input_dim=6, hidden_size=5, num_layers=2, frontend_dim=4, dropout=0.0)
    dp_model = BiGRUCTC(cfg, dp=True).double()
    reference = convert_model(dp_model, dp=False)
    gsm = GradSampleModule(dp_model, batch_first=True, loss_reduction="mean")
    items = [(u.feats.double(), u.labels) for u in _examples(4, seed=3)]
    batch = as_ctc_batch(collate_ctc(items))
    assert batch is not None
    # Execute
    ctc_loss(gsm(batch.feats, batch.feat_lens), batch).backward()
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
            sample = dict(gsm.named_parameters())[f"_module.{name}"].grad_sample[i]
            assert p.grad is not None
            rel = float((sample - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30))
            worst = max(worst, rel)
    # Assert
    assert worst <= 1e-9, f"max relative per-sample gradient error {worst:.3g}"


def test_dp_optimizer_step_is_mean_of_clipped_per_sample_gradients() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(input_dim=6, hidden_size=5, num_layers=1, dropout=0.0)
    model = BiGRUCTC(cfg, dp=True).double()  # train mode: Opacus records activations only then
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    clip = 0.05  # small: every utterance's gradient is clipped
    optimizer = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=4,
    )
    batch = as_ctc_batch(collate_ctc([(u.feats.double(), u.labels) for u in _examples(4)]))
    assert batch is not None
    before = {n: p.detach().clone() for n, p in gsm.named_parameters()}
    ctc_loss(gsm(batch.feats, batch.feat_lens), batch).backward()
    samples = {n: p.grad_sample.clone() for n, p in gsm.named_parameters()}
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples.values()]).norm(dim=0)  # (B,)
    assert bool((norms > clip).all())
    optimizer.step()
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus's flat clipping factor
    for name, p in gsm.named_parameters():
        expected = before[name] - torch.einsum("b,b...->...", factor, samples[name]) / 4
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- accounting across calls


def test_two_one_epoch_calls_spend_as_much_as_one_two_epoch_call() -> None:
    examples = _examples(12)
    one = TrainConfig(epochs=1, batch_size=4, noise_multiplier=1.3, dp_seed=1)
    # Execute: epoch 1, serialise the ledger, epoch 2 from the restored ledger; vs. 2 epochs at once
    first = train_local(tiny_model(), examples, one)
    assert first.privacy_state is not None
    restored = PrivacyLedger.from_json(first.privacy_state.to_json())
    model = tiny_model()
    load_plain_state_dict(model, first.state_dict)
    second = train_local(model, examples, one, privacy_state=restored)
    both = train_local(tiny_model(), examples, TrainConfig(**{**one.__dict__, "epochs": 2}))
    # Assert
    assert first.epsilon is not None and second.epsilon is not None
    assert 0 < first.epsilon < second.epsilon
    assert second.epsilon == pytest.approx(both.epsilon, rel=1e-12)
    assert second.privacy_state == both.privacy_state == PrivacyLedger(DELTA, ((1.3, 1 / 3, 6),))


def test_target_epsilon_is_met_over_planned_steps() -> None:
    examples = _examples(12)
    cfg = TrainConfig(epochs=1, batch_size=4, noise_multiplier=None, target_epsilon=2.0, dp_seed=0)
    planned = 2 * 3  # two calls of one epoch, 3 Poisson steps each (q = 1/3)
    first = train_local(tiny_model(), examples, cfg, planned_steps=planned)
    second = train_local(
        tiny_model(), examples, cfg, privacy_state=first.privacy_state, planned_steps=planned
    )
    assert first.epsilon is not None and second.epsilon is not None
    assert first.epsilon < 2.0 - 0.1  # half the plan spent
    assert second.noise_multiplier == first.noise_multiplier
    assert 2.0 - 0.02 <= second.epsilon <= 2.0  # bisection tolerance 0.01
    with pytest.raises(ValueError, match="planned_steps"):
        train_local(
            tiny_model(), examples, cfg, privacy_state=second.privacy_state, planned_steps=6
        )


def test_dp_sgd_without_clipping_or_noise_equals_plain_sgd() -> None:
    """End to end: with q = 1, no effective clipping and ~no noise, DP-SGD is plain full-batch SGD.

    Fails if per-sample gradients were misaligned across layers or the DP path scaled the step.
    """
    examples = _examples(6)
    base = TrainConfig(epochs=1, batch_size=6, lr=0.1, optimizer="sgd", seed=0, grad_clip=None)
    private = train_local(
        tiny_model(),
        examples,
        TrainConfig(**{**base.__dict__, "noise_multiplier": 1e-10, "max_grad_norm": 100.0}),
    )
    plain = train_local(tiny_model(), examples, TrainConfig(**{**base.__dict__, "dp": False}))
    assert private.sample_rate == 1.0 and private.metrics["num-steps"] == 1
    start = tiny_model().state_dict()
    for name, value in plain.state_dict.items():
        moved = (value - start[name]).abs().max()
        torch.testing.assert_close(private.state_dict[name], value, rtol=0, atol=1e-6)
        assert name.startswith("norm.") or moved > 1e-4  # the step really moved the weights


def test_dp_sgd_step_with_clipping_is_mean_of_clipped_single_example_gradients() -> None:
    """End to end through ``train_local``: q = 1, every utterance clipped, ~no noise.

    The update must be ``-lr / B * sum_i clip(g_i)`` with ``g_i`` each utterance's own gradient.
    Fails if Opacus is told a loss reduction other than the loss's own (per-sample gradients
    would be scaled by B before clipping, and the step would not be divided by B).
    """
    examples, lr, clip = _examples(6), 0.1, 1e-3
    cfg = TrainConfig(
        epochs=1, batch_size=6, lr=lr, optimizer="sgd", noise_multiplier=1e-10, max_grad_norm=clip
    )
    result = train_local(tiny_model(), examples, cfg)
    model = tiny_model()
    step = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for ex in examples:
        single = as_ctc_batch(collate_ctc([(ex.feats, ex.labels)]))
        assert single is not None
        model.zero_grad()
        ctc_loss(model(single.feats, single.feat_lens), single).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        norm = torch.stack([g.norm() for g in grads.values()]).norm()
        assert norm > clip  # really clipped
        for name, g in grads.items():
            step[name] += g * (clip / (norm + 1e-6))  # Opacus's flat clipping factor
    start = tiny_model().state_dict()
    for name, total in step.items():
        expected = start[name] - lr * total / len(examples)
        torch.testing.assert_close(result.state_dict[name], expected, rtol=0, atol=1e-7)


def test_rdp_epsilon_is_opacus_arithmetic_without_importing_opacus() -> None:
    """The RDP epsilon loads only Opacus's analysis module (the package import costs ~2 s), and
    the figure is bit-identical to ``RDPAccountant``'s."""
    import subprocess
    import sys

    from fedspeech.privacy_ledger import RDP_ORDERS

    assert list(RDP_ORDERS) == RDPAccountant.DEFAULT_ALPHAS
    history = ((1.1, 0.25, 12), (0.9, 1 / 3, 7))
    code = (
        "import sys\n"
        "from fedspeech.privacy_ledger import PrivacyLedger\n"
        f"print(repr(PrivacyLedger({DELTA!r}, {history!r}).epsilon('rdp')))\n"
        "print('opacus' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    reference = RDPAccountant()
    reference.history = list(history)
    assert float(out[0]) == reference.get_epsilon(delta=DELTA)
    assert out[1] == "False"  # Opacus's package was never imported
