"""From a change of the residual stream to the change of W_out's output that makes it.

MEMIT spreads the residual change R = (z − z_now) / (layers left) over the edited layers and asks
each W_out for it: W' k = W k + R. That presumes the block adds the MLP output to the residual
stream as it is, which holds for Llama, GPT-2 and most families. Gemma-2/3 and OLMo-2 normalise
it first:

    h ← h + norm(W k),      norm(m) = g ⊙ m / rms(m)      (g: the norm's per-feature scale)

so asking W_out for R moves the residual by something else (and by far less: norm divides by
the RMS of the whole output). W_out must instead produce an m* with norm(m*) as close as possible
to t = norm(m) + R.

norm(m*) = g ⊙ v with v = m*/rms(m*), a vector of unit RMS: the norm fixes the size of a layer's
contribution and lets an edit choose only its direction. So we solve

    v* = argmin ‖g ⊙ v − t‖²  subject to  mean(v²) = 1,
    whose solution is v_j = g_j t_j / (g_j² + λ)  with the one λ (> −min g²) that gives mean(v²) = 1

(a Lagrange multiplier, found by bisection per request; λ = 0 when t is exactly reachable). A
feature the norm scales by g_j ≈ 0 (Gemma-3-270M has some) cannot be steered and would blow up
as t_j / g_j: it keeps its present value of m / rms(m), and the other features share the rest
of the unit RMS. Every m* = c·v* (c > 0) has the same norm; we take the multiple
closest to the current output (c = ⟨v*, m⟩ / ⟨v*, v*⟩, the least change of W_out's output), raised
where needed until the norm's ε no longer matters. The next layer's R is measured on the edited
model, so what one layer cannot reach the following ones take up.

g is read off the norm module itself (the norm of a constant vector), so any RMSNorm
parametrisation (Gemma's 1 + w, OLMo's w) works without knowing it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .layouts import Layout, get_module


def unit_rms_target(scale: torch.Tensor, target: torch.Tensor, current: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """v minimising ‖scale ⊙ v − target‖ over vectors of unit RMS, per row of target [u, d].

    Features the norm scales by (nearly) zero cannot be steered: they keep their value in
    `current` (the present output's m / rms(m)), and the rest share what is left of the RMS.
    """
    dead = scale.abs() <= 1e-6 * scale.abs().max()  # [d]
    live_scale = torch.where(dead, torch.ones_like(scale), scale)
    g2, gt = live_scale.pow(2), live_scale * target  # [d], [u, d]
    budget = scale.numel() - torch.where(dead, current, torch.zeros_like(current)).pow(2).sum(-1, keepdim=True)  # Σ_live v² [u, 1]
    budget = budget.clamp_min(1e-12)

    def excess(lam: torch.Tensor) -> torch.Tensor:  # Σ_live v(λ)² − budget, decreasing in λ
        return torch.where(dead, torch.zeros_like(gt), gt / (g2 + lam)).pow(2).sum(-1, keepdim=True) - budget

    floor = float(torch.where(dead, torch.full_like(g2, float("inf")), g2).min())
    lo = torch.full_like(budget, -floor)  # v blows up as λ → −min g²: the excess is positive near it
    hi = torch.full_like(budget, max(float(g2.max()), 1.0))
    while bool((unbracketed := excess(hi) > 0).any()):  # widen until every row's root is bracketed
        hi = torch.where(unbracketed, hi * 4, hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        above = excess(mid) > 0
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return torch.where(dead, current, gt / (g2 + hi))


def output_change_for(norm: Callable[[torch.Tensor], torch.Tensor], output: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """The change of the MLP output (rows [u, d]) after which norm(output + change) is as close to
    norm(output) + wanted as a normalised output can be."""
    with torch.no_grad():
        ones = torch.ones(1, output.shape[-1], dtype=output.dtype, device=output.device)
        scale = norm(ones)[0]  # g / sqrt(1 + ε)                                              [d]
        current = output / output.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)  # m / rms(m)   [u, d]
        v = unit_rms_target(scale, norm(output) + wanted, current)  # the direction to produce  [u, d]
        closest = (v * output).sum(-1, keepdim=True) / (v * v).sum(-1, keepdim=True)  # least change   [u, 1]
        c = torch.where(closest > 0, closest, output.pow(2).mean(-1, keepdim=True).sqrt())  # past 90°: keep the size
        reached = scale * v
        for _ in range(60):  # an output small against √ε is shrunk by the norm: scale it up until it is not
            short = (norm(c * v) - reached).norm(dim=-1, keepdim=True) > 1e-3 * reached.norm(dim=-1, keepdim=True)
            if not bool(short.any()):
                break
            c = torch.where(short, c * 2, c)
        return c * v - output


def mlp_output_change(model: nn.Module, layout: Layout, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """What W_out of `layer` must add to its output at `keys` ([u, d0]) so that the residual stream
    moves by `resid` ([u, d]): `resid` itself, unless the block normalises the MLP output first."""
    if layout.mlp_out_norm is None:
        return resid
    norm = get_module(model, f"{layout.block(layer)}.{layout.mlp_out_norm}")
    with torch.no_grad():
        output = _w_out_output(model, layout, layer, keys).float()
        norm_param = next(norm.parameters(), get_module(model, layout.mlp_out_path(layer)).weight)
        change = output_change_for(lambda x: norm(x.to(norm_param.dtype)).float(), output, resid.to(output.device))
    return change.to(resid.device, resid.dtype)


def mlp_contribution(model: nn.Module, layout: Layout, layer: int, keys: torch.Tensor) -> torch.Tensor:
    """What the MLP of `layer` adds to the residual stream at `keys` ([u, d0]): W_out k (+ bias),
    through the block's post-MLP norm where it has one. [u, d] float32."""
    with torch.no_grad():
        output = _w_out_output(model, layout, layer, keys)
        if layout.mlp_out_norm is not None:
            output = get_module(model, f"{layout.block(layer)}.{layout.mlp_out_norm}")(output)
    return output.float().cpu()


def _w_out_output(model: nn.Module, layout: Layout, layer: int, keys: torch.Tensor) -> torch.Tensor:
    """W_out k (+ bias) at `keys` [u, d0], as the model computes it (its device and dtype)."""
    w_out = get_module(model, layout.mlp_out_path(layer))
    return w_out(keys.to(w_out.weight.device, w_out.weight.dtype))
