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

    python benchmarks/key_drift.py STATE_DIR [--probe 0] [--after 1,5,10,20] [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

from alphaedit.journal import Journal
from alphaedit.keys import compute_keys
from alphaedit.layouts import detect_layout, mlp_out_weight, weight_delta_as_stored
from alphaedit.models import load_model
from alphaedit.requests import parse_requests
from alphaedit.updates import update_from_tensors


def drift(state: str, probe: int = 0, after: list[int] | None = None, model=None, tokenizer=None) -> dict:
    """`probe`: the index of the batch among the applied ones; `after`: numbers of applied batches
    (each ≥ probe + 1) after which to read its keys again; `model`/`tokenizer`: the unedited
    model (default: loaded as the journal's header names it; a given model is edited in place)."""
    journal = Journal.open(state)
    header = journal.header
    layers, applied = header["config"]["layers"], journal.applied_batch_ids()
    after = sorted(after or [len(applied)])
    if not 0 <= probe < len(applied):
        raise SystemExit(f"{state}: --probe {probe}: the journal has {len(applied)} applied batches (0..{len(applied) - 1})")
    if after[0] <= probe or after[-1] > len(applied):
        raise SystemExit(f"{state}: --after must lie in {probe + 1}..{len(applied)} (the probe batch is applied by {probe + 1})")
    if model is None:
        model, tokenizer = load_model(header["model"])
    layout = detect_layout(model)
    files = journal.batch(applied[probe])
    tensors = files.tensors()
    if not all(f"layer.{l}.keys" in tensors for l in layers):
        raise SystemExit(f"{state}: the batches keep no keys (method {header['config']['method']}): only methods with C_p can be measured")
    stored = {l: tensors[f"layer.{l}.keys"].double() for l in layers}  # [u, d0]
    requests = parse_requests(files.requests)
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
            row = {"batches": upto, "edits_after_probe": sum(journal.batch(b).report["requests"] for b in applied[probe + 1 : upto])}
            for l in layers:
                now = keys[l].double()
                row[str(l)] = float(((now - stored[l]).norm(dim=1) / stored[l].norm(dim=1)).mean())
            rows.append(row)
    return {"state": state, "layers": layers, "probe": probe, "probe_requests": len(requests), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("state", help="a journal folder (an edit's --state, or an eval run's state/)")
    parser.add_argument("--probe", type=int, default=0, help="the applied batch whose keys are followed (0 = the first)")
    parser.add_argument("--after", default=None, help="numbers of applied batches after which to read them, e.g. 1,5,10,20 (default: all)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    after = [int(x) for x in args.after.split(",")] if args.after else None
    result = drift(args.state, args.probe, after)
    if args.json:
        print(json.dumps(result))
        return
    layers = result["layers"]
    print(f"{result['state']}: the keys of applied batch {result['probe']} ({result['probe_requests']} requests) read again, "
          "mean ‖k_now − k_stored‖ / ‖k_stored‖")
    print(" | ".join(["batches applied", "edits after it", *[f"layer {l}" for l in layers]]))
    for row in result["rows"]:
        print(" | ".join([str(row["batches"]), str(row["edits_after_probe"]), *[f"{row[str(l)]:.3f}" for l in layers]]))


if __name__ == "__main__":
    main()
