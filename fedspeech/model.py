"""Acoustic model: MFCC frames -> (front-end) -> (bi)directional RNN -> LayerNorm -> CTC log-probs.

Two flavours share one state-dict layout (that of a plain ``nn.GRU``/``nn.LSTM``/``nn.RNN``):

* ``BiGRUCTC(cfg)`` uses the fused cuDNN/MKL recurrent layer: inference and non-private training.
* ``BiGRUCTC(cfg, dp=True)`` is the DP-SGD flavour. A GRU becomes ``fedspeech.fast_gru.FastGRU``
  (fused forward, exact per-sample gradients from one product over time; see docs/dp_gru.md);
  ``dp_rnn="opacus"`` (and every LSTM/RNN cell) uses Opacus's ``DPGRU``/``DPLSTM``/``DPRNN``
  instead (a Python loop over time steps whose ``RNNLinear`` layers Opacus hooks per step).

``plain_state_dict`` exports either flavour (also inside Opacus's ``GradSampleModule``) under the
plain names, and ``convert_model`` moves weights between flavours; outputs agree to float rounding.
A model with ``adapter_rank`` > 0 also holds low-rank adapters on the GRU input projections
(``fedspeech.adapters``, names ``adapters.*``) in both flavours; ``without_adapters`` merges them
into a plain model's weights.

>>> cfg = ModelConfig(input_dim=120, hidden_size=32, num_layers=2)
>>> model = BiGRUCTC(cfg)
>>> model(torch.zeros(2, 50, 120), torch.tensor([50, 31])).shape
torch.Size([2, 50, 29])
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import get_args

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fedspeech.adapters import LowRankAdapters, merged_state
from fedspeech.model_config import DPRNNImpl, ModelConfig, Trainable

# A recurrent weight's or adapter's plain name, e.g. rnn.weight_ih_l1_reverse -> layer 1.
_RNN_LAYER = re.compile(
    r"(?:rnn\.(?:weight|bias)_[ih]h_|adapters\.up\.|adapters\.down_)l(\d+)(?:_reverse)?(?:\.weight)?"
)

_PLAIN_CELLS: dict[str, type[nn.RNNBase]] = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


class BiGRUCTC(nn.Module):
    """(Bi)directional recurrent CTC acoustic model emitting per-frame log-probabilities.

    Args:
        cfg: model shape.
        dp: build the Opacus-trainable flavour.
        dp_rnn: with ``dp``, the GRU implementation: ``fast`` (``FastGRU``, any batch order) or
            ``opacus`` (``DPGRU``; its ``forward`` needs batches sorted by decreasing length).
            LSTM and RNN cells always use Opacus's layers (sorted batches).
    """

    def __init__(self, cfg: ModelConfig, *, dp: bool = False, dp_rnn: DPRNNImpl = "fast") -> None:
        super().__init__()
        if dp_rnn not in get_args(DPRNNImpl):
            raise ValueError(f"dp_rnn must be one of {get_args(DPRNNImpl)}, got {dp_rnn!r}")
        self.cfg = cfg
        self.dp = dp
        self.fast_rnn = dp and cfg.cell == "gru" and dp_rnn == "fast"
        # Opacus's DP layers compute per-sample gradients in packed (= sorted) order.
        self.needs_sorted_batch = dp and not self.fast_rnn
        rnn_input = cfg.frontend_dim or cfg.input_dim
        # No BatchNorm anywhere: it mixes examples, which per-sample clipping cannot allow.
        self.frontend: nn.Module = (
            nn.Sequential(nn.Linear(cfg.input_dim, cfg.frontend_dim), nn.GELU())
            if cfg.frontend_dim
            else nn.Identity()
        )
        # Dropout sits outside the recurrent layer in both flavours: nn.GRU drops between layers,
        # whereas Opacus's DPRNNBase drops every time step's hidden state, recurrent path
        # included. Keeping it outside makes DP and non-DP training the same model.
        rnn_cls = _dp_cell(cfg.cell, fast=self.fast_rnn) if dp else _PLAIN_CELLS[cfg.cell]
        self.rnn = rnn_cls(
            rnn_input,
            cfg.hidden_size,
            num_layers=cfg.num_layers,
            batch_first=True,
            bidirectional=cfg.bidirectional,
        )
        if cfg.adapter_rank and self.needs_sorted_batch:
            raise ValueError("adapters need the fast DP GRU (dp_rnn = 'fast')")
        self.adapters = _adapters(cfg) if cfg.adapter_rank else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.output_dim)
        self.head = nn.Linear(cfg.output_dim, cfg.vocab_size)
        # True: ``forward`` takes the trunk's outputs (``trunk``) in place of feature frames and
        # runs only dropout, norm and head (training with every layer below them fixed:
        # ``fedspeech_client.frozen_trunk``). Not part of the weights; ``convert_model`` keeps it.
        self.trunk_given = False

    def forward(self, feats: Tensor, lengths: Tensor) -> Tensor:
        """Log-probabilities of every frame.

        Padding frames (index >= ``lengths[b]``) do not influence the valid frames; their own
        outputs are meaningless. The DP flavour with Opacus's layers (``needs_sorted_batch``)
        needs ``lengths`` in decreasing order so that Opacus's per-sample gradients of the
        recurrent layer (computed in packed = sorted order) line up with those of the other
        layers (batch order); ``FastGRU`` takes any order.

        Args:
            feats: ``(B, T, D)`` padded feature frames; with ``trunk_given``, ``(B, T, H*dirs)``
                outputs of ``trunk``.
            lengths: ``(B,)`` number of valid frames per utterance (1..T).

        Returns:
            ``(B, T, V)`` log-softmax over the vocabulary.

        Raises:
            ValueError: lengths out of range, or unsorted lengths in the DP flavour.
        """
        if self.trunk_given:
            _check_lengths(lengths, feats.shape[1], sorted_=False)
            y = feats  # (B, T, H*dirs)
        else:
            y = self._recurrent(self.dropout(self.frontend(feats)), lengths)  # (B, T, H*dirs)
        y = self.norm(self.dropout(y))  # (B, T, H*dirs)
        return torch.log_softmax(self.head(y), dim=-1)  # (B, T, V)

    def trunk(self, feats: Tensor, lengths: Tensor) -> Tensor:
        """Front-end and recurrent layers without dropout: what ``norm`` and ``head`` read.

        Args:
            feats: ``(B, T, D)`` padded feature frames.
            lengths: ``(B,)`` number of valid frames per utterance (1..T).

        Returns:
            ``(B, T, H*dirs)``; zero (FastGRU) or meaningless past each utterance's length.
        """
        return self._recurrent(self.frontend(feats), lengths)

    def _recurrent(self, x: Tensor, lengths: Tensor) -> Tensor:
        """The recurrent layers over ``x`` ``(B, T, F)`` -> ``(B, T, H*dirs)``."""
        total = x.shape[1]
        lengths = _check_lengths(lengths, total, sorted_=self.needs_sorted_batch)
        if self.fast_rnn:
            # adapters by keyword: Opacus's forward hook records the positional inputs only.
            y, _ = self.rnn(x, lengths, adapters=self.adapters)  # (B, T, H*dirs), 0 on padding
        else:
            packed = pack_padded_sequence(
                x, lengths, batch_first=True, enforce_sorted=self.needs_sorted_batch
            )
            if self.adapters is None:
                out, _ = self.rnn(packed)
            else:  # the fused layer with W_ih + B A in place of W_ih (differentiable in B)
                merged = self.adapters.merged(dict(self.rnn.named_parameters()))
                out, _ = functional_call(self.rnn, merged, (packed,))
            y, _ = pad_packed_sequence(out, batch_first=True, total_length=total)  # (B, T, H*dirs)
        return y


def _check_lengths(lengths: Tensor, total: int, *, sorted_: bool) -> Tensor:
    """``lengths`` as CPU int64 (pack_padded_sequence wants them there), checked.

    Raises:
        ValueError: a length outside [1, total], or (``sorted_``) not in decreasing order.
    """
    lengths = lengths.to(device="cpu", dtype=torch.int64)
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > total):
        raise ValueError(f"lengths must be in [1, {total}], got {lengths.tolist()}")
    if sorted_ and bool((lengths[1:] > lengths[:-1]).any()):
        raise ValueError("the DP model needs a batch sorted by decreasing length")
    return lengths


def _adapters(cfg: ModelConfig) -> LowRankAdapters:
    """Fresh adapters (fixed ``A``, zero ``B``) for every GRU input projection of ``cfg``."""
    dirs = 2 if cfg.bidirectional else 1
    first = cfg.frontend_dim or cfg.input_dim
    widths = [first] * dirs + [cfg.output_dim] * dirs * (cfg.num_layers - 1)
    return LowRankAdapters(
        widths, 3 * cfg.hidden_size, cfg.adapter_rank, bidirectional=cfg.bidirectional
    )


def _dp_cell(cell: str, *, fast: bool) -> type[nn.Module]:
    """The DP twin of a recurrent layer type: ``FastGRU`` (``fast``) or Opacus's layer.

    ``FastGRU`` comes without Opacus: non-private training uses it too (it is faster than the
    fused GRU's backward here), and importing opacus costs ~1.3 s (measured here) and configures
    the root logger. Code that wraps a model in Opacus imports
    ``fedspeech.fast_gru_grad_sampler`` first (``fedspeech_client.dp_sgd`` does), which registers
    FastGRU's grad samplers; without it Opacus accepts the model, but its generic (functorch)
    per-sample gradients fail on FastGRU's first backward ("parameter tensor at meta", Opacus
    1.6; ``tests/test_privacy.py`` run on its own found it in 2026-12).
    """
    if fast:
        from fedspeech.fast_gru import FastGRU

        return FastGRU
    from opacus.layers import DPGRU, DPLSTM, DPRNN

    return {"gru": DPGRU, "lstm": DPLSTM, "rnn": DPRNN}[cell]


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; shared/aliased parameters counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def trainable_names(
    cfg: ModelConfig, trainable: Trainable = "all", freeze_layers: int = 0
) -> list[str]:
    """Plain names (``plain_state_dict`` order) of the weights that train; the rest stay fixed.

    ``trainable`` picks a subset (``all``; ``head``: the output LayerNorm and Linear;
    ``norm-bias``: every bias plus that head, as BitFit trains biases and the task's head;
    ``adapters``: the low-rank adapters' ``B`` factors plus that head), and
    ``freeze_layers`` fixes the front-end and that many of the lowest recurrent layers on top of
    it. Under DP-SGD only these weights are clipped and noised, and a federated round exchanges
    only them.

    Raises:
        ValueError: ``trainable`` unknown, ``freeze_layers`` outside ``0..num_layers``, or
            ``adapters`` on a model without them (``adapter_rank = 0``).
    """
    if trainable not in get_args(Trainable):
        raise ValueError(f"trainable must be one of {get_args(Trainable)}, got {trainable!r}")
    if trainable == "adapters" and not cfg.adapter_rank:
        raise ValueError("trainable = 'adapters' needs a model with adapters (adapter_rank >= 1)")
    if not 0 <= freeze_layers <= cfg.num_layers:
        raise ValueError(f"freeze_layers must be in [0, {cfg.num_layers}], got {freeze_layers}")
    names = []
    for name in plain_shapes(cfg):
        layer = _RNN_LAYER.fullmatch(name)
        if (name.startswith("frontend.") and freeze_layers) or (
            layer and int(layer[1]) < freeze_layers
        ):
            continue
        top = name.startswith(("norm.", "head."))
        chosen = {
            "all": True,
            "head": top,
            "norm-bias": top or _is_bias(name),
            "adapters": top or name.startswith("adapters.up."),
        }[trainable]
        if chosen:
            names.append(name)
    return names


def _is_bias(name: str) -> bool:
    """``head.bias``, ``rnn.bias_ih_l0_reverse``, ...: a bias vector, by its plain name."""
    return name.rsplit(".", 1)[-1].startswith("bias")


def set_trainable(
    model: nn.Module, trainable: Trainable = "all", freeze_layers: int = 0
) -> list[nn.Parameter]:
    """Fix every weight outside ``trainable_names``; return the parameters that still train.

    Works on either flavour (also inside Opacus's ``GradSampleModule``): ``named_parameters``
    yields each tensor once under its plain name, and ``FastGRU``'s and Opacus's layers alias
    their internal projections to those same tensors, so these are fixed too.
    """
    inner = unwrap(model)
    keep = set(trainable_names(inner.cfg, trainable, freeze_layers))
    for name, param in inner.named_parameters():
        param.requires_grad_(name in keep)
    return [p for p in inner.parameters() if p.requires_grad]


def with_fresh_adapters(state: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """``state`` (a model without adapters) plus ``cfg``'s fresh adapters: fixed ``A``, zero ``B``.

    The result computes exactly what ``state`` does. Draws nothing from the global RNG.
    """
    if not cfg.adapter_rank:
        return dict(state)
    fresh = _adapters(cfg).state_dict()  # every other tensor is taken from ``state``
    return {
        k: state[k] if k in state else fresh[k.removeprefix("adapters.")] for k in plain_shapes(cfg)
    }


def without_adapters(
    state: Mapping[str, Tensor], cfg: ModelConfig
) -> tuple[dict[str, Tensor], ModelConfig]:
    """The same model as a plain one: adapters merged into the input projections
    (``fedspeech.adapters.merged_state``), for export; other models are returned as they are."""
    if not cfg.adapter_rank:
        return dict(state), cfg
    return merged_state(state), dataclasses.replace(cfg, adapter_rank=0)


@functools.lru_cache(maxsize=16)
def plain_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor of the plain flavour's ``state_dict``, in its order.

    Built on the meta device: no memory, no initialisation (at en-public-small's size a real
    build took ~13 ms, several times per client round), no draw from the global RNG.
    Callers must not change the returned mapping (it is cached).
    """
    with torch.device("meta"):
        return {k: v.shape for k, v in BiGRUCTC(cfg, dp=False).state_dict().items()}


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Weights under the plain fused-RNN names, detached CPU copies.

    Accepts either flavour of ``BiGRUCTC``, also inside Opacus's ``GradSampleModule``. Opacus's
    DP layers already register their parameters under the ``nn.GRU`` names (``weight_ih_l0``,
    ``bias_hh_l1_reverse``, ...) with the same gate order (GRU r,z,n; LSTM i,f,g,o), but a nested
    DP layer's ``state_dict()`` also lists internal aliases (``rnn.l0.ih.weight``); these are
    dropped here.

    Raises:
        ValueError: ``model`` is not (a wrapper of) a ``BiGRUCTC``.
    """
    inner = unwrap(model)
    expected = plain_shapes(inner.cfg)
    # named_parameters() yields each Parameter once, first under its plain (renamed) name.
    tensors: dict[str, Tensor] = dict(inner.named_parameters())
    tensors.update(inner.named_buffers())
    out: dict[str, Tensor] = {}
    for name, ref in expected.items():
        if name not in tensors or tensors[name].shape != ref:
            raise ValueError(f"model has no tensor {name!r} of shape {tuple(ref)}")
        out[name] = tensors[name].detach().to("cpu", copy=True).contiguous()
    return out


def load_plain_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load plain-named weights into either flavour (in place), strictly.

    Raises:
        ValueError: keys missing or unexpected, or shapes differ.
    """
    inner = unwrap(model)
    params: dict[str, Tensor] = dict(inner.named_parameters())
    params.update(inner.named_buffers())
    expected = set(plain_shapes(inner.cfg))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, value in state.items():
            target = params[name]
            if target.shape != value.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(target.shape)}")
            target.copy_(value)


def convert_model(model: nn.Module, *, dp: bool, dp_rnn: DPRNNImpl = "fast") -> BiGRUCTC:
    """A new ``BiGRUCTC`` of the requested flavour with ``model``'s weights (same device, dtype)."""
    inner = unwrap(model)
    ref = next(inner.parameters())
    out = BiGRUCTC(inner.cfg, dp=dp, dp_rnn=dp_rnn).to(device=ref.device, dtype=ref.dtype)
    load_plain_state_dict(out, plain_state_dict(inner))
    out.train(inner.training)
    out.trunk_given = inner.trunk_given
    return out


def unwrap(model: nn.Module) -> BiGRUCTC:
    """The ``BiGRUCTC`` inside Opacus's ``GradSampleModule`` (or the model itself)."""
    inner = getattr(model, "_module", model)
    if not isinstance(inner, BiGRUCTC):
        raise ValueError(f"expected a BiGRUCTC (optionally Opacus-wrapped), got {type(model)}")
    return inner
