"""AlphaEdit's null-space projection, as a switch on any method's closed form (the paper's "one line").

Write the update as Δ = Δ̃P, P the projector onto the (near) null space of the preserved keys'
second moment C0: then ΔK0 ≈ 0 whatever Δ̃ is, so a method's λ‖ΔK0‖² term has nothing left to
weigh and α‖Δ‖² takes its place. Minimising ‖ΔK − R‖² + ‖ΔK_p‖² + α‖Δ‖² over such Δ gives the
paper's Eq. 14, which the authors' code solves as (AlphaEdit/AlphaEdit_main.py, L130-132):

    X = solve(P (K Kᵀ + C_p) + α I,  P K Rᵀ),   Δ = Xᵀ   ⇔   Δ = R Kᵀ P (C_p P + K Kᵀ P + α I)⁻¹

Factored as Δ = R Vᵀ with V = solve(P (K Kᵀ + β C_p) + α I, P K)  [d0, u], in config.solve_dtype
(float32 in the authors' code), α = config.l2_alpha (their "L2", 10), β = config.earlier_weight
(1 in their code: the earlier batches' keys weigh as much as the batch's own).

P spans an exact null space only where C0's spectrum has a gap; where it has none (SmolLM2) the
update still moves the MLP output at preserved keys. BetaEdit (Liu et al., IJCAI 2026) keeps a
leak penalty λ₁ tr(Δ C0 Δᵀ) (the mean of ‖Δk‖² over preserved keys, weighed) in the objective,
which adds λ₁ C0 beside C_p:

    V = solve(P (K Kᵀ + β C_p + λ₁ C0) + α I, P K)       λ₁ = config.leak_weight (0: AlphaEdit)

(BetaEdit also rebuilds P every τ edits from C0 and the edited keys; that part is not here.)

MEMIT, MEMIT-seq, RECT, PRUNE, EMMET and ENCORE all get this same solve under `--project`: their ridge (or
constraint metric) on C0 is what the projection replaces. With C_p = 0 it is EMMET's equality-
constrained form with C⁻¹ → P and its λ → α (push-through identity), so EMMET + projection needs
nothing of its own either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..updates import LayerStatistics, LowRankDelta

if TYPE_CHECKING:
    from ..config import EditConfig


def _held_metric(stats: LayerStatistics, config: EditConfig, dtype: torch.dtype) -> torch.Tensor:
    """What the solve holds still besides the batch's fit: β C_p, the earlier batches' keys (β = 1
    in the authors' code), plus λ₁ C0, the preserved keys' leak through P (λ₁ = 0 in theirs). [d0, d0]"""
    held = config.earlier_weight * stats.preserved.to(dtype)
    if config.leak_weight:
        if stats.second_moment is None:
            raise ValueError("the leak penalty (leak_weight) needs the second moment C0 of this layer")
        held = held + config.leak_weight * stats.second_moment.to(dtype).to(held.device)
    return held


def projected_solve(keys: torch.Tensor, resid: torch.Tensor, stats: LayerStatistics, config: EditConfig) -> LowRankDelta:
    if stats.projector is None:
        raise ValueError("the projected update needs the null-space projector of this layer")
    dtype = getattr(torch, config.solve_dtype)
    P = stats.projector.to(dtype)  # [d0, d0]
    K, R = keys.to(dtype), resid.to(dtype)  # [d0, u], [d, u]
    eye = torch.eye(K.shape[0], dtype=dtype, device=K.device)
    held = _held_metric(stats, config, dtype)  # β C_p (+ λ₁ C0)
    lhs = P @ (K @ K.T + held) + config.l2_alpha * eye  # [d0, d0]
    right = torch.linalg.solve(lhs, P @ K)  # V [d0, u]
    return LowRankDelta(R.float(), right.float())


def joint_projected_solve(keys: dict[int, torch.Tensor], resid: torch.Tensor, stats: dict[int, LayerStatistics],
                          config: EditConfig) -> dict[int, LowRankDelta]:
    """The projected solve over several layers at once (`spread="joint"`, not in the paper).

    The authors' loop gives layer i of L a 1/(L − i) share of the residual still missing; the
    projected solve writes only part of a share (α shrinks it), the rest passes to the next layer,
    and the block's last layer ends up with over half of every update: its null space fills first
    (BENCHMARKS.md). Here every layer's Δ_l = Δ_l P_l is chosen together, for the one residual R:

        min  ‖Σ_l Δ_l K_l − R‖² + Σ_l (β ‖Δ_l K_p,l‖² + λ₁ tr(Δ_l C0,l Δ_lᵀ) + α ‖Δ_l‖²)

        V_l = P_l (P_l (β C_p,l + λ₁ C0,l) P_l + α I)⁻¹ P_l K_l   [d0, u]   what a unit of residual asks of layer l
        G   = Σ_l K_lᵀ V_l                                [u, u]
        Δ_l = R (I + G)⁻¹ V_lᵀ                            [d, d0]

    so each layer takes the part its own room allows. With one layer it is `projected_solve`
    (push-through identity). It assumes, as the residual's spreading does, that a layer's MLP
    output reaches the last edited layer unchanged (no norm after the MLP). The editor keeps the
    authors' loop around it: at each layer it solves over the layers still to write, applies that
    layer's Δ alone and plans the rest again on the model as it then is (editor.py).
    """
    dtype = getattr(torch, config.solve_dtype)
    R = resid.to(dtype)  # [d, u]
    asks: dict[int, torch.Tensor] = {}
    G = torch.zeros(R.shape[1], R.shape[1], dtype=dtype, device=R.device)  # [u, u]
    for layer, layer_keys in keys.items():
        if stats[layer].projector is None:
            raise ValueError("the projected update needs the null-space projector of this layer")
        P = stats[layer].projector.to(dtype)  # [d0, d0]
        K = layer_keys.to(dtype)  # [d0, u]
        eye = torch.eye(K.shape[0], dtype=dtype, device=K.device)
        held = _held_metric(stats[layer], config, dtype)  # β C_p (+ λ₁ C0)
        metric = P @ held @ P + config.l2_alpha * eye  # [d0, d0], commutes with P
        V = P @ torch.linalg.solve(metric, P @ K)  # [d0, u]
        asks[layer] = V
        G = G + (K.T @ V).to(G.device)
    # E = R (I + G)⁻¹: the residual as the block's layers share it; I + G is symmetric
    shared = torch.linalg.solve(torch.eye(G.shape[0], dtype=dtype, device=G.device) + G, R.T).T  # [d, u]
    # each layer its own copy of the shared factor: a journal stores every layer's factors apart
    return {layer: LowRankDelta(shared.float().clone(), V.float().to(shared.device)) for layer, V in asks.items()}
