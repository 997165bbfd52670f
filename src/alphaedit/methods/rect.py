"""RECT (Gu et al. 2024, "Model Editing Harms General Abilities of Large Language Models:
Regularization to the Rescue"): MEMIT's update, of which only the entries that change their weight
the most, relatively, are applied.

Per layer and batch, with W the layer's weight before the batch:

    rel = |Δ / (W + 1e-8)|                      elementwise, [d, d0]
    keep rel ≥ its k-th smallest value, k = ⌊numel·(100 − keep_percent)/100⌋, the rest set to 0
    (so the largest `keep_percent` % and one more: the threshold entry itself is kept, as theirs)

Followed: memit/memit_rect_main.py L46-61 of jianghoucheng/AlphaEdit (40 %, hard-coded there; the
RECT authors' own snippet keeps 20 %). As there, the batch is solved layer after layer with the
whole updates in place, and the masks are applied once every layer is solved. Under `--project`
the mask applies to the projected update (the paper's "+AlphaEdit" code is not published); a
masked update no longer lies exactly in the null space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..updates import LowRankDelta, MaskedDelta
from .base import Method
from .memit import ridge_solve


@dataclass(frozen=True)
class RectOptions:
    keep_percent: float = 40.0  # share of W_out's entries whose update is applied


def keep_largest_relative_change(delta: LowRankDelta, weight: torch.Tensor, options: RectOptions) -> MaskedDelta:
    dense = delta.dense()  # [d, d0]
    relative = (dense / (weight.to(dense) + 1e-8)).abs().flatten()
    k = int(relative.numel() * (100 - options.keep_percent) / 100)  # the k-th smallest is the threshold: k − 1 zeroed
    if k < 1:
        return MaskedDelta(delta, torch.ones_like(dense, dtype=torch.bool))
    threshold = relative.kthvalue(k).values
    return MaskedDelta(delta, (relative >= threshold).reshape(dense.shape))


METHODS = (
    Method("rect", "RECT: MEMIT, applying only the largest relative changes of each weight (Gu et al. 2024)",
           "memit/memit_rect_main.py L46-61 (jianghoucheng/AlphaEdit)", ridge_solve,
           options=RectOptions, finish=keep_largest_relative_change),
)
