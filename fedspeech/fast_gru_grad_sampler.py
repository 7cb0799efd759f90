"""Opacus registration of ``FastGRU``: importing this module makes Opacus accept the layer.

Opacus's hooks-based ``GradSampleModule`` treats every module that owns trainable parameters as a
leaf needing a grad sampler, and does not look inside one without a registered sampler (it falls
back to functorch on the whole module). ``FastGRU`` owns its tensors twice: under the ``nn.GRU``
names, and inside its ``nn.Linear`` gate projections. With a sampler registered for ``FastGRU``,
Opacus hooks both levels:

* each projection's hooks compute the per-sample gradients with Opacus's own ``nn.Linear`` grad
  sampler, one ``einsum`` over time of (inputs, gate gradients), scaled for the loss reduction and
  accumulated exactly like any other layer's;
* the ``FastGRU`` level contributes nothing (the sampler below returns no gradients); its hooks
  only count the layer's forward/backward passes, so Opacus promotes the accumulated gradients to
  ``p.grad_sample`` after the last hook of the pass, whichever of the two levels fires last.

So ``PrivacyEngine``, ``DPOptimizer`` (clipping, noise), Poisson sampling and the accountants run
unchanged. Only the default ``grad_sample_mode="hooks"`` is supported.

``per_sample_grads_only(model)`` then stops autograd from also computing the projections' summed
weight gradients, which DP-SGD never uses (``fast_gru.GateProjection``): a quarter of the
projections' matrix products.

``fresh_grad_samples_taken()``, while DP-SGD trains, has Opacus 1.6 keep each layer's first
per-sample gradient as it comes instead of copying it into a zero-filled tensor of the same
shape (``create_or_accumulate_grad_sample``): en-public-small's 3 M weights x a batch of 8 are
95 MB zeroed and copied per step: 0-8 % of an all-weights step over the runs measured, about
the size of the machine's noise (``benchmarks/dp_subsets.py``, docs/benchmarks.md).
The values are the same; a contribution for upstream (docs/benchmarks.md).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import opacus
import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.linear import compute_linear_grad_sample
from torch import Tensor, nn

from fedspeech.fast_gru import FastGRU, GateProjection

__all__ = [
    "FastGRU",
    "compute_fast_gru_grad_sample",
    "fresh_grad_samples_taken",
    "per_sample_grads_only",
]

_ACCUMULATOR_MODULE = "opacus.grad_sample.grad_sample_module"  # calls it by its global name
OPACUS_VERSIONS = ("1.6.",)  # whose hooks keep per-sample gradients in ``_current_grad_sample``

# The projections are nn.Linear subclasses: Opacus picks samplers by exact type.
register_grad_sampler(GateProjection)(compute_linear_grad_sample)


def per_sample_grads_only(model: nn.Module) -> int:
    """Make every ``FastGRU`` projection in ``model`` skip its summed weight gradient.

    For a model whose trained weights get their gradients from Opacus's per-sample gradients
    (``GradSampleModule`` hooks, ``DPOptimizer``): their ``.grad`` stays None after backward
    until the optimizer sets it to the clipped, noised sum. Returns how many projections changed.
    """
    projections = [m for m in model.modules() if isinstance(m, GateProjection)]
    for projection in projections:
        projection.summed_grads = False
    return len(projections)


@register_grad_sampler(FastGRU)
def compute_fast_gru_grad_sample(
    layer: FastGRU, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients owed by the ``FastGRU`` level itself: none (its projections own them).

    Args:
        layer: the GRU.
        activations: its forward inputs (unused).
        backprops: gradient of its output (unused).

    Returns:
        An empty mapping.
    """
    return {}


def _take_or_add(*, param: torch.Tensor, grad_sample: Tensor, max_batch_len: int) -> None:
    """Opacus's ``create_or_accumulate_grad_sample``, keeping a first full-batch ``grad_sample``
    itself. It may share memory with the hook's tensors, so it is never written in place: a
    module used twice in a pass adds out of place."""
    if not param.requires_grad:
        return
    n = grad_sample.shape[0]
    current: Tensor | None = getattr(param, "_current_grad_sample", None)
    if current is None:
        if n == max_batch_len:
            param._current_grad_sample = grad_sample  # type: ignore[attr-defined]
        else:  # a shorter batch: zero-padded, as Opacus does
            padded = grad_sample.new_zeros((max_batch_len, *grad_sample.shape[1:]))
            padded[:n] = grad_sample
            param._current_grad_sample = padded  # type: ignore[attr-defined]
    else:
        added = current[:n] + grad_sample
        if n < len(current):
            added = torch.cat([added, current[n:]])
        param._current_grad_sample = added  # type: ignore[attr-defined]


@contextmanager
def fresh_grad_samples_taken() -> Iterator[bool]:
    """While the block runs, Opacus keeps each first per-sample gradient as it comes (module
    docstring); yields whether it does: only on Opacus 1.6, whose internals this replaces, and
    restored afterwards."""
    module = sys.modules.get(_ACCUMULATOR_MODULE)
    original = getattr(module, "create_or_accumulate_grad_sample", None)
    if original is None or not opacus.__version__.startswith(OPACUS_VERSIONS):
        yield False
        return
    module.create_or_accumulate_grad_sample = _take_or_add  # type: ignore[union-attr]
    try:
        yield True
    finally:
        module.create_or_accumulate_grad_sample = original  # type: ignore[union-attr]
