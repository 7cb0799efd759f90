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
"""

from __future__ import annotations

from opacus.grad_sample import register_grad_sampler
from torch import Tensor, nn

from fedspeech.fast_gru import FastGRU

__all__ = ["FastGRU", "compute_fast_gru_grad_sample"]


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
