"""Norm-anchored target values (NAS: Liu et al. 2026, "Norm Anchors Make Model Edits Last",
arXiv 2602.02543), a stabiliser for long sequences, off by default (EditConfig.value_anchor).

Their finding: in a long sequence the solved value vectors and the edited weights amplify each
other, each batch's v* = m + δ a little longer than the last (m: the z layer's MLP output at the
subject's last token, on the current model), until the norms grow exponentially and the model
collapses. NAS rescales every v* to one reference norm μ measured on the unedited model:

    v* = m + δ;   v* ← m                 if ‖v*‖ > 2μ   (the request is dropped: its edit would be an outlier)
                  v* ← μ · v* / ‖v*‖     otherwise
    z  = h0 − m + v*                     (h0 = the residual at the z layer, z = h0 + δ unanchored)

μ is the mean of ‖m + δ‖ over requests optimised on the unedited model, the largest 5% left out.
Theirs measures it once on 1,000 CounterFact requests with MEMIT's settings; ours on the first
batch the editor writes (which runs on the unedited model), kept in that batch's report and read
back with the journal: no extra optimisation, and a sample of the user's own requests (a first
batch of a few requests gives a rougher μ). Followed: NAS/compute_z.py L202-235 and
util/vstar_stats.py L26-42, L358-374 of SasyaTitech/NAS.
"""

from __future__ import annotations

import math

import torch


def reference_norm(norms: torch.Tensor) -> float:
    """The mean of `norms` without the largest ⌊5%⌋ of them."""
    ordered = norms.double().sort().values
    kept = ordered[: len(ordered) - math.floor(0.05 * len(ordered))]
    return float(kept.mean())


def anchored_values(z: torch.Tensor, h0: torch.Tensor, m: torch.Tensor, reference: float) -> tuple[torch.Tensor, torch.Tensor]:
    """z [u, d] with each v* = m + δ rescaled to `reference`; and which requests were dropped [u] bool."""
    v = m + (z - h0)  # v* = m + δ                                         [u, d]
    norm = v.norm(dim=-1, keepdim=True)
    dropped = norm > 2 * reference
    v = torch.where(dropped, m, v * (reference / (norm + 1e-10)))
    return h0 - m + v, dropped[:, 0]
