"""AlphaEdit's null-space projection, as a switch on any method's closed form (the paper's "one line").

Write the update as Δ = Δ̃P, P the projector onto the (near) null space of the preserved keys'
second moment C0: then ΔK0 ≈ 0 whatever Δ̃ is, so a method's λ‖ΔK0‖² term has nothing left to
weigh and α‖Δ‖² takes its place. Minimising ‖ΔK − R‖² + ‖ΔK_p‖² + α‖Δ‖² over such Δ gives the
paper's Eq. 14, which the authors' code solves as (AlphaEdit/AlphaEdit_main.py, L130-132):

    X = solve(P (K Kᵀ + C_p) + α I,  P K Rᵀ),   Δ = Xᵀ   ⇔   Δ = R Kᵀ P (C_p P + K Kᵀ P + α I)⁻¹

Factored as Δ = R Vᵀ with V = solve(P (K Kᵀ + C_p) + α I, P K)  [d0, u], in config.solve_dtype
(float32 in the authors' code), α = config.l2_alpha (their "L2", 10).

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


def projected_solve(keys: torch.Tensor, resid: torch.Tensor, stats: LayerStatistics, config: EditConfig) -> LowRankDelta:
    if stats.projector is None:
        raise ValueError("the projected update needs the null-space projector of this layer")
    dtype = getattr(torch, config.solve_dtype)
    P = stats.projector.to(dtype)  # [d0, d0]
    K, R = keys.to(dtype), resid.to(dtype)  # [d0, u], [d, u]
    eye = torch.eye(K.shape[0], dtype=dtype, device=K.device)
    lhs = P @ (K @ K.T + stats.preserved.to(dtype)) + config.l2_alpha * eye  # [d0, d0]
    right = torch.linalg.solve(lhs, P @ K)  # V [d0, u]
    return LowRankDelta(R.float(), right.float())
