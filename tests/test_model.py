"""BiGRUCTC: config checks, padding invariance, DP (Opacus) flavour == plain fused flavour."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

from fedspeech.model import (
    BiGRUCTC,
    convert_model,
    count_parameters,
    load_plain_state_dict,
    plain_state_dict,
)
from fedspeech.model_config import ModelConfig

CELLS = [("gru", True), ("gru", False), ("lstm", True), ("rnn", True)]


def _tiny(cell: str = "gru", bidirectional: bool = True, frontend_dim: int = 0) -> ModelConfig:
    return ModelConfig(
        input_dim=6,
        hidden_size=5,
        num_layers=2,
        cell=cell,  # type: ignore[arg-type]
        bidirectional=bidirectional,
        dropout=0.0,
        frontend_dim=frontend_dim,
    )


def _valid(lengths: torch.Tensor, total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] < lengths[:, None]  # (B, T) True on real frames


@pytest.mark.parametrize(
    "bad",
    [
        {"input_dim": 0},
        {"num_layers": 0},
        {"vocab_size": 1},
        {"cell": "transformer"},
        {"dropout": 1.0},
        {"frontend_dim": -1},
    ],
)
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ModelConfig(**{"input_dim": 6, **bad})  # type: ignore[arg-type]


def test_config_dict_round_trip_rejects_unknown_keys() -> None:
    cfg = _tiny("lstm", frontend_dim=4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "hiden_size": 3})


def test_forward_shape_and_log_probs() -> None:
    model = BiGRUCTC(ModelConfig(input_dim=6, hidden_size=8, num_layers=1)).eval()
    out = model(torch.randn(2, 9, 6), torch.tensor([9, 4]))
    assert out.shape == (2, 9, 29)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 9))


@pytest.mark.parametrize(("cell", "bidirectional"), CELLS)
def test_plain_model_is_padding_invariant(cell: str, bidirectional: bool) -> None:
    # Prepare: three utterances, padded into one batch with extra garbage frames
    torch.manual_seed(0)
    model = BiGRUCTC(_tiny(cell, bidirectional, frontend_dim=4)).double().eval()
    lengths = torch.tensor([4, 9, 6])
    feats = torch.randn(3, 12, 6, dtype=torch.float64) * 5.0  # padding = large random values
    # Execute
    batched = model(feats, lengths)
    alone = [model(feats[i : i + 1, : int(n)], lengths[i : i + 1]) for i, n in enumerate(lengths)]
    # Assert: every valid frame equals the utterance run alone (float64, to rounding)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(batched[i, :n], alone[i][0], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("cell", "bidirectional"), CELLS)
def test_dp_flavour_equals_plain_flavour(cell: str, bidirectional: bool) -> None:
    torch.manual_seed(1)
    dp_model = BiGRUCTC(_tiny(cell, bidirectional, frontend_dim=4), dp=True).double().eval()
    plain = convert_model(dp_model, dp=False)
    assert isinstance(plain.rnn, torch.nn.RNNBase)  # the fused torch layer, not Opacus's loop
    lengths = torch.tensor([9, 6, 2])  # the DP flavour needs decreasing lengths
    feats = torch.randn(3, 9, 6, dtype=torch.float64)
    valid = _valid(lengths, 9)
    torch.testing.assert_close(
        dp_model(feats, lengths)[valid], plain(feats, lengths)[valid], rtol=0, atol=1e-12
    )


def test_exported_names_are_plain_gru_names() -> None:
    cfg = _tiny()
    dp_model = BiGRUCTC(cfg, dp=True)
    exported = plain_state_dict(GradSampleModule(dp_model))  # Opacus adds "_module."
    assert list(exported) == list(BiGRUCTC(cfg).state_dict())
    assert "rnn.weight_hh_l1_reverse" in exported
    assert not any(k.startswith("_module.") or ".l0." in k for k in exported)
    for name, value in exported.items():
        assert not value.requires_grad and value.device.type == "cpu", name


def test_float32_weights_from_dp_model_load_into_plain_model() -> None:
    torch.manual_seed(2)
    dp_model = BiGRUCTC(ModelConfig(input_dim=6, hidden_size=16, num_layers=2), dp=True).eval()
    plain = BiGRUCTC(dp_model.cfg).eval()
    load_plain_state_dict(plain, plain_state_dict(dp_model))
    lengths = torch.tensor([20, 13])
    feats = torch.randn(2, 20, 6)
    valid = _valid(lengths, 20)
    diff = (dp_model(feats, lengths) - plain(feats, lengths))[valid].abs().max()
    assert diff < 1e-5  # float32: fused kernel vs Python loop differ only in rounding


def test_load_plain_state_dict_is_strict() -> None:
    model = BiGRUCTC(_tiny())
    state = plain_state_dict(model)
    with pytest.raises(ValueError, match="missing"):
        load_plain_state_dict(model, {k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(ValueError, match="shape"):
        load_plain_state_dict(model, {**state, "head.bias": torch.zeros(3)})


def test_opacus_dp_flavour_rejects_unsorted_batch() -> None:
    model = BiGRUCTC(_tiny(), dp=True, dp_rnn="opacus")  # FastGRU (the default) takes any order
    with pytest.raises(ValueError, match="decreasing length"):
        model(torch.randn(2, 5, 6), torch.tensor([3, 5]))


def test_count_parameters_same_for_both_flavours() -> None:
    cfg = ModelConfig(input_dim=6, hidden_size=5, num_layers=2, frontend_dim=4)
    expected = sum(v.numel() for v in BiGRUCTC(cfg).state_dict().values())
    assert count_parameters(BiGRUCTC(cfg)) == expected
    assert count_parameters(BiGRUCTC(cfg, dp=True)) == expected  # Opacus aliases counted once
