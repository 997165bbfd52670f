"""PRUNE (Ma et al. 2024, "Perturbation-Restrained Sequential Model Editing"): MEMIT's updates, with
the singular values of their sum kept from outgrowing the edited matrix's own.

With Σ = Σ_batches Δ [d, d0] = U diag(s) Vᵀ and σ_max the largest singular value of the unedited W:

    s_j > σ_max  →  log_b(s_j) − log_b(σ_max) + σ_max        (b = `log_base`, e by default)

and the model carries W + U diag(s̃) Vᵀ. The paper restrains the accumulated update wherever the
edited model is used; we do so after every batch, from the raw updates the journal keeps, so the
next batch is solved on the restrained model and a revert or replay gives the same weights.

Followed: easyeditor/editors/bi_editor_loadw.py L48-68, L170 (mjy1111/PRUNE). The AlphaEdit
authors' harness (experiments/evaluate.py L274-327) differs twice: it restrains once, after the
last batch, and then adds the restrained sum to the already edited weight (W + Σ + Σ̃ instead of
W + Σ̃), which we take for a bug. Under `--project` every batch is AlphaEdit's update; the
restraint keeps the singular vectors, so the sum stays in the null space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Method
from .memit import ridge_solve


@dataclass(frozen=True)
class PruneOptions:
    log_base: float = math.e  # the paper also uses 2, 1.5 and 1.2


def restrain_spectrum(total: torch.Tensor, base: torch.Tensor, options: PruneOptions) -> torch.Tensor:
    sigma_max = torch.linalg.matrix_norm(base.double(), ord=2)  # the unedited W's largest singular value
    U, s, Vh = torch.linalg.svd(total.double(), full_matrices=False)  # [d, r], [r], [r, d0]
    log = math.log(options.log_base)
    restrained = torch.where(s > sigma_max, (s.log() - sigma_max.log()) / log + sigma_max, s)
    return ((U * restrained) @ Vh).to(total.dtype)


METHODS = (
    Method("prune", "PRUNE: MEMIT, with the singular values of the summed updates bounded by the weight's own (Ma et al. 2024)",
           "easyeditor/editors/bi_editor_loadw.py L48-68, L170 (mjy1111/PRUNE)", ridge_solve,
           options=PruneOptions, restrain=restrain_spectrum),
)
