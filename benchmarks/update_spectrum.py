"""The spectrum of the accumulated update, read from a journal: where PRUNE's restraint binds, and
how far any method's edits have grown against the matrix they edit (issue 11's "show why with the
norm and spectrum plots").

For each edited layer, after every K-th batch: Σ = the sum of the applied batches' updates
(the raw ones; PRUNE's restraint acts on this sum), its largest singular value and its Frobenius
norm against the unedited W_out's, and how many of its singular values exceed σ_max(W_out):
exactly those PRUNE restrains. With --plot, Σ's singular values after the last batch, per layer,
against each layer's σ_max(W_out).

    python benchmarks/update_spectrum.py STATE_DIR [--every K] [--plot spectrum.png] [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from alphaedit.journal import Journal
from alphaedit.layouts import detect_layout, mlp_out_weight
from alphaedit.models import load_model
from alphaedit.plots import figure
from alphaedit.updates import update_from_tensors


def spectrum(state: str, every: int = 1, model=None) -> dict:
    """`model`: the unedited model (default: loaded as the journal's header names it)."""
    journal = Journal.open(state)
    layers = journal.header["config"]["layers"]
    model = model if model is not None else load_model(journal.header["model"])[0]
    layout = detect_layout(model)
    base = {l: mlp_out_weight(model, layout, l).detach().double() for l in layers}
    sigma_max = {l: float(torch.linalg.matrix_norm(base[l], ord=2)) for l in layers}
    norm = {l: float(base[l].norm()) for l in layers}
    applied = journal.applied_batch_ids()
    total: dict[int, torch.Tensor] = {}
    rows, edits, values = [], 0, {}
    for k, batch_id in enumerate(applied, start=1):
        files = journal.batch(batch_id)
        tensors = files.tensors()
        edits += files.report["requests"]
        for l in layers:
            delta = update_from_tensors(tensors, f"layer.{l}").dense().double()
            delta = delta if delta.shape == base[l].shape else delta.T  # either orientation: the same singular values
            total[l] = total[l] + delta if l in total else delta
        if k % every == 0 or k == len(applied):
            row = {"batch": batch_id, "edits": edits}
            for l in layers:
                s = torch.linalg.svdvals(total[l])
                values[l] = s.tolist()
                row[str(l)] = {"sigma_ratio": float(s[0]) / sigma_max[l], "frobenius_ratio": float(total[l].norm()) / norm[l],
                               "above_sigma_max": int((s > sigma_max[l]).sum())}
            rows.append(row)
    return {"state": state, "method": journal.header["config"]["method"], "layers": layers, "sigma_max": {str(l): sigma_max[l] for l in layers},
            "rows": rows, "final_singular_values": {str(l): values[l] for l in layers}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("state", help="a journal folder (an edit's --state, or an eval run's state/)")
    parser.add_argument("--every", type=int, default=1, help="report every K-th batch (and the last)")
    parser.add_argument("--plot", type=Path, help="write Σ's singular values after the last batch, per layer, to this PNG")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = spectrum(args.state, args.every)
    if args.plot:
        with figure(args.plot, f"{result['method']}: singular values of the summed update", "index", "singular value") as ax:
            for l in result["layers"]:
                line = ax.semilogy(result["final_singular_values"][str(l)][:200], label=f"layer {l}")[0]
                ax.axhline(result["sigma_max"][str(l)], color=line.get_color(), linestyle=":", linewidth=1)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "final_singular_values"}))
        return
    layers = result["layers"]
    print(f"{result['state']} ({result['method']}): Σ = the summed updates; σ(Σ)/σmax(W), ‖Σ‖/‖W‖, singular values of Σ above σmax(W)")
    print(" | ".join(["batch", "edits", *[f"layer {l}" for l in layers]]))
    for row in result["rows"]:
        cells = [f"{row[str(l)]['sigma_ratio']:.3f}, {row[str(l)]['frobenius_ratio']:.3f}, {row[str(l)]['above_sigma_max']}" for l in layers]
        print(" | ".join([str(row["batch"]), str(row["edits"]), *cells]))


if __name__ == "__main__":
    main()
