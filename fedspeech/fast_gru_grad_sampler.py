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
"""

from __future__ import annotations

from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.linear import compute_linear_grad_sample
from torch import Tensor, nn

from fedspeech.fast_gru import FastGRU, GateProjection

__all__ = ["FastGRU", "compute_fast_gru_grad_sample", "per_sample_grads_only"]

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
