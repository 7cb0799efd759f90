"""Head-only training on kept trunk outputs: the same training, the trunk run once per utterance."""

from __future__ import annotations

import gc

import pytest
import torch

from fedspeech.model import BiGRUCTC, plain_state_dict
from fedspeech.model_config import ModelConfig
from fedspeech_client import frozen_trunk, train
from fedspeech_client.frozen_trunk import TrunkMemo, head_model, trains_head_only
from fedspeech_client.train import TrainConfig, train_local
from tests.conftest import random_utterances

pytestmark = pytest.mark.usefixtures("one_thread")

# 2 bidirectional layers over a front-end, no dropout: the two ways of training compute the same.
CFG = ModelConfig(input_dim=6, hidden_size=8, num_layers=2, frontend_dim=5, dropout=0.0)


_examples = random_utterances


@pytest.fixture()
def memo(monkeypatch: pytest.MonkeyPatch) -> TrunkMemo:
    """A fresh memo in place of the process's."""
    fresh = TrunkMemo()
    monkeypatch.setattr(train, "TRUNKS", fresh)
    return fresh


def _config(dp: bool, **kw: object) -> TrainConfig:
    return TrainConfig(batch_size=4, lr=0.05, dp=dp, dp_seed=0 if dp else None, **kw)  # type: ignore[arg-type]


def test_the_head_reads_what_the_trunk_gives_as_the_whole_model_computes() -> None:
    torch.manual_seed(0)
    model = BiGRUCTC(CFG).eval()
    feats, lengths = torch.randn(3, 9, 6), torch.tensor([9, 7, 4])
    head = head_model(model).eval()
    out = head(model.trunk(feats, lengths), lengths)  # (B, T, V)
    full = model(feats, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert torch.allclose(out[b, :n], full[b, :n], atol=1e-6)


@pytest.mark.parametrize("dp", [True, False], ids=["dp-sgd", "plain"])
@pytest.mark.parametrize("what", ["freeze-all", "head"])
def test_head_only_training_on_kept_trunk_outputs_equals_training_the_whole_model(
    dp: bool, what: str, memo: TrunkMemo, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the same seeded model and data, trained once on kept trunk outputs and once the
    # way every layer ran before (the check that picks the kept outputs turned off).
    cfg = _config(dp, **({"freeze_layers": 2} if what == "freeze-all" else {"trainable": "head"}))
    torch.manual_seed(0)
    model = BiGRUCTC(CFG)
    examples = _examples(12)
    assert trains_head_only(model, cfg)
    # Execute
    kept = train_local(model, examples, cfg, planned_steps=3 if dp else None)
    monkeypatch.setattr(train, "trains_head_only", lambda *_: False)
    whole = train_local(model, examples, cfg, planned_steps=3 if dp else None)
    # Assert: the trunk ran once per utterance; the same weights (the trunk's outputs differ by
    # float rounding: the fused layer here, FastGRU there), loss, steps and privacy spent.
    assert (memo.misses, memo.hits) == (12, 0)
    for name, value in whole.state_dict.items():
        assert torch.allclose(kept.state_dict[name], value, atol=1e-5), name
    assert kept.metrics["train-loss"] == pytest.approx(whole.metrics["train-loss"], rel=1e-5)
    assert kept.metrics["num-steps"] == whole.metrics["num-steps"]
    assert kept.privacy_state == whole.privacy_state
    assert kept.epsilon == whole.epsilon


def test_later_rounds_reuse_the_trunk_outputs_until_the_fixed_weights_change(
    memo: TrunkMemo,
) -> None:
    torch.manual_seed(0)
    model = BiGRUCTC(CFG)
    examples = _examples(8)
    cfg = _config(False, freeze_layers=2)
    first = train_local(model, examples, cfg)
    assert (memo.misses, memo.hits) == (8, 0)
    # A new round: the head moved (as after aggregation), the fixed layers did not.
    model.load_state_dict({**model.state_dict(), "head.weight": first.state_dict["head.weight"]})
    train_local(model, examples, cfg)
    assert (memo.misses, memo.hits) == (8, 8)
    # Other fixed weights (another starting model): computed again.
    with torch.no_grad():
        model.rnn.weight_hh_l1.add_(0.01)
    train_local(model, examples, cfg)
    assert (memo.misses, memo.hits) == (16, 8)
    # Training with feature augmentation reads different features each time: the whole model.
    train_local(model, examples, _config(False, freeze_layers=2, spec_augment=True))
    assert (memo.misses, memo.hits) == (16, 8)


def test_a_call_whose_outputs_would_not_fit_runs_every_layer(
    memo: TrunkMemo, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = BiGRUCTC(CFG)
    examples = _examples(8)
    frames = sum(int(e.feats.shape[0]) for e in examples)
    monkeypatch.setattr(frozen_trunk, "MAX_CALL_BYTES", frames * CFG.output_dim * 4 - 1)
    train_local(model, examples, _config(False, freeze_layers=2))
    assert (memo.misses, memo.hits) == (0, 0)
    monkeypatch.setattr(frozen_trunk, "MAX_CALL_BYTES", frames * CFG.output_dim * 4)
    train_local(model, examples, _config(False, freeze_layers=2))
    assert (memo.misses, memo.hits) == (8, 0)


def test_kept_outputs_stay_within_the_budget_and_go_with_their_features() -> None:
    torch.manual_seed(0)
    model = BiGRUCTC(CFG)
    examples = _examples(10)
    one = 10 * 2 * CFG.hidden_size * 4  # bytes of a (T <= 11, 16) float32 output, roughly
    small = TrunkMemo(budget_bytes=3 * one)
    small.outputs(model, examples, torch.device("cpu"))
    assert 0 < small.nbytes <= 3 * one
    memo = TrunkMemo()
    outputs = memo.outputs(model, examples, torch.device("cpu"))
    assert memo.nbytes == sum(o.feats.numel() * 4 for o in outputs)
    del examples, outputs
    gc.collect()
    assert memo.nbytes == 0  # a freed feature tensor's id may be reused: its entry is gone


def test_the_digest_covers_the_fixed_weights_only() -> None:
    torch.manual_seed(0)
    model = BiGRUCTC(CFG)
    before = frozen_trunk.trunk_digest(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
        model.norm.bias.add_(1.0)
    assert frozen_trunk.trunk_digest(model) == before
    with torch.no_grad():
        model.frontend[0].bias.add_(1e-3)
    assert frozen_trunk.trunk_digest(model) != before
    assert set(plain_state_dict(model)) >= {"frontend.0.bias", "head.weight"}
