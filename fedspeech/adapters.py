"""Low-rank adapters on the recurrent layers' input projections (``trainable = "adapters"``).

Each (layer, direction) input projection ``W_ih`` (``3H x D``) gets a rank-``r`` update
``W_ih + B A``: ``A`` (``r x D``) is fixed and ``B`` (``3H x r``) trains, starting at zero, so a
model with fresh adapters computes exactly what its base model does. Fixing ``A`` is FFA-LoRA
(Sun et al., ICLR 2024): under DP-SGD only ``B``'s ``3H r`` weights are clipped and noised, and
since every party holds the same ``A``, averaging the clients' ``B`` averages their updates
``B A`` exactly (averaging both factors would not).

``A`` is drawn once from a generator seeded with a constant (never the global RNG: building a
model must not shift a seeded run's dropout stream), scaled so that ``A x`` has about ``x``'s
per-unit size, and stored in the state dict beside ``B`` (``adapters.down_l0``,
``adapters.up.l0.weight``, ...): a model directory or checkpoint carries the adapters it was
trained with, and ``merged_state`` folds them into plain ``nn.GRU`` weights for export.

Per-sample gradients stay exact: ``B`` is an ``nn.Linear`` (bias-free) applied to ``A x``, so
Opacus's own ``nn.Linear`` grad sampler gives each utterance's gradient from (``A x``, the gate
gradients) in one product over time, as for ``FastGRU``'s own projections.

>>> adapters = LowRankAdapters([120, 120], gates=96, rank=4)  # one layer, both directions
>>> x = torch.randn(2, 7, 120)
>>> bool(adapters.branch("_l0", x).abs().max() == 0)  # B starts at zero
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

# The generator seed of every A: a constant, so all parties and every later run hold the same A.
_DOWN_SEED = 0x10A5


def projection_suffixes(num_layers: int, bidirectional: bool) -> list[str]:
    """``nn.GRU``'s parameter-name suffixes, one per (layer, direction), in projection order:
    ``["_l0", "_l0_reverse", "_l1", ...]``."""
    directions = ["", "_reverse"] if bidirectional else [""]
    return [f"_l{layer}{d}" for layer in range(num_layers) for d in directions]


class LowRankAdapters(nn.Module):
    """Rank-``rank`` updates ``B A`` of a (bi)directional recurrent stack's input projections.

    Args:
        widths: input width of each (layer, direction) projection, in ``nn.GRU`` order.
        gates: output width of every projection (``3 H`` for a GRU).
        rank: the adapters' rank (>= 1).
        bidirectional: whether the stack reads both ways (``widths`` then lists each layer's
            width twice, forward first).
    """

    def __init__(
        self, widths: Sequence[int], gates: int, rank: int, *, bidirectional: bool = True
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {rank}")
        self.suffixes = projection_suffixes(len(widths) // (1 + bidirectional), bidirectional)
        # skip_init: B starts at zero, so drawing its default init would only shift the global RNG.
        self.up = nn.ModuleDict(
            {s[1:]: nn.utils.skip_init(nn.Linear, rank, gates, bias=False) for s in self.suffixes}
        )
        generator = torch.Generator(device="cpu").manual_seed(_DOWN_SEED)
        for suffix, width in zip(self.suffixes, widths, strict=True):
            # (r, D): rows of unit expected norm, so A x keeps x's per-unit scale.
            down = torch.randn(rank, width, generator=generator, device="cpu") / math.sqrt(width)
            self.register_buffer(f"down{suffix}", down)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every ``B`` to zero: fresh adapters leave the base model unchanged."""
        for layer in self.up.values():
            assert isinstance(layer, nn.Linear)
            nn.init.zeros_(layer.weight)

    def down(self, suffix: str) -> Tensor:
        """``A`` of projection ``suffix`` (``"_l0"``, ``"_l1_reverse"``, ...): ``(r, D)``."""
        down = getattr(self, f"down{suffix}")
        assert isinstance(down, Tensor)
        return down

    def up_layer(self, suffix: str) -> nn.Linear:
        """The ``nn.Linear`` holding ``B`` of projection ``suffix``: weight ``(3H, r)``."""
        layer = self.up[suffix[1:]]
        assert isinstance(layer, nn.Linear)
        return layer

    def delta(self, suffix: str) -> Tensor:
        """``B A``: ``(3H, D)``, the update of ``weight_ih{suffix}``."""
        return self.up_layer(suffix).weight @ self.down(suffix)

    def branch(self, suffix: str, x: Tensor) -> Tensor:
        """``x (B A)^T`` computed as ``B (A x)``: ``(..., D) -> (..., 3H)``."""
        return self.up_layer(suffix)(x @ self.down(suffix).T)

    def merged(self, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``weights`` (an ``nn.GRU``'s named parameters) with every ``B A`` added to its
        ``weight_ih{suffix}``; differentiable in ``B``."""
        out = dict(weights)
        for suffix in self.suffixes:
            out[f"weight_ih{suffix}"] = out[f"weight_ih{suffix}"] + self.delta(suffix)
        return out


def merged_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A plain state dict with its adapters folded into ``rnn.weight_ih_*`` and dropped.

    The result is the state of the same model without adapters (``adapter_rank = 0``): its
    outputs equal the adapted model's to float rounding.
    """
    out = {k: v for k, v in state.items() if not k.startswith("adapters.")}
    for name in state:
        if name.startswith("adapters.down"):
            suffix = name[len("adapters.down") :]
            up = state[f"adapters.up.{suffix[1:]}.weight"].double()  # (3H, r)
            target = f"rnn.weight_ih{suffix}"
            merged = state[target].double() + up @ state[name].double()  # (3H, D)
            out[target] = merged.to(state[target].dtype)
    return out
