"""Local training: the model learns real speech, DP training runs and accounts, batching edge cases."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import jiwer
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.data_loader import wrap_collate_with_empty
from torch.optim.optimizer import register_optimizer_step_post_hook

from fedspeech.config import ConfigError, RunConfig
from fedspeech.model import (
    BiGRUCTC,
    load_plain_state_dict,
    plain_state_dict,
    set_trainable,
    trainable_names,
)
from fedspeech.model_config import ModelConfig
from fedspeech_client.batching import LengthBucketSampler, as_ctc_batch, collate_ctc
from fedspeech_client.train import TrainConfig, train_local
from fedspeech_features.dataset import Example, extract_manifest
from fedspeech_features.feature_config import FeatureConfig
from fedspeech_features.manifest import read_manifest
from fedspeech_features.mfcc import FeatureExtractor
from fedspeech_features.text import CharTokenizer
from tests.conftest import RandomUtterance, random_utterances, tiny_model

DELTA = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


_examples = random_utterances


def _greedy(log_probs: torch.Tensor, tokenizer: CharTokenizer) -> str:
    """Best path, repeats collapsed, blanks dropped (the decoding module comes later)."""
    ids = torch.unique_consecutive(log_probs.argmax(-1)).tolist()  # (T,) -> collapsed ids
    return tokenizer.decode([i for i in ids if i != 0])


@pytest.fixture(scope="module")
def short_sentences(shared_data: Path) -> list[Example]:
    """The 8 shortest speechocean762 utterances (1.6-2.0 s, 1-4 words), as model frames."""
    manifest = shared_data / "speechocean762_train" / "manifest.tsv"
    if not manifest.is_file():
        pytest.skip(f"{manifest} not found")
    rows = sorted(read_manifest(manifest), key=lambda r: r.duration_s)[:8]
    examples, _ = extract_manifest(rows, FeatureExtractor(FeatureConfig()), None, CharTokenizer())
    assert len(examples) == 8
    return examples


def test_model_overfits_eight_real_utterances(short_sentences: list[Example]) -> None:
    # Prepare
    torch.manual_seed(0)
    model = BiGRUCTC(ModelConfig(input_dim=short_sentences[0].feats.shape[1], hidden_size=64,
                                 num_layers=2, dropout=0.0))  # fmt: skip
    cfg = TrainConfig(epochs=60, batch_size=8, lr=0.01, dp=False, seed=0)
    # Execute
    result = train_local(model, short_sentences, cfg)
    load_plain_state_dict(model, result.state_dict)
    model.eval()
    with torch.no_grad():
        hyps = [
            _greedy(model(ex.feats[None], torch.tensor([ex.feats.shape[0]]))[0], CharTokenizer())
            for ex in short_sentences
        ]
    # Assert
    cer = jiwer.cer([ex.transcript for ex in short_sentences], hyps)
    assert cer < 0.05, f"CER {cer:.3f}: {hyps}"
    assert result.epsilon is None and result.privacy_state is None
    assert result.metrics["num-steps"] == 60


def test_dp_training_learns_and_reports_opacus_epsilon(short_sentences: list[Example]) -> None:
    # Prepare
    torch.manual_seed(0)
    dim = short_sentences[0].feats.shape[1]
    model = BiGRUCTC(ModelConfig(input_dim=dim, hidden_size=16, num_layers=1, frontend_dim=16))
    before = plain_state_dict(model)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.01, noise_multiplier=0.8, dp_seed=0)
    # Execute
    result = train_local(model, short_sentences, cfg)
    # Assert: it trained...
    assert torch.isfinite(torch.tensor(result.metrics["train-loss"]))
    assert any(not torch.equal(before[k], v) for k, v in result.state_dict.items())
    assert all(torch.equal(before[k], v) for k, v in plain_state_dict(model).items())  # untouched
    # ... with 2 epochs x 2 Poisson steps at q = 1/2, and epsilon is the accountant's
    reference = RDPAccountant()
    reference.history = [(0.8, 0.5, 4)]
    assert result.metrics["num-steps"] == 4
    assert result.sample_rate == 0.5 and result.noise_multiplier == 0.8
    assert result.epsilon is not None and result.epsilon > 0
    assert result.epsilon == reference.get_epsilon(delta=cfg.delta)


def test_dp_weights_give_identical_outputs_in_plain_and_dp_models() -> None:
    torch.manual_seed(0)
    model = BiGRUCTC(ModelConfig(input_dim=6, hidden_size=8, num_layers=2, dropout=0.0))
    result = train_local(model, _examples(8), TrainConfig(batch_size=4, dp_seed=0))
    plain, dp_model = BiGRUCTC(model.cfg).eval(), BiGRUCTC(model.cfg, dp=True).eval()
    load_plain_state_dict(plain, result.state_dict)
    load_plain_state_dict(dp_model, result.state_dict)
    lengths = torch.tensor([11, 7, 5])
    feats = torch.randn(3, 11, 6)
    valid = torch.arange(11)[None, :] < lengths[:, None]  # (B, T)
    diff = (plain(feats, lengths) - dp_model(feats, lengths))[valid].abs().max()
    assert diff < 1e-5  # float32 rounding of fused vs. looped GRU
    assert list(result.state_dict) == list(plain.state_dict())


def test_empty_poisson_batches_are_noise_steps_that_count() -> None:
    # 3 utterances, expected batch size 1: q = 1/3, P(empty batch) = (2/3)^3 = 0.3 per step
    examples = _examples(3)
    skipped = 0
    for dp_seed in range(8):
        model = BiGRUCTC(ModelConfig(input_dim=6, hidden_size=4, num_layers=1, dropout=0.0))
        cfg = TrainConfig(epochs=2, batch_size=1, noise_multiplier=1.0, dp_seed=dp_seed)
        result = train_local(model, examples, cfg)
        assert result.privacy_state is not None
        assert result.privacy_state.history == ((1.0, 1 / 3, 6),)  # every draw is a step
        assert result.metrics["num-steps"] == 6
        skipped += int(result.metrics["skipped-batches"])
    assert skipped > 0


def test_empty_batch_structures_from_opacus_are_recognised() -> None:
    items = [(u.feats, u.labels) for u in _examples(2)]
    collate = wrap_collate_with_empty(
        collate_fn=collate_ctc,
        sample_empty_shapes=[(0, *t.shape) for t in items[0]],
        dtypes=[t.dtype for t in items[0]],
    )
    assert as_ctc_batch(collate([])) is None  # first batch empty: zero tensors like one item
    batch = as_ctc_batch(collate(items))
    assert batch is not None and batch.size == 2
    assert as_ctc_batch(collate([])) is None  # later: empty copy of the first batch


def test_physical_batch_splitting_gives_the_same_update() -> None:
    model = tiny_model()
    cfg = TrainConfig(batch_size=6, noise_multiplier=1.0, dp_seed=3)
    whole = train_local(model, _examples(12), cfg)
    split = train_local(model, _examples(12), replace(cfg, max_physical_batch_size=2))
    assert split.epsilon == whole.epsilon
    for name, value in whole.state_dict.items():
        torch.testing.assert_close(split.state_dict[name], value, rtol=0, atol=1e-6)


def test_plain_training_is_seeded_and_leaves_caller_rng_alone() -> None:
    torch.manual_seed(0)
    model = BiGRUCTC(ModelConfig(input_dim=6, hidden_size=8, num_layers=2, dropout=0.3))
    cfg = TrainConfig(epochs=2, batch_size=3, dp=False, seed=5)
    rng = torch.get_rng_state()
    a = train_local(model, _examples(9), cfg)
    assert torch.equal(torch.get_rng_state(), rng)
    b = train_local(model, _examples(9), cfg)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.metrics["num-steps"] == 6 and a.metrics["num-examples"] == 9


def test_plain_training_does_not_import_opacus() -> None:
    """Opacus (~1.3 s to import, and it configures the root logger) is for DP-SGD only: a
    non-private client's first message, or ``fedspeech train --no-dp``, never loads it."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from fedspeech.model import BiGRUCTC\n"
        "from fedspeech.model_config import ModelConfig\n"
        "from fedspeech_client.train import TrainConfig, train_local\n"
        "from fedspeech_features.dataset import Example\n"
        "data = [Example(None, torch.randn(9, 6), torch.tensor([1, 2]), 'ab', 's', 0.1)] * 4\n"
        "model = BiGRUCTC(ModelConfig(input_dim=6, hidden_size=8, num_layers=1))\n"
        "result = train_local(model, data, TrainConfig(epochs=1, batch_size=2, dp=False))\n"
        "print(int(result.metrics['num-steps']), 'opacus' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.split()  # fmt: skip
    assert out == ["2", "False"]  # it trained, through FastGRU, without Opacus


def test_train_config_requires_one_noise_setting() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(noise_multiplier=1.0, target_epsilon=3.0)
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(noise_multiplier=None)
    assert TrainConfig(dp=False, noise_multiplier=None).dp is False


def test_length_buckets_cover_every_utterance_once_within_limits() -> None:
    lengths = [
        int(x) for x in torch.randint(1, 100, (103,), generator=torch.Generator().manual_seed(0))
    ]
    sampler = LengthBucketSampler(
        lengths, 8, generator=torch.Generator().manual_seed(1), max_frames=400, pool_batches=4
    )
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert all(len(b) <= 8 and max(lengths[i] for i in b) * len(b) <= 400 for b in batches)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread / len(batches) < 40  # bucketing: far below the ~65 of random batches of 8
    batch = as_ctc_batch(collate_ctc([(torch.zeros(n, 2), torch.ones(1)) for n in (3, 9, 5)]))
    assert batch is not None and batch.feat_lens.tolist() == [9, 5, 3]


def test_spec_augment_switch_masks_training_features() -> None:
    examples = [RandomUtterance(torch.randn(40, 6), torch.tensor([3, 4])) for _ in range(4)]
    seen: list[torch.Tensor] = []

    def spy(feats: torch.Tensor) -> torch.Tensor:
        seen.append(feats)
        return feats

    model = BiGRUCTC(ModelConfig(input_dim=6, hidden_size=4, num_layers=1, dropout=0.0))
    plain = TrainConfig(batch_size=2, dp=False)
    train_local(model, examples, plain, augment=spy)
    assert len(seen) == 4  # an explicit augment sees every training read
    masked = train_local(model, examples, replace(plain, spec_augment=True))
    unmasked = train_local(model, examples, plain)
    assert any(not torch.equal(masked.state_dict[k], v) for k, v in unmasked.state_dict.items())


@pytest.mark.parametrize("dp", [True, False], ids=["dp-sgd", "plain"])
def test_tempo_augment_trains_on_slowed_down_features(
    dp: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: spy on the stretch that the run config asks for (every utterance, up to 2x)
    from fedspeech_features import augment as augment_module

    lengths: list[tuple[int, int]] = []
    stretch = augment_module.TempoStretch.__call__

    def spy(self: augment_module.TempoStretch, feats: torch.Tensor) -> torch.Tensor:
        out = stretch(self, feats)
        lengths.append((feats.shape[0], out.shape[0]))
        return out

    monkeypatch.setattr(augment_module.TempoStretch, "__call__", spy)
    model = BiGRUCTC(ModelConfig(input_dim=6, hidden_size=4, num_layers=1, dropout=0.0))
    cfg = TrainConfig(
        batch_size=4, dp=dp, dp_seed=0 if dp else None, tempo_augment=1.0, tempo_max=2.0
    )
    # Execute
    slowed = train_local(model, _examples(8), cfg, planned_steps=2 if dp else None, frame_block=3)
    plain = train_local(
        model, _examples(8), replace(cfg, tempo_augment=0.0), planned_steps=2 if dp else None
    )
    # Assert: reads were stretched within [1, 2]x, and the result differs from unstretched training
    assert lengths and all(n <= m <= 2 * n for n, m in lengths)
    assert any(m > n for n, m in lengths)
    assert any(not torch.equal(slowed.state_dict[k], v) for k, v in plain.state_dict.items())


@pytest.mark.parametrize("dp", [True, False], ids=["dp-sgd", "plain"])
def test_frozen_layers_stay_fixed_and_the_rest_trains(dp: bool) -> None:
    # Prepare: a 2-layer bidirectional model with a front-end; freeze the front-end and layer 0.
    cfg = ModelConfig(input_dim=6, hidden_size=8, num_layers=2, frontend_dim=5, dropout=0.0)
    model = BiGRUCTC(cfg)
    before = plain_state_dict(model)
    train = TrainConfig(batch_size=4, lr=0.05, freeze_layers=1, dp=dp, dp_seed=0 if dp else None)
    # Execute
    result = train_local(model, _examples(16), train, planned_steps=4 if dp else None)
    # Assert: every frozen tensor is bit-identical; every other one moved.
    frozen = {k for k in before if k.startswith("frontend.") or "_l0" in k}
    assert len(frozen) == 2 + 8  # front-end weight + bias; 4 tensors x 2 directions of layer 0
    for name, value in result.state_dict.items():
        assert torch.equal(value, before[name]) == (name in frozen), name
    if dp:  # the accounting does not depend on how many weights train
        assert result.epsilon is not None and result.epsilon > 0


@pytest.mark.parametrize("dp", [True, False], ids=["dp-sgd", "plain"])
@pytest.mark.parametrize("trainable", ["head", "norm-bias"])
def test_a_trainable_subset_trains_only_its_weights(dp: bool, trainable: str) -> None:
    cfg = ModelConfig(input_dim=6, hidden_size=8, num_layers=2, frontend_dim=5, dropout=0.0)
    model = BiGRUCTC(cfg)
    before = plain_state_dict(model)
    train = TrainConfig(
        batch_size=4, lr=0.05, trainable=trainable, dp=dp, dp_seed=0 if dp else None
    )  # type: ignore[arg-type]
    result = train_local(model, _examples(16), train, planned_steps=4 if dp else None)
    trained = set(trainable_names(cfg, trainable))  # type: ignore[arg-type]
    for name, value in result.state_dict.items():
        assert torch.equal(value, before[name]) == (name not in trained), name


@pytest.mark.parametrize("clipping", ["flat", "per-layer"])
def test_per_layer_clipping_bounds_every_trained_tensor_and_costs_the_same(clipping: str) -> None:
    # Prepare: one utterance, q = 1, a tiny clipping norm (every raw gradient is larger), next to
    # no noise, plain SGD: one step moves each tensor by lr x its clipped gradient.
    cfg = ModelConfig(input_dim=6, hidden_size=8, num_layers=1, dropout=0.0)
    torch.manual_seed(0)
    model = BiGRUCTC(cfg)
    before = plain_state_dict(model)
    c = 1e-4
    train = TrainConfig(
        batch_size=1, lr=1.0, optimizer="sgd", max_grad_norm=c, noise_multiplier=1e-12,
        clipping=clipping, trainable="head", dp_seed=0,  # type: ignore[arg-type]
    )  # fmt: skip
    # Execute
    result = train_local(model, _examples(1), train, planned_steps=1)
    # Assert: per-layer: each of the 4 head tensors moved by exactly c / sqrt(4); flat: the
    # whole step has norm c, shared unevenly. The accounting is the same either way.
    moves = [float((result.state_dict[k] - before[k]).norm()) for k in trainable_names(cfg, "head")]
    # rel 1e-3: the moves are differences of float32 weights near 0.3 (one ulp: 3e-8)
    assert sum(m**2 for m in moves) ** 0.5 == pytest.approx(c, rel=1e-3)
    if clipping == "per-layer":
        assert moves == pytest.approx([c / 2] * 4, rel=1e-3)
    else:
        assert max(moves) > 1.1 * c / 2
    assert result.privacy_state is not None
    assert result.privacy_state.history == ((1e-12, 1.0, 1),)


def test_ema_returns_the_moving_average_of_every_steps_weights() -> None:
    # Prepare: DP-SGD on the head, 4 Poisson steps; record the weights after every optimizer step
    cfg = ModelConfig(input_dim=6, hidden_size=8, num_layers=1, dropout=0.0)
    torch.manual_seed(0)
    model = BiGRUCTC(cfg)
    names = trainable_names(cfg, "head")
    start = plain_state_dict(model)
    decay = 0.6
    train = TrainConfig(
        batch_size=2, epochs=2, lr=0.05, noise_multiplier=0.5, trainable="head", dp_seed=0,
        ema_decay=decay,
    )  # fmt: skip
    steps: list[list[torch.Tensor]] = []

    def record(optimizer: torch.optim.Optimizer, *_: object) -> None:
        steps.append([p.detach().clone() for g in optimizer.param_groups for p in g["params"]])

    handle = register_optimizer_step_post_hook(record)
    try:
        result = train_local(model, _examples(4), train, planned_steps=4)
    finally:
        handle.remove()
    # Assert: the returned head is the EMA of the 4 steps' weights, started at the model's
    assert len(steps) == 4
    average = [start[k].clone() for k in names]
    for weights in steps:
        average = [a + (1 - decay) * (w - a) for a, w in zip(average, weights, strict=True)]
    for name, expected in zip(names, average, strict=True):
        assert torch.allclose(result.state_dict[name], expected, atol=1e-6), name
        assert not torch.allclose(result.state_dict[name], steps[-1][names.index(name)])
    assert result.privacy_state is not None and result.privacy_state.num_steps == 4


def test_choosing_what_trains_draws_nothing_from_the_global_rng() -> None:
    # Seeded training must not depend on whether a subset was chosen (dropout, shuffling).
    model = BiGRUCTC(ModelConfig(input_dim=6, hidden_size=8, num_layers=2))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    set_trainable(model, "norm-bias", 1)
    assert torch.equal(torch.rand(3), expected)


def test_freezing_every_layer_leaves_only_the_head_and_bad_counts_are_refused() -> None:
    model = BiGRUCTC(ModelConfig(input_dim=6, hidden_size=8, num_layers=2))
    trainable = set_trainable(model, "all", 2)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert sum(p.numel() for p in trainable) == 2 * 16 + 16 * 29 + 29
    with pytest.raises(ValueError, match="freeze_layers must be in"):
        set_trainable(model, "all", 3)
    with pytest.raises(ConfigError, match="freeze-layers 4 > num-layers 3"):
        RunConfig.from_flat({"freeze-layers": 4, "num-layers": 3})
