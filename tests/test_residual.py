"""residual.py: the W_out output that moves a normalised MLP contribution by a wanted amount,
against slow float64 references."""

from __future__ import annotations

import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from alphaedit.residual import output_change_for, unit_rms_target

D = 24


def _scale(seed: int) -> torch.Tensor:
    """Per-feature scales like Gemma-3-270M's: mostly large, some near zero, a few negative, one dead."""
    g = torch.randn(D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    g[0], g[1], g[2] = 0.0, 1e-4, -5.0
    return g


def _objective(g: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (g * v - t).pow(2).sum(-1)


def _reference(g: torch.Tensor, t: torch.Tensor, current: torch.Tensor, steps: int = 20000) -> torch.Tensor:
    """Projected gradient descent, one row at a time, over unit-RMS vectors whose dead feature
    (index 0) is fixed at its current value."""
    rows = []
    for target, now in zip(t, current):
        radius = (D - now[0] ** 2).sqrt()  # the live features' share of the RMS
        live = target[1:] / g[1:].abs().clamp_min(1.0)
        live = live * radius / live.norm()
        lr = 0.5 / float(g.pow(2).max())
        for _ in range(steps):
            live = live - lr * g[1:] * (g[1:] * live - target[1:])
            live = live * radius / live.norm()
        rows.append(torch.cat([now[:1], live]))
    return torch.stack(rows)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).mean(-1, keepdim=True).sqrt()


def test_the_direction_is_the_best_unit_rms_vector():
    g = _scale(0)
    g[1] = 0.05  # small but steerable
    generator = torch.Generator().manual_seed(1)
    t = torch.randn(4, D, generator=generator, dtype=torch.float64) * 4
    current = _unit(torch.randn(4, D, generator=generator, dtype=torch.float64))
    v = unit_rms_target(g, t, current)
    assert torch.allclose(v.pow(2).mean(-1), torch.ones(4, dtype=torch.float64), atol=1e-9)
    assert torch.equal(v[:, 0], current[:, 0])  # the dead feature keeps its value, never t / 0
    reference = _reference(g, t, current)
    assert (_objective(g, v, t) <= _objective(g, reference, t) + 1e-7).all()


def test_a_reachable_target_is_reached_exactly():
    g = _scale(2)
    v0 = _unit(torch.randn(3, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    torch.testing.assert_close(unit_rms_target(g, g * v0, v0), v0, rtol=0, atol=1e-8)


def _gemma_norm(eps: float, seed: int) -> Gemma3RMSNorm:
    norm = Gemma3RMSNorm(D, eps=eps).double()
    with torch.no_grad():
        norm.weight.copy_(_scale(seed) - 1)  # Gemma's norm multiplies by 1 + weight
    return norm.requires_grad_(False)


def test_the_norm_of_the_changed_output_is_the_wanted_one():
    norm = _gemma_norm(1e-6, 4)
    generator = torch.Generator().manual_seed(5)
    output = torch.randn(3, D, generator=generator, dtype=torch.float64) * 0.2  # Gemma-3-270M's outputs: RMS 0.05–0.7
    # a wanted change a normalised output can make exactly: a turn on the unit-RMS sphere that
    # leaves the dead feature where it is
    now = _unit(output)
    turned = now + 0.3 * torch.randn(3, D, generator=generator, dtype=torch.float64)
    live = turned[:, 1:] * (D - now[:, :1] ** 2).sqrt() / turned[:, 1:].norm(dim=-1, keepdim=True)
    turned = torch.cat([now[:, :1], live], dim=-1)
    scale = norm(torch.ones(1, D, dtype=torch.float64))[0]
    wanted = scale * turned - norm(output)
    change = output_change_for(norm, output, wanted)
    # up to the norm's ε (1e-6 against a mean square of ~0.04): a relative 1e-5
    torch.testing.assert_close(norm(output + change), norm(output) + wanted, rtol=1e-4, atol=1e-6)
    # of the outputs with that norm, the one closest to the current output
    new = output + change
    for factor in (0.9, 1.1):
        assert ((factor * new - output).norm(dim=-1) > change.norm(dim=-1)).all()
    # no change wanted, none made (up to the norm's ε, which makes today's output a hair short of unit RMS)
    assert (output_change_for(norm, output, torch.zeros_like(output)).norm(dim=-1) < 1e-3 * output.norm(dim=-1)).all()


def test_an_output_shrunk_by_the_norms_epsilon_is_scaled_up_until_it_is_not():
    norm = _gemma_norm(1e-2, 6)  # an ε comparable with the output's mean square
    generator = torch.Generator().manual_seed(7)
    output = torch.randn(2, D, generator=generator, dtype=torch.float64) * 0.01
    wanted = torch.randn(2, D, generator=generator, dtype=torch.float64)
    change = output_change_for(norm, output, wanted)
    scale = norm(torch.ones(1, D, dtype=torch.float64))[0]
    best = scale * unit_rms_target(scale, norm(output) + wanted, _unit(output))
    assert ((norm(output + change) - best).norm(dim=-1) <= 1e-3 * best.norm(dim=-1)).all()
