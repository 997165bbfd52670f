"""N edits of the 10,000-edit stream written in one batch on the unedited model (issue 14).

Every sequential run of BENCHMARKS.md loses its earlier edits long before 10,000 on SmolLM2. Two
things could cap it: the room (1,072 null-space directions at the last edited layer cannot keep
N edits apart, however they are written) or the sequence (each batch is solved against a model
that earlier batches moved, with keys and values read where the edits were written, not where the
model reads them now). One batch of all N, solved at once on the unedited model as MEMIT's mass
edits are, has the same room and no sequence: if it keeps the N edits where the sequence does
not, the sequence is the cap.

Two phases, each its own command:

`z`: each record's target value, optimised on the unedited model, --chunk records at a time; a
chunk's file is written whole or not at all, so a killed run resumes where it stopped. A
request's z depends on its own rows only (its loss, its Adam state, its early stop), so the
chunks give the values one batch of N would.

`solve`: the first N values written in one batch by the editor's own loop (keys read and the
residual spread layer by layer, C0's projection, α = --l2), the z optimisation replaced by phase 1's
values; then Eff / Gen / Spe / generative success over --sample of the N records spread evenly
(the sample a 10,000-edit run's curve point takes), beside the unedited model's on the same records.

    python benchmarks/one_shot.py RUN z --n 10000
    python benchmarks/one_shot.py RUN solve --n 4000 --l2 10 40 [--json]

The protocol is `benchmarks/runs_table.sh`'s (SmolLM2, the authors' five context-template
prefixes, no reworded copies, C0 from 100,000 WikiText-2 tokens); `--data` is the shared data folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from alphaedit.config import config_for_model
from alphaedit.editor import Editor, _TargetValues
from alphaedit.eval.datasets import load_dataset, select
from alphaedit.eval.evaluator import SUCCESS_METRICS, EvalSettings, Evaluator, summarise
from alphaedit.eval.protocol import Schedule
from alphaedit.files import atomic_save_tensors, atomic_write_text
from alphaedit.layouts import detect_layout
from alphaedit.models import load_model
from alphaedit.stats import CorpusSpec
from alphaedit.targets import TargetResult

MODEL = "smollm2-135m"
WORDS = ["The", "Therefore", "Because", "I", "You"]  # runs_table.sh's --context-templates
FIELDS = ("loss", "steps", "target_prob", "target_nll", "value_shift")  # TargetResult's per-request lists


def stream(data: Path, n: int):
    """The first n records of the EasyEdit CounterFact stream, as the 10,000-edit runs take them."""
    spec = f"counterfact:{data}/counterfact_easyedit/counterfact-edit.json,{data}/counterfact_easyedit/counterfact-train.json"
    return select(load_dataset(spec, []), n, None)


def new_editor(data: Path, l2: float | None, method: str = "alphaedit"):
    model, tokenizer = load_model(MODEL)
    config = config_for_model(model.config, method, l2_alpha=l2, context_template_words=WORDS, reworded_prompts=0)
    corpus = CorpusSpec(corpus=str(data / "wikitext2_raw" / "wiki.valid.raw"), tokens=100_000)
    return Editor(model, tokenizer, config, layout=detect_layout(model), corpus=corpus, show_progress=False)


def chunk_file(run: Path, start: int, stop: int) -> Path:
    return run / "z" / f"{start:06d}-{stop:06d}.safetensors"


def fact(request) -> list[str]:
    """What names a stored value's request: its subject, prompt and new object."""
    return [request.subject, request.prompt, request.target_new]


def save_values(run: Path, editor: Editor, requests, chunk: int, quiet: bool = False) -> None:
    """Phase 1: the z of `requests` on the editor's (unedited) model, --chunk at a time, each
    chunk's file written whole; the chunks already on disk are kept."""
    templates = editor.context_templates()
    kept = run / "templates.json"
    if kept.exists() and json.loads(kept.read_text()) != templates:
        raise SystemExit(f"{kept}: these values were optimised under other context templates; use another RUN folder")
    atomic_write_text(kept, json.dumps(templates))
    n = len(requests)
    todo = [(s, min(s + chunk, n)) for s in range(0, n, chunk) if not chunk_file(run, s, min(s + chunk, n)).exists()]
    began, done, total = time.perf_counter(), 0, sum(b - a for a, b in todo)
    for start, stop in todo:
        t = editor._target_values(editor._sourced_forms(requests[start:stop]), templates, None).targets
        tensors = {"z": t.z.float().cpu().contiguous(), "h0": t.h0.float().cpu().contiguous(),
                   **{f: torch.tensor(getattr(t, f), dtype=torch.float64) for f in FIELDS}}
        atomic_save_tensors(tensors, chunk_file(run, start, stop), {"facts": json.dumps([fact(r) for r in requests[start:stop]])})
        done += stop - start
        pace = (time.perf_counter() - began) / done
        if not quiet:
            print(f"values of records {start}-{stop - 1} · {pace:.2f} s per record · ETA {time.strftime('%H:%M:%S', time.gmtime(pace * (total - done)))}",
                  file=sys.stderr, flush=True)


def stored_values(run: Path, requests) -> TargetResult:
    """Phase 1's values of `requests` (a stream's first N), checked request by request."""
    n, parts, start = len(requests), [], 0
    while start < n:
        found = sorted((run / "z").glob(f"{start:06d}-*.safetensors"))
        if not found:
            raise SystemExit(f"{run}: no values from record {start} on; run `one_shot.py {run} z --n {n}` first")
        with safe_open(str(found[0]), "pt") as f:
            facts = json.loads(f.metadata()["facts"])
            parts.append(({k: f.get_tensor(k) for k in f.keys()}, facts))
        start += len(facts)
    tensors = {k: torch.cat([p[k] for p, _ in parts])[:n] for k in parts[0][0]}
    if [f for _, facts in parts for f in facts][:n] != [fact(r) for r in requests]:
        raise SystemExit(f"{run}: the stored values are of other requests than these {n}")
    lists = {f: tensors[f].tolist() for f in FIELDS}
    lists["steps"] = [int(s) for s in lists["steps"]]
    return TargetResult(tensors["z"], **lists, h0=tensors["h0"])


def write_at_once(editor: Editor, requests, targets: TargetResult):
    """All `requests` in one batch by the editor's own loop, their z `targets` (phase 1's) in place
    of a new optimisation; the batch's report."""

    def given(sourced, templates, on_unit, written=None, starts=None):
        if [fact(form) for _, form in sourced] != [fact(r) for r in requests]:
            raise RuntimeError("the batch's forms are not the stored values' requests in order")
        return _TargetValues(targets, targets.z.cpu(), None, 0)

    editor._target_values = given
    try:
        return editor.edit(list(requests))[0]
    finally:
        del editor._target_values  # the class's own again


def scores(editor: Editor, records, chosen: list[int]) -> dict:
    evaluator = Evaluator(editor.model, editor.tokenizer, records, EvalSettings(), on_phase=lambda m: print(m, file=sys.stderr, flush=True))
    point = summarise(evaluator.scores(indices=chosen))
    return {m: point[m] for m in SUCCESS_METRICS}


def solve(run: Path, data: Path, n: int, alphas: list[float], method: str, size: int) -> dict:
    """Phase 2: the unedited model's scores on the sample, then one batch of all n per α."""
    records = stream(data, n)
    requests = [r.request for r in records]
    targets = stored_values(run, requests)
    templates = json.loads((run / "templates.json").read_text())
    chosen = Schedule(1, curve_of="edited", curve_sample=size).curve_records(n, n)  # what a run's curve point after n edits scores
    pre_file = run / f"pre-{n}-{size}.json"
    if pre_file.exists():
        pre = json.loads(pre_file.read_text())
    else:
        pre = scores(new_editor(data, 10.0), records, chosen)
        atomic_write_text(pre_file, json.dumps(pre))
    results = {"n": n, "sample": len(chosen), "method": method, "unedited": pre, "settings": []}
    for l2 in alphas if method == "alphaedit" else [None]:  # α is AlphaEdit's; another method solves with its preset
        label = f"α {l2:g}" if l2 is not None else method
        editor = new_editor(data, l2, method)
        editor.templates = templates
        editor.statistics()  # C0 and P before the timed batch, as a run's first batch finds them
        print(f"{label}: writing {n} edits in one batch …", file=sys.stderr, flush=True)
        began = time.perf_counter()
        report = write_at_once(editor, requests, targets)
        seconds = time.perf_counter() - began
        point = scores(editor, records, chosen)
        results["settings"].append({"setting": label, "l2": l2, "efficacy_all": report.efficacy, "seconds": seconds, **point,
                                    "frobenius_growth": {l: g["frobenius"] for l, g in report.weight_growth.items()},
                                    "null_space_rank": report.null_space_rank})
        atomic_write_text(run / f"solve-{n}-{label.replace(' ', '-')}.json", json.dumps(results["settings"][-1], indent=1))
        print(f"{label}: solved in {seconds:.0f} s", file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a folder for the values and results (made if missing)")
    parser.add_argument("phase", choices=("z", "solve"))
    parser.add_argument("--n", type=int, required=True, help="the stream's first N records")
    parser.add_argument("--chunk", type=int, default=100, help="records per z optimisation (phase z)")
    parser.add_argument("--l2", type=float, nargs="+", default=[10.0], help="AlphaEdit's α, one solve each (phase solve)")
    parser.add_argument("--method", default="alphaedit", help="the update rule of the solve (phase solve)")
    parser.add_argument("--sample", type=int, default=500, help="records scored, spread evenly over the N (phase solve)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--json", action="store_true", help="print only JSON")
    args = parser.parse_args()
    (args.run / "z").mkdir(parents=True, exist_ok=True)
    if args.phase == "z":
        records = stream(args.data, args.n)
        save_values(args.run, new_editor(args.data, 10.0), [r.request for r in records], args.chunk)  # z reads neither α nor C0
        return
    result = solve(args.run, args.data, args.n, args.l2, args.method, args.sample)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['method']}, {result['n']} edits in one batch; scores over {result['sample']} of them")
    print("| setting | Eff | Gen | Spe | gen. success | own efficacy (all N) | ‖W‖F growth, last layer | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    pre = result["unedited"]
    print(f"| unedited | {pre['efficacy']:.1f} | {pre['generalization']:.1f} | {pre['specificity']:.1f} | {pre['generative_success']:.1f} | | | |")
    for s in result["settings"]:
        last = list(s["frobenius_growth"].values())[-1]
        print(f"| {s['setting']} | {s['efficacy']:.1f} | {s['generalization']:.1f} | {s['specificity']:.1f} | {s['generative_success']:.1f} | "
              f"{100 * s['efficacy_all']:.1f} | {last:.3f} | {s['seconds']:.0f} |")


if __name__ == "__main__":
    main()
