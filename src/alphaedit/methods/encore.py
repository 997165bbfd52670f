"""ENCORE's norm-constrained update (Gupta et al. 2025, "Lifelong Sequential Knowledge Editing
without Model Degradation", arXiv 2502.01636): MEMIT-seq with a Frobenius penalty on the update,
so that a long sequence cannot grow the edited matrices without bound.

    min_Δ ‖Δ K − R‖² + λ ‖Δ K0‖² + Σ_prev ‖Δ K_p‖² + λ_n ‖Δ‖²_F
    Δ = R Kᵀ (λ C0 + λ_n I + β C_p + K Kᵀ)⁻¹                                   [d, d0]

in float64, λ = config.mom2_update_weight, λ_n = `norm_lambda` (20 in their Llama-3-8B setting).
The penalty anchors each batch's update to the weights before it, not to the original ones.
Followed: baselines/encore/encore_main.py L198-225 and hparams/ENCORE/Llama3-8B.json of
SasyaTitech/NAS (the public copy of ENCORE's code).

ENCORE pairs this with "most-probable early stopping" (MPES): the z optimisation of a request stops
once its new object is the argmax at the target positions. Ours is `--stop-most-probable`
(EditConfig.stop_when_most_probable): every target token on every prompt, checked each step. Theirs
reads the five context prompts only (not the bare one) and stops on the second step at which
exactly five positions are right, which for multi-token targets is not "all tokens right"; we keep
the rule that says what it means. Under `--project`, AlphaEdit's projected solve replaces this
one, whose own α·I plays the same part.
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
class EncoreOptions:
    norm_lambda: float = 20.0  # λ_n, the weight of ‖Δ‖²_F


def norm_constrained_solve(keys: torch.Tensor, resid: torch.Tensor, stats: LayerStatistics, config: EditConfig,
                           options: EncoreOptions) -> LowRankDelta:
    if stats.second_moment is None:
        raise ValueError("ENCORE's update needs the second moment C0 of this layer")
    K, R = keys.double(), resid.double()  # [d0, u], [d, u]
    d0 = K.shape[0]
    lhs = (config.mom2_update_weight * stats.second_moment.double() + options.norm_lambda * torch.eye(d0, dtype=torch.float64, device=K.device)
           + config.earlier_weight * stats.preserved.double() + K @ K.T)  # [d0, d0], β C_p with β = 1 in the reference
    return LowRankDelta(R.float(), torch.linalg.solve(lhs, K).float())  # Δ = R (A⁻¹ K)ᵀ, A symmetric


METHODS = (
    Method("encore", "ENCORE: MEMIT-seq with a Frobenius-norm penalty on each update (Gupta et al. 2025); pair with --stop-most-probable",
           "baselines/encore/encore_main.py L198-225 (SasyaTitech/NAS)", norm_constrained_solve, options=EncoreOptions,
           reads_preserved=True),
)
