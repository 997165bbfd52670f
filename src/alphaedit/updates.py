"""The closed-form weight updates: the only part of the pipeline that differs between methods.

Shapes (math orientation): keys K ∈ R^{d0×u}, residuals R ∈ R^{d×u}, update Δ ∈ R^{d×d0},
so that (W + Δ) k ≈ W k + r for the batch's keys. Every rule's Δ has rank ≤ u and is returned
as factors Δ = R Vᵀ with V ∈ R^{d0×u}: a batch's update is stored and reverted as two thin
matrices instead of a d×d0 one.

AlphaEdit (ALGORITHM.md §1.8), as the authors' code solves it:
    X = solve(P (K Kᵀ + C_p) + α I,  P K Rᵀ),   Δ = Xᵀ
which is the paper's Eq. 14, Δ = R Kᵀ P (C_p P + K Kᵀ P + α I)⁻¹, with α = 10.
Factored: V = solve(P (K Kᵀ + C_p) + α I, P K).
MEMIT (§1.9):      Δ = R Kᵀ (λ C0 + K Kᵀ)⁻¹,        V = solve(λ C0 + K Kᵀ, K)      (float64)
MEMIT-seq:         Δ = R Kᵀ (λ C0 + C_p + K Kᵀ)⁻¹
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import EditConfig


@dataclass
class LayerStatistics:
    """What the update of one layer needs to know about preserved knowledge."""

    second_moment: torch.Tensor | None  # C0 = E[k kᵀ] over a corpus, [d0, d0] (MEMIT)
    projector: torch.Tensor | None  # P onto C0's near-null space, [d0, d0] (AlphaEdit)
    preserved: torch.Tensor  # C_p = Σ over earlier batches of K Kᵀ, [d0, d0], float32 as the reference


@dataclass
class LowRankDelta:
    """Δ = left @ rightᵀ: left = R ∈ R^{d×u}, right = V ∈ R^{d0×u} (float32)."""

    left: torch.Tensor
    right: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.left @ self.right.T

    def to(self, device: torch.device | str) -> LowRankDelta:
        return LowRankDelta(self.left.to(device), self.right.to(device))

    def norm(self) -> float:
        """‖left rightᵀ‖_F without forming the d×d0 matrix: ‖·‖² = Σ (leftᵀleft) ⊙ (rightᵀright)."""
        left, right = self.left.double(), self.right.double()
        return float(((left.T @ left) * (right.T @ right)).sum().clamp_min(0).sqrt())


PROJECTOR_RULES = ("absolute", "relative", "energy", "rank")


def null_space_mask(eigenvalues: torch.Tensor, value: float, rule: str = "absolute") -> torch.Tensor:
    """Which eigen-directions of C0 (eigenvalues ascending, as eigh returns them) P keeps.

    absolute: eigenvalue < value (the paper's code, value 2e-2)
    relative: eigenvalue < value · largest eigenvalue
    energy:   drop the largest directions that together carry `value` of the trace (e.g. 0.99)
    rank:     keep exactly int(value) directions, the smallest ones
    """
    if rule == "absolute":
        return eigenvalues < value
    if rule == "relative":
        return eigenvalues < value * eigenvalues.max()
    if rule == "energy":
        # cumulative energy from the top; a direction is preserved until `value` is covered
        from_top = eigenvalues.flip(0).clamp_min(0).cumsum(0) / eigenvalues.clamp_min(0).sum()
        preserved_from_top = torch.cat([torch.ones(1, dtype=torch.bool), from_top[:-1] < value])
        return ~preserved_from_top.flip(0)
    if rule == "rank":
        mask = torch.zeros_like(eigenvalues, dtype=torch.bool)
        mask[: int(value)] = True
        return mask
    raise ValueError(f"projector rule must be one of {', '.join(PROJECTOR_RULES)}, not {rule!r}")


def null_space_projector(second_moment: torch.Tensor, threshold: float, rule: str = "absolute") -> tuple[torch.Tensor, int]:
    """P = U Uᵀ over the eigenvectors of C0 that `null_space_mask` keeps (§1.7).

    Returns P (float32) and its rank, the number of directions an edit may still use.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment.double())
    kept = eigenvectors[:, null_space_mask(eigenvalues, threshold, rule)]
    return (kept @ kept.T).float(), kept.shape[1]


def alphaedit_delta(keys: torch.Tensor, resid: torch.Tensor, stats: LayerStatistics, config: EditConfig) -> LowRankDelta:
    if stats.projector is None:
        raise ValueError("AlphaEdit needs the null-space projector of this layer")
    dtype = getattr(torch, config.solve_dtype)
    P = stats.projector.to(dtype)
    K, R = keys.to(dtype), resid.to(dtype)
    eye = torch.eye(K.shape[0], dtype=dtype, device=K.device)
    lhs = P @ (K @ K.T + stats.preserved.to(dtype)) + config.l2_alpha * eye
    right = torch.linalg.solve(lhs, P @ K)
    return LowRankDelta(R.float(), right.float())


def memit_delta(keys: torch.Tensor, resid: torch.Tensor, stats: LayerStatistics, config: EditConfig) -> LowRankDelta:
    if stats.second_moment is None:
        raise ValueError("MEMIT needs the second moment C0 of this layer")
    K, R = keys.double(), resid.double()
    lhs = config.mom2_update_weight * stats.second_moment.double() + K @ K.T
    if config.method == "memit-seq":
        lhs = lhs + stats.preserved.double()
    # Δ = R Kᵀ A⁻¹ = R (A⁻¹ K)ᵀ since A is symmetric
    return LowRankDelta(R.float(), torch.linalg.solve(lhs, K).float())


UpdateRule = Callable[[torch.Tensor, torch.Tensor, LayerStatistics, EditConfig], LowRankDelta]

UPDATE_RULES: dict[str, UpdateRule] = {
    "alphaedit": alphaedit_delta,
    "memit": memit_delta,
    "memit-seq": memit_delta,
}


def uses_projector(method: str) -> bool:
    return method == "alphaedit"


def uses_preserved(method: str) -> bool:
    """Whether the method reads C_p, so the editor must accumulate it after each batch."""
    return method in ("alphaedit", "memit-seq")
