"""What a warm start (`--rehearse-warm`) saves the re-writes of rehearsal, on a long run's state.

Loads STATE (a journal made with --rehearse, e.g. a 10,000-edit run's after 6,000 edits), runs
the rehearsal check on the model as it is, and optimises the z of the lapsed edits (at most
--most, oldest first, as a batch would take them) two or three ways on the same model, timed:

- cold: from δ = 0, as a run without the warm start does;
- journal: warm from the value each was last written with, where the journal kept one (states
  made with --rehearse-warm); the others start cold;
- best case: warm from the cold result itself, a value that works on this model, so that every
  request stops after the jump. A real warm start sits between this and cold: its old values
  were right for an earlier model (on the 1,000-edit A/B of BENCHMARKS.md, 1.5 steps a re-write
  against 4.3 from δ = 0).

Only the re-writes are optimised here, not a batch's own requests beside them.

    python benchmarks/rehearsal_z.py STATE [--most 400] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

from alphaedit.editor import Editor
from alphaedit.journal import Journal
from alphaedit.models import load_model
from alphaedit.rehearsal import choose_lapsed, edit_holds, standing_requests
from alphaedit.stats import StatsCache
from alphaedit.targets import compute_targets


def measure(state: str, most: int = 400, model=None, tokenizer=None, cache: StatsCache | None = None) -> dict:
    """`model`/`tokenizer`: the unedited model (default: loaded as the journal's header names it;
    a given one is edited in place); `cache`: the statistics cache (default: $ALPHAEDIT_HOME's)."""
    if model is None:
        model, tokenizer = load_model(Journal.open(state).header["model"])
    editor = Editor.load_state(state, model, tokenizer, cache=cache or StatsCache(), show_progress=False)
    start = time.perf_counter()
    standing = standing_requests(editor.batches)
    holds = edit_holds(editor.model, editor.tokenizer, standing, editor.layout)
    lapsed = choose_lapsed(standing, holds, [], most=most)
    check = time.perf_counter() - start
    templates = editor.context_templates()
    journal_starts = editor._warm_starts(list(enumerate(lapsed)), 0, len(lapsed)) if editor.config.rehearse_warm else None

    def optimise(starts):
        began = time.perf_counter()
        result = compute_targets(editor.model, editor.layout, editor.tokenizer, lapsed, templates, editor.config, starts=starts)
        return result, time.perf_counter() - began

    cold, cold_s = optimise(None)
    rows = [("cold (from δ = 0)", cold, cold_s)]
    if journal_starts is not None:
        rows.append((f"warm from the journal ({sum(s is not None for s in journal_starts)} kept)", *optimise(journal_starts)))
    rows.append(("warm from a value that works (best case)", *optimise(list(cold.z))))
    return {
        "state": state, "edits standing": len(standing), "held": sum(holds) / len(holds), "lapsed": len(lapsed),
        "check_seconds": check,
        "runs": [{"start": name, "mean_steps": sum(r.steps) / len(r.steps), "seconds": s,
                  "mean_target_prob": sum(r.target_prob) / len(r.target_prob)} for name, r, s in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("state")
    parser.add_argument("--most", type=int, default=400, help="at most this many lapsed edits, oldest first")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    result = measure(args.state, args.most)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['state']}: {result['edits standing']} edits standing, {100 * result['held']:.1f}% held; "
          f"{result['lapsed']} lapsed optimised (check {result['check_seconds']:.0f} s)")
    print(f"{'start':<48} {'z steps':>8} {'seconds':>8} {'p(target)':>10}")
    for run in result["runs"]:
        print(f"{run['start']:<48} {run['mean_steps']:>8.2f} {run['seconds']:>8.1f} {run['mean_target_prob']:>10.3f}")


if __name__ == "__main__":
    main()
