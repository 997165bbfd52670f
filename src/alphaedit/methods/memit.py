"""MEMIT (Meng et al., ICLR 2023) and MEMIT-seq: a ridge regression of the residuals on the keys,
regularised by the preserved keys' second moment C0 (ALGORITHM.md §1.9).

MEMIT:      Δ = R Kᵀ (λ C0 + K Kᵀ)⁻¹               V = solve(λ C0 + K Kᵀ, K)         [d0, u]
MEMIT-seq:  Δ = R Kᵀ (λ C0 + β C_p + K Kᵀ)⁻¹       (the earlier batches' keys too)

in float64, λ = config.mom2_update_weight (15000 for Llama-3-8B), β = config.earlier_weight (1 in
the authors' code). Followed: memit/memit_main.py
L196-201 and memit/memit_seq_main.py L198-203 of jianghoucheng/AlphaEdit. AlphaEdit is MEMIT-seq
under the projection (alphaedit.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..updates import LayerStatistics, LowRankDelta
from .base import Method

if TYPE_CHECKING:
    from ..config import EditConfig


def ridge_solve(keys: torch.Tensor, resid: torch.Tensor, stats: LayerStatistics, config: EditConfig, options: Any = None,
                with_preserved: bool = False) -> LowRankDelta:
    if stats.second_moment is None:
        raise ValueError("MEMIT's update needs the second moment C0 of this layer")
    K, R = keys.double(), resid.double()  # [d0, u], [d, u]
    lhs = config.mom2_update_weight * stats.second_moment.double() + K @ K.T  # [d0, d0]
    if with_preserved:
        lhs = lhs + config.earlier_weight * stats.preserved.double()  # β C_p
    # Δ = R Kᵀ A⁻¹ = R (A⁻¹ K)ᵀ since A is symmetric
    return LowRankDelta(R.float(), torch.linalg.solve(lhs, K).float())


def sequential_ridge_solve(keys, resid, stats, config, options=None) -> LowRankDelta:
    return ridge_solve(keys, resid, stats, config, options, with_preserved=True)


METHODS = (
    Method("memit", "MEMIT: ridge regression on the keys, regularised by λ C0 (Meng et al. 2023)",
           "memit/memit_main.py L196-201 (jianghoucheng/AlphaEdit)", ridge_solve),
    Method("memit-seq", "MEMIT with the earlier batches' keys C_p in the regulariser",
           "memit/memit_seq_main.py L198-203 (jianghoucheng/AlphaEdit)", sequential_ridge_solve, reads_preserved=True),
)
