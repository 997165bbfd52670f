"""What every editing method shares: the layer statistics it reads, the shapes its updates take,
and AlphaEdit's null-space projector. The closed forms themselves are in `methods/`.

Shapes (math orientation): keys K ∈ R^{d0×u}, residuals R ∈ R^{d×u}, update Δ ∈ R^{d×d0},
so that (W + Δ) k ≈ W k + r for the batch's keys. A closed form's Δ has rank ≤ u and is kept as
factors Δ = R Vᵀ with V ∈ R^{d0×u} (LowRankDelta): a batch's update is stored and reverted as two
thin matrices instead of a d×d0 one. RECT keeps only some entries of it (MaskedDelta: the factors
and a bit mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.left": self.left, f"{prefix}.right": self.right}


@dataclass
class MaskedDelta:
    """Δ = mask ⊙ (left @ rightᵀ): a low-rank update of which only the masked entries are applied (RECT)."""

    low_rank: LowRankDelta
    mask: torch.Tensor  # bool [d, d0]

    def dense(self) -> torch.Tensor:
        return self.low_rank.dense() * self.mask.to(self.low_rank.left.device)

    def to(self, device: torch.device | str) -> MaskedDelta:
        return MaskedDelta(self.low_rank.to(device), self.mask.to(device))

    def norm(self) -> float:
        return float(self.dense().double().norm())

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        # the mask as bits, eight entries a byte: 1/32 of the dense update's size in float32
        packed = torch.from_numpy(np.packbits(self.mask.cpu().numpy().reshape(-1)))
        return {**self.low_rank.tensors(prefix), f"{prefix}.mask": packed}


Update = LowRankDelta | MaskedDelta


def update_from_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> Update:
    """The update stored under `prefix` by `tensors()`: masked when a mask is there."""
    low_rank = LowRankDelta(tensors[f"{prefix}.left"], tensors[f"{prefix}.right"])
    if f"{prefix}.mask" not in tensors:
        return low_rank
    shape = (low_rank.left.shape[0], low_rank.right.shape[0])
    bits = np.unpackbits(tensors[f"{prefix}.mask"].numpy(), count=shape[0] * shape[1])
    return MaskedDelta(low_rank, torch.from_numpy(bits.astype(bool)).reshape(shape))


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
