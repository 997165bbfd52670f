"""How much later batches disturb earlier edits, read from a journal: the question behind an
evolving projector (issue 14).

For each applied batch b and edited layer l: the change the edit wrote on its own keys,
‖Δ_b K_bᵀ‖_F, and the change all later batches together wrote on the same keys,
‖(Σ_{b' > b} Δ_b') K_bᵀ‖_F. AlphaEdit keeps earlier batches' keys in its solve through C_p, a
soft penalty, so the second is small but not zero. An evolving projector would remove the
earlier keys' directions from the null space outright, one direction per edited key: the table
also gives the rank of all edited keys beside the null space's rank, the room such a projector
would use up.

And per layer, how much the edits share one direction: of all edited keys scaled to unit length,
the share of their energy along the strongest direction (σ₁² / Σσ²; 1/d for keys spread evenly
over d dimensions, 1 for keys all alike) and the mean cosine between two of them; and of the
summed update ΣΔ, the share of its energy in its top singular direction (edits that all push
one way grow W's spectral norm far faster than its Frobenius norm).

    python benchmarks/key_interference.py STATE_DIR [--every K] [--batches N] [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

from alphaedit.journal import Journal
from alphaedit.updates import update_from_tensors


def interference(state: str, every: int = 1, first: int | None = None) -> dict:
    """The journal's applied batches (only the `first` N if given), as the module says."""
    journal = Journal.open(state)
    layers = journal.header["config"]["layers"]
    applied = journal.applied_batch_ids()[:first]
    batches = []  # per batch: {layer: (Δ dense [d, d0], keys [u, d0])}
    for batch_id in applied:
        tensors = journal.batch(batch_id).tensors()
        if not all(f"layer.{l}.keys" in tensors for l in layers):
            raise SystemExit(f"{state}: batch {batch_id} keeps no keys (method {journal.header['config']['method']}): "
                             "only methods that keep earlier keys (alphaedit, memit-seq, ...) can be measured")
        batches.append({l: (update_from_tensors(tensors, f"layer.{l}").dense().double(), tensors[f"layer.{l}.keys"].double())
                        for l in layers})
    later = {l: torch.zeros_like(batches[-1][l][0]) for l in layers}  # Σ of the updates after batch b
    rows = []
    for index in range(len(batches) - 1, -1, -1):
        if index % every == 0 or index == len(batches) - 1:
            row = {"batch": applied[index], "edits_after": sum(len(b[layers[0]][1]) for b in batches[index + 1 :])}
            for l in layers:
                delta, keys = batches[index][l]
                own = float((delta @ keys.T).norm())
                row[str(l)] = {"own": own, "later": float((later[l] @ keys.T).norm())}
            rows.append(row)
        for l in layers:
            later[l] += batches[index][l][0]
    written = {l: torch.cat([b[l][1] for b in batches]) for l in layers}  # every key written [n, d0]
    keys_rank = {str(l): int(torch.linalg.matrix_rank(written[l])) for l in layers}
    shared = {str(l): shared_direction(written[l], later[l]) for l in layers}  # later[l] is now ΣΔ of every batch
    return {"state": state, "layers": layers, "batches": len(batches), "edits": sum(len(b[layers[0]][1]) for b in batches),
            "null_space_rank": journal.header.get("projector_rank"), "keys_rank": keys_rank, "shared": shared, "rows": rows[::-1]}


def shared_direction(keys: torch.Tensor, summed: torch.Tensor) -> dict:
    """keys [n, d0] every key written, summed [d, d0] ΣΔ: the module's three shares."""
    unit = keys / keys.norm(dim=1, keepdim=True).clamp_min(1e-30)
    energy = torch.linalg.svdvals(unit) ** 2  # Σ = ‖unit‖²_F = n
    cosines = unit @ unit.T
    n = len(unit)
    mean_cosine = float((cosines.sum() - cosines.diagonal().sum()) / (n * (n - 1))) if n > 1 else None
    update = torch.linalg.svdvals(summed) ** 2
    return {"key_top_share": float(energy[0] / energy.sum()), "key_mean_cosine": mean_cosine,
            "update_top_share": float(update[0] / update.sum()) if update.sum() > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("state", help="a journal folder (an edit's --state, or an eval run's state/)")
    parser.add_argument("--every", type=int, default=1, help="report every K-th batch (and the last)")
    parser.add_argument("--batches", type=int, help="only the first N applied batches (a point of a longer run)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = interference(args.state, args.every, args.batches)
    if args.json:
        print(json.dumps(result))
        return
    layers = result["layers"]
    print(f"{result['state']}: {result['edits']} edits in {result['batches']} batches")
    print("later / own: the change later batches wrote on a batch's keys, against the change its own edit wrote")
    print(" | ".join(["batch", "edits after", *[f"layer {l}" for l in layers]]))
    for row in result["rows"]:
        cells = [f"{row[str(l)]['later'] / row[str(l)]['own']:.3f}" if row[str(l)]["own"] else "–" for l in layers]
        print(" | ".join([str(row["batch"]), str(row["edits_after"]), *cells]))
    null = result["null_space_rank"] or {}
    print("rank of all edited keys / null-space rank: "
          + ", ".join(f"layer {l}: {result['keys_rank'][str(l)]} / {null.get(str(l), '?')}" for l in layers))
    print("one shared direction: the unit keys' energy along the strongest / their mean cosine / ΣΔ's top singular share")
    print(" | ".join(["layer", *[str(l) for l in layers]]))
    for name in ("key_top_share", "key_mean_cosine", "update_top_share"):
        print(" | ".join([name, *[_share(result["shared"][str(l)][name]) for l in layers]]))


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
