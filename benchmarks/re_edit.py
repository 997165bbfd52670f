"""Editing the same facts again: what C_p's hold on the first edit costs the second (`--replace-holds`).

SmolLM2-135M with its preset: batch 1 edits the first `--n` CounterFact test records and as many
more that are left alone afterwards; batch 2 edits the first `--n` again, each to the new object
of another record of the same relation (a change of an edit already made; a record whose relation
has no other object is left out). Two ways on the same
model, restored in between: the authors' C_p, which keeps holding the first edits' keys where they
say the first new object, and `replace_holds`, which takes those columns out before batch 2.

Reported per way: the re-edits' efficacy (the second object preferred over the first) and their
mean margin (NLL of the first object minus NLL of the second, in nats: how far past the line
they are), the share preferring it over the true object, the left-alone edits still holding, and
batch 2's seconds.

    python benchmarks/re_edit.py [--n 100] [--l2 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from datetime import date

from alphaedit.config import config_for_model
from alphaedit.editor import Editor
from alphaedit.eval.datasets import load_dataset
from alphaedit.models import load_model
from alphaedit.rehearsal import edit_holds
from alphaedit.stats import CorpusSpec, StatsCache
from alphaedit.teacher_forcing import new_margin


def re_edits(records, n: int):
    """Of the first n records, those whose relation has another new object among the records: their
    requests, and a second request for each, the same subject and prompt with the new object of the
    nearest later record of the same relation (one that differs from both of its own objects), its
    true object the first edit's new one. A fact with no such object is left out of both."""
    first, second = [], []
    for i, record in enumerate(records[:n]):
        own = record.request
        other = next((r.request.target_new for r in records[i + 1 :] + records[:i]
                      if r.relation_id == record.relation_id and r.request.target_new not in (own.target_new, own.target_true)), None)
        if other is not None:
            first.append(own)
            second.append(replace(own, target_new=other, target_true=own.target_new))
    return first, second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="../shared/data/counterfact/counterfact_test.json")
    parser.add_argument("--n", type=int, default=100, help="facts edited twice (and as many edited once)")
    parser.add_argument("--l2", type=float, default=None, help="α (default: the preset's, the paper's 10)")
    parser.add_argument("--corpus", default="../shared/data/wikitext2_raw/wiki.valid.raw")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--json", action="store_true", help="print only JSON")
    args = parser.parse_args()

    records = load_dataset(f"counterfact:{args.dataset}")
    first, second = re_edits(records, args.n)
    alone = [r.request for r in records[args.n : 2 * args.n]]
    model, tokenizer = load_model("smollm2-135m")
    corpus, cache = CorpusSpec(args.corpus, tokens=args.tokens), StatsCache()
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows = []
    for label, replace_holds in (("the authors' C_p (holds the first edits)", False), ("--replace-holds", True)):
        for name, p in model.named_parameters():
            p.data.copy_(base[name])
        config = config_for_model(model.config, "alphaedit", l2_alpha=args.l2, replace_holds=replace_holds or None)
        editor = Editor(model, tokenizer, config, corpus=corpus, cache=cache, show_progress=False)
        editor.edit([*first, *alone])
        start = time.perf_counter()
        report = editor.edit(second)[0]
        seconds = time.perf_counter() - start
        margin = new_margin(model, tokenizer, [r.text() for r in second], [r.target_new for r in second],
                            [r.target_true for r in second]).mean().item()
        over_true = edit_holds(model, tokenizer, [replace(r, target_true=f.target_true) for r, f in zip(second, first)], editor.layout)
        rows.append({"way": label, "re-edits holding": report.efficacy, "re-edits margin": margin, "over the true object": sum(over_true) / len(over_true),
                     "left alone holding": sum(edit_holds(model, tokenizer, alone, editor.layout)) / len(alone),
                     "first batch efficacy": editor.history[0].efficacy, "seconds": seconds})
    result = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(), "n": args.n, "edited twice": len(first),
              "l2": config.l2_alpha, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"SmolLM2-135M, {len(first)} facts edited twice and {len(alone)} once, α {config.l2_alpha:g}")
    print("| way | first batch's efficacy | re-edits holding (over the first new object) | their margin (nats) | over the true object | left alone holding | batch 2 s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {100 * r['first batch efficacy']:.1f} | {100 * r['re-edits holding']:.1f} | {r['re-edits margin']:.2f} | "
              f"{100 * r['over the true object']:.1f} | {100 * r['left alone holding']:.1f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
