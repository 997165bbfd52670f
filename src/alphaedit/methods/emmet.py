"""EMMET (Gupta et al. 2024, "A Unified Framework for Model Editing"): the batch's keys must map
exactly onto their targets (equality constraints), with the smallest change as measured by C:

    C = λ C0 + μ I,   D = Kᵀ C⁻¹ K + λ_e I (when u > 1),   Δ = R D⁻¹ Kᵀ C⁻¹

in float64; λ = config.mom2_update_weight, μ = `update_norm_lambda`, λ_e = `emmet_lambda` (the
authors' settings: 0 and 0.1). Factored: Δ = (R D⁻¹) (C⁻¹ K)ᵀ. Followed: emmet/emmet_main.py
L219-256 (scalable-model-editing/unified-model-editing), with MEMIT's residual spread over layers.
Under `--project`, C⁻¹ → P: the projected closed form (projection.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..updates import LayerStatistics, LowRankDelta
from .base import Method

if TYPE_CHECKING:
    from ..config import EditConfig


@dataclass(frozen=True)
class EmmetOptions:
    emmet_lambda: float = 0.1  # λ_e: softens the equality constraints of a batch
    update_norm_lambda: float = 0.0  # μ: adds ‖Δ‖² to the change being minimised


def equality_constrained_solve(keys: torch.Tensor, resid: torch.Tensor, stats: LayerStatistics, config: EditConfig,
                               options: EmmetOptions) -> LowRankDelta:
    if stats.second_moment is None:
        raise ValueError("EMMET's update needs the second moment C0 of this layer")
    K, R = keys.double(), resid.double()  # [d0, u], [d, u]
    C = config.mom2_update_weight * stats.second_moment.double()  # [d0, d0]
    if options.update_norm_lambda:
        C = C + options.update_norm_lambda * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    c_inv_k = torch.linalg.solve(C, K)  # C⁻¹ K [d0, u]
    D = K.T @ c_inv_k  # [u, u]
    if K.shape[1] > 1:
        D = D + options.emmet_lambda * torch.eye(D.shape[0], dtype=D.dtype, device=D.device)
    left = torch.linalg.solve(D, R.T).T  # R D⁻¹ [d, u] (D symmetric)
    return LowRankDelta(left.float(), c_inv_k.float())


METHODS = (
    Method("emmet", "EMMET: the batch's keys mapped exactly onto their targets, least change under C0 (Gupta et al. 2024)",
           "emmet/emmet_main.py L219-256 (scalable-model-editing/unified-model-editing)", equality_constrained_solve,
           options=EmmetOptions),
)
