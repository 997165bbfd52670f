"""How far later batches move the keys of an earlier batch, read from a journal: how stale the
C_p that holds earlier edits becomes (issues 10 and 14).

C_p keeps each batch's keys as they were read when it was edited. A key is the input of W_out at
the subject's last token, so at layer l it depends on every edited layer below l: a later batch's
lower-layer updates move it wherever they are not zero on it (C_p holds them back only softly, and
not at the other tokens of the prompt, which attention mixes in). This script applies the
journal's updates to the unedited model one batch at a time and, after the given numbers of
batches, reads batch `probe`'s keys again (the same requests and context templates), reporting per
layer the mean of ‖k_now − k_stored‖ / ‖k_stored‖ over its requests. Right after the probe batch
itself the drift is zero at every layer (its keys were read with the layers below already
edited); the first edited layer never drifts (nothing below it changes).

Several probe batches (`--probe 0,1,2,3,4`) pool their requests. With --holds, each reading also
checks which of them still hold (the rehearsal check's test, rehearsal.edit_holds) and gives the
mean drift of the held and of the lapsed apart: do the edits that lapse drift more than the rest?

    python benchmarks/key_drift.py STATE_DIR [--probe 0[,1,...]] [--after 1,5,10,20] [--holds] [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

from alphaedit.journal import Journal
from alphaedit.keys import compute_keys
from alphaedit.layouts import detect_layout, mlp_out_weight, weight_delta_as_stored
from alphaedit.models import load_model
from alphaedit.rehearsal import edit_holds
from alphaedit.requests import parse_requests
from alphaedit.updates import update_from_tensors


def drift(state: str, probe: int | list[int] = 0, after: list[int] | None = None, model=None, tokenizer=None,
          holds: bool = False) -> dict:
    """`probe`: the index of the batch among the applied ones, or several (their requests pooled);
    `after`: numbers of applied batches (each past the last probe) after which to read their keys
    again; `model`/`tokenizer`: the unedited model (default: loaded as the journal's header names
    it; a given model is edited in place); `holds`: also split the drift by whether each edit holds."""
    journal = Journal.open(state)
    header = journal.header
    layers, applied = header["config"]["layers"], journal.applied_batch_ids()
    probes = [probe] if isinstance(probe, int) else sorted(set(probe))
    after = sorted(after or [len(applied)])
    if not probes or probes[0] < 0 or probes[-1] >= len(applied):
        raise SystemExit(f"{state}: --probe {probe}: the journal has {len(applied)} applied batches (0..{len(applied) - 1})")
    if after[0] <= probes[-1] or after[-1] > len(applied):
        raise SystemExit(f"{state}: --after must lie in {probes[-1] + 1}..{len(applied)} (the probe batch is applied by {probes[-1] + 1})")
    if model is None:
        model, tokenizer = load_model(header["model"])
    layout = detect_layout(model)
    requests, stored_parts = [], {l: [] for l in layers}
    for index in probes:
        files = journal.batch(applied[index])
        tensors = files.tensors()
        if not all(f"layer.{l}.keys" in tensors for l in layers):
            raise SystemExit(f"{state}: the batches keep no keys (method {header['config']['method']}): only methods with C_p can be measured")
        own = files.report["requests"]  # the batch's own requests; a rehearsing batch's re-writes follow them
        requests += parse_requests(files.requests)[:own]
        for l in layers:
            stored_parts[l].append(tensors[f"layer.{l}.keys"][:own].double())  # [own, d0]
    stored = {l: torch.cat(parts) for l, parts in stored_parts.items()}  # [u, d0]
    rows, done = [], 0
    with torch.no_grad():
        for upto in after:
            for batch_id in applied[done:upto]:
                batch = journal.batch(batch_id).tensors()
                for l in layers:
                    weight = mlp_out_weight(model, layout, l)
                    weight += weight_delta_as_stored(layout, update_from_tensors(batch, f"layer.{l}").dense()).to(weight.dtype)
            done = upto
            keys = compute_keys(model, layout, tokenizer, requests, header["templates"], layers).keys
            row = {"batches": upto,
                   "edits_after_probe": sum(journal.batch(b).report["requests"] for b in applied[probes[-1] + 1 : upto])}
            held = torch.tensor(edit_holds(model, tokenizer, requests, layout)) if holds else None
            if held is not None:
                row["held"], row["lapsed"] = int(held.sum()), int((~held).sum())
            for l in layers:
                moved = (keys[l].double() - stored[l]).norm(dim=1) / stored[l].norm(dim=1)  # [u]
                row[str(l)] = float(moved.mean())
                if held is not None:
                    row[f"{l}.held"] = float(moved[held].mean()) if held.any() else None
                    row[f"{l}.lapsed"] = float(moved[~held].mean()) if (~held).any() else None
            rows.append(row)
    return {"state": state, "layers": layers, "probe": probes, "probe_requests": len(requests), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("state", help="a journal folder (an edit's --state, or an eval run's state/)")
    parser.add_argument("--probe", default="0", help="the applied batch whose keys are followed (0 = the first), or several: 0,1,2")
    parser.add_argument("--holds", action="store_true", help="also the drift of the edits that still hold and of those that lapsed, apart")
    parser.add_argument("--after", default=None, help="numbers of applied batches after which to read them, e.g. 1,5,10,20 (default: all)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    after = [int(x) for x in args.after.split(",")] if args.after else None
    result = drift(args.state, [int(x) for x in args.probe.split(",")], after, holds=args.holds)
    if args.json:
        print(json.dumps(result))
        return
    layers = result["layers"]
    probes = ", ".join(map(str, result["probe"]))
    print(f"{result['state']}: the keys of applied batch {probes} ({result['probe_requests']} requests) read again, "
          "mean ‖k_now − k_stored‖ / ‖k_stored‖" + (" (all; held; lapsed)" if args.holds else ""))
    print(" | ".join(["batches applied", "edits after it", *(["held / lapsed"] if args.holds else []), *[f"layer {l}" for l in layers]]))
    for row in result["rows"]:
        if args.holds:
            cells = [f"{row[str(l)]:.3f}; {_cell(row[f'{l}.held'])}; {_cell(row[f'{l}.lapsed'])}" for l in layers]
            print(" | ".join([str(row["batches"]), str(row["edits_after_probe"]), f"{row['held']} / {row['lapsed']}", *cells]))
        else:
            print(" | ".join([str(row["batches"]), str(row["edits_after_probe"]), *[f"{row[str(l)]:.3f}" for l in layers]]))


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
