"""Back-propagation through time for one ``FastGRU`` direction: total gate gradients of every step.

``GateBackprop`` takes the gate pre-activations of all time steps (``gi`` from the input
projection, ``gh`` from the hidden projection) and the fused kernel's hidden states, and returns
the hidden states; its backward returns ``dL/dgi`` and ``dL/dgh`` of every step, each including
the influence of all later steps. Those are exactly the ``backprops`` that Opacus's ``nn.Linear``
grad sampler needs to form per-sample weight gradients of the two projections.

GRU step (nn.GRU convention), with ``d = dL/dh_t`` in total:
    r = sig(gi_r + gh_r), z = sig(gi_z + gh_z), n = tanh(gi_n + r*gh_n), h = (1-z)*n + z*h_prev
    dgi_n = d*a_n with a_n = (1-z)(1-n^2);  dgh_n = dgi_n*r
    dgi_r = dgh_r = d*a_n*gh_n*r(1-r);     dgi_z = dgh_z = d*(h_prev-n)*z(1-z)
    dL/dh_prev = d*z + dgh @ W_hh
Every coefficient is computed for all steps at once; only the last line is sequential, so the
loop costs three tensor ops per step. All tensors are in natural time: the reverse direction's
loop simply runs forwards. Padding steps get zero coefficients, which makes their gate gradients
zero and stops the gradient that reaches a reverse-direction start state (a constant zero).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class GateBackprop(torch.autograd.Function):
    """Hidden states from per-step gate pre-activations; backward = BPTT to those pre-activations.

    ``apply(gi, gh, h_prev, h, valid, w_hh, reverse)``:

    * ``gi``, ``gh``: ``(B, T, 3H)`` gate pre-activations (r, z, n), with autograd history;
    * ``h_prev``: ``(B, T, H)`` the state each step starts from (zero at a direction's first step);
    * ``h``: ``(B, T, H)`` the fused kernel's states, zero on padding (returned, as a view);
    * ``valid``: ``(B, T)`` bool, True on real frames;
    * ``w_hh``: ``(3H, H)`` detached (its gradient flows through ``gh``'s projection);
    * ``reverse``: the direction runs from each utterance's last frame to its first.
    """

    @staticmethod
    def forward(
        ctx: Any,
        gi: Tensor,
        gh: Tensor,
        h_prev: Tensor,
        h: Tensor,
        valid: Tensor,
        w_hh: Tensor,
        reverse: bool,
    ) -> Tensor:
        hidden = h.shape[-1]
        # In-place where possible: fewer large temporaries, less heap for the allocator to keep.
        rz = torch.add(gi[..., : 2 * hidden], gh[..., : 2 * hidden]).sigmoid_()  # (B, T, 2H): r|z
        r = rz[..., :hidden]  # (B, T, H)
        gh_n = gh[..., 2 * hidden :]  # (B, T, H)
        n = torch.addcmul(gi[..., 2 * hidden :], r, gh_n).tanh_()  # (B, T, H)
        q = torch.mul(r, r)  # (B, T, H), becomes d(r*gh_n)/d(pre_r) = gh_n * r(1-r):
        torch.sub(r, q, out=q).mul_(gh_n)
        # Saved per step: r, z, n, q (4H). h_prev is shared with the hidden projection's input.
        ctx.save_for_backward(rz, n, q, h_prev, valid, w_hh)
        ctx.reverse = reverse
        return h  # (B, T, H); autograd returns an unmodified input as a view of it

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_h: Tensor) -> tuple[Tensor | None, ...]:
        rz, n, q, h_prev, valid, w_hh = ctx.saved_tensors
        batch, steps, hidden = n.shape
        r, z = rz[..., :hidden], rz[..., hidden:]  # (B, T, H) each
        mask = valid[..., None].to(n.dtype)  # (B, T, 1): 1 on real frames
        carry = z * mask  # (B, T, H): direct share of dL/dh_prev, 0 on padding
        a_n = torch.mul(n, n).neg_().add_(1.0).mul_(mask).mul_(1.0 - z)  # (B, T, H): (1-z)(1-n^2)
        coef = n.new_empty(batch, steps, 3 * hidden)  # (B, T, 3H)
        torch.mul(a_n, q, out=coef[..., :hidden])  # r gate
        coef_z = coef[..., hidden : 2 * hidden]  # (h_prev - n) * z(1-z) * mask, built in place:
        torch.sub(h_prev, n, out=coef_z).mul_(carry).mul_(1.0 - z)
        torch.mul(a_n, r, out=coef[..., 2 * hidden :])  # n gate, hidden side: dgh_n = dgi_n * r
        # d[:, t] starts as dL/dh_t from above; it is total once the step after t has run.
        d = grad_h * mask  # (B, T, H)
        dgh = torch.empty_like(coef)  # (B, T, 3H)
        order = range(steps) if ctx.reverse else range(steps - 1, -1, -1)
        step = 1 if ctx.reverse else -1
        for t in order:
            # dgh_t = d_t * coef_t for the three gates at once, then push d_t to the previous step.
            torch.mul(
                coef[:, t].view(batch, 3, hidden),
                d[:, t, None],
                out=dgh[:, t].view(batch, 3, hidden),
            )  # (B, 3, H)
            if 0 <= t + step < steps:
                d[:, t + step].addcmul_(d[:, t], carry[:, t]).addmm_(dgh[:, t], w_hh)  # (B, H)
        dgi = coef  # reuse: the coefficients are no longer needed
        dgi[..., : 2 * hidden] = dgh[..., : 2 * hidden]  # r, z gates: dgi = dgh
        torch.mul(d, a_n, out=dgi[..., 2 * hidden :])  # n gate: dgi_n = d * a_n
        return dgi, dgh, None, None, None, None, None
