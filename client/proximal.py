"""FedProx's proximal term as a decoupled step after every optimizer step (DP and non-DP alike).

FedProx (Li et al., 2020) adds ``mu / 2 * ||w - w_global||^2`` to each client's local loss, which
pulls the local weights back towards the round's global model. Its gradient ``mu * (w - w_global)``
needs no data, so here it is not part of the loss at all:

- With DP-SGD the loss gradient is clipped per sample and noised. A parameter-only loss term has
  no per-sample gradient (Opacus's hooks never see it), and clipping or noising a term that holds
  no private data would only distort it. The proximal pull is applied after the private step
  instead: it depends only on the DP output and ``w_global`` (which the client already has), so
  it is post-processing and costs no privacy.
- The step is ``w <- w - lr * mu * (w - w_global)`` (under ``no_grad``), one plain gradient step
  on the proximal term with the optimizer's learning rate, decoupled from the optimizer's
  momentum and Adam scaling, the way AdamW decouples weight decay. Both paths use the same step,
  so DP and non-DP FedProx mean the same thing.
- It hooks the *inner* torch optimizer (``register_step_post_hook``): Opacus's ``DPOptimizer``
  calls that optimizer's ``step`` only for real steps, not for the skipped ones of
  ``BatchMemoryManager``'s accumulation, so the pull happens once per logical step.

``mu = 0`` registers nothing: training is bit for bit what it is without FedProx.

>>> net = torch.nn.Linear(2, 1)
>>> opt = torch.optim.SGD(net.parameters(), lr=0.5)
>>> add_proximal_step(opt, mu=1.0)
>>> start = net.weight.detach().clone()
>>> with torch.no_grad():
...     _ = net.weight.add_(1.0)  # as if a gradient step had moved it by 1
>>> opt.step()  # no gradients: SGD does nothing, the proximal pull halves the distance
>>> torch.allclose(net.weight - start, torch.full_like(start, 0.5))
True
"""

from __future__ import annotations

from typing import Any

import torch


def add_proximal_step(optimizer: torch.optim.Optimizer, mu: float) -> None:
    """Pull every parameter towards its current value by ``lr * mu`` of the gap after each step.

    Call it before training starts, while the parameters still hold the global weights: their
    values now become the anchor ``w_global``.

    Args:
        optimizer: the torch optimizer that takes the steps (for DP: the one given to Opacus).
        mu: the proximal weight (FedProx's ``proximal-mu``); 0 adds nothing.

    Raises:
        ValueError: ``mu`` negative or not finite, or ``lr * mu > 1`` (the pull would overshoot
            the anchor and diverge).
    """
    if not 0.0 <= mu < float("inf"):
        raise ValueError(f"proximal mu must be a finite number >= 0, got {mu}")
    if mu == 0.0:
        return
    for group in optimizer.param_groups:
        if float(group["lr"]) * mu > 1.0:
            raise ValueError(f"lr {group['lr']} x proximal mu {mu} > 1: the pull would diverge")
    anchors = [
        [p.detach().clone() for p in group["params"]] for group in optimizer.param_groups
    ]  # per group, per parameter: w_global, same shapes as the parameters

    def pull(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for group, anchor in zip(opt.param_groups, anchors, strict=True):
                weight = float(group["lr"]) * mu
                for param, start in zip(group["params"], anchor, strict=True):
                    # w <- w - lr * mu * (w - w_global), i.e. lerp(w, w_global, lr * mu)
                    param.lerp_(start, weight)

    optimizer.register_step_post_hook(pull)
