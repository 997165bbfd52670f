"""A screen for issue 14: the stream's batches written by turns into disjoint blocks of layers.

Rehearsal over the 10,000-edit stream gives out where each written column knocks out more stored
edits (κ grows by about 0.07 per 1,000 edits stored, BENCHMARKS.md, "What sets where rehearsal
gives out"): the edits share one block's null-space room. A wider block (layers 3-10) adds
directions but spreads every edit over all of them, so the lower layers' writes move the upper
layers' keys of every edit, and κ grew faster. Here each batch goes whole to one block of G
disjoint blocks, by turns (batch i to block i mod G), so each block stores 1/G of the edits in its
own room, and an edit's lower-layer writes move only its own keys above. One Editor per block on
the same model: each keeps its own statistics, C_p and rehearsal (before each of its own batches
it checks its own earlier edits and writes the lapsed ones again), and since the blocks are
disjoint their updates add up in any order (a resume replays each block's journal in turn).

Every `--every` edits: Eff / Gen / Spe over up to `--sample` of the records edited so far (evenly
spaced, as `alphaedit eval --curve-of edited --curve-sample` picks them), the share of all edits
still holding, and per block f / κ (rehearsal.outlook) and the spectral growth of its last layer.
Not in the paper and not in the library: a screen, its points comparable with the curve points of
`benchmarks/runs_table.sh`'s runs (the same stream, protocol prefixes and statistics). Measured on
SmolLM2 (BENCHMARKS.md, "What sets where rehearsal gives out"): the two rooms are not independent;
the lower block's f + κ with 1,000 edits of its own is the one block's with 1,000, and the
neighbours lose 2–3 times as fast as under one block, though either block's edits alone keep them.

    python benchmarks/layer_groups.py OUT --blocks 3-7,8-12 --n 2000 [--l2 80,40] [--rehearse-cap 0] [--json]

OUT keeps each block's journal (OUT/block-FIRST-LAST) and points.jsonl; run the same command
again to resume from the last batch every block committed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from alphaedit.config import config_for_model
from alphaedit.editor import Editor
from alphaedit.eval.datasets import load_dataset, select
from alphaedit.eval.evaluator import summarise
from alphaedit.eval.protocol import Schedule
from alphaedit.eval.scoring import counterfact_scores
from alphaedit.journal import Journal
from alphaedit.models import load_model
from alphaedit.rehearsal import edit_holds, outlook
from alphaedit.stats import CorpusSpec, StatsCache

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
STREAM = [DATA / "counterfact_easyedit" / "counterfact-edit.json", DATA / "counterfact_easyedit" / "counterfact-train.json"]
PREFIXES = ["The", "Therefore", "Because", "I", "You"]  # runs_table.sh's protocol


def block(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def point(editors: list[Editor], records, edited: int, sample: int) -> dict:
    model, tokenizer = editors[0].model, editors[0].tokenizer
    picked = Schedule(batches=0, curve_of="edited", curve_sample=sample).curve_records(edited, len(records))  # only its choice of records is used
    scores = summarise(counterfact_scores(model, tokenizer, [records[i] for i in picked]))
    requests = [r.request for r in records[:edited]]
    holding = edit_holds(model, tokenizer, requests, editors[0].layout)
    blocks = {}
    for editor in editors:
        seen = outlook(editor.batches, at_least=100)
        last = editor.history[-1] if editor.history else None
        growth = last.weight_growth.get(str(editor.config.layers[-1])) if last and last.weight_growth else None
        blocks[f"{editor.config.layers[0]}-{editor.config.layers[-1]}"] = {
            "f": seen.f if seen else None, "kappa": seen.kappa if seen else None,
            "rehearsed_last": last.rehearsed if last else None, "last_layer_growth": growth}
    return {"edits": edited, **{k: scores[k] for k in ("efficacy", "generalization", "specificity")},
            "holding": 100 * sum(holding) / len(holding), "blocks": blocks}


def open_blocks(model, tokenizer, configs, corpus: CorpusSpec, out: Path, cache: StatsCache | None = None,
                layout=None) -> tuple[list[Editor], list[Path]]:
    """One Editor per block's config on the same model, each block's statistics read on the unedited
    model first, then each block's journal under `out` (if any) replayed: the blocks are disjoint,
    so their updates add up in any order."""
    editors = [Editor(model, tokenizer, config, corpus=corpus, cache=cache, layout=layout, model_spec="smollm2-135m",
                      show_progress=False) for config in configs]
    for editor in editors:
        editor.statistics()
        editor.context_templates()
    folders = [out / f"block-{e.config.layers[0]}-{e.config.layers[-1]}" for e in editors]
    for editor, folder in zip(editors, folders):
        if Journal.exists(folder):
            journal = Journal.open(folder)
            editor.templates = journal.header["templates"]
            editor.apply_journal(journal)
    return editors, folders


def edit_by_turns(editors: list[Editor], folders: list[Path], batches: list[list], on_batch=None) -> int:
    """Batch i (requests) to block i mod G, each committed to its block's journal; from the first
    batch no block has. Returns the batch it started at. `on_batch(i, report)` after each."""
    done = [len(e.batches) for e in editors]
    start = sum(done)
    if done != [start // len(editors) + (k < start % len(editors)) for k in range(len(editors))]:
        raise ValueError(f"the blocks' journals hold {done} batches, not a turn-by-turn prefix: start a new folder")
    for i in range(start, len(batches)):
        editor = editors[i % len(editors)]
        report = editor.edit(batches[i])[-1]
        editor.save_state(folders[i % len(editors)])
        if on_batch is not None:
            on_batch(i, report)
    return start


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--blocks", default="3-7,8-12", help="disjoint blocks FIRST-LAST, comma-separated (one block: the plain run)")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--l2", default="80", help="α, one for every block or one per block, comma-separated: the upper\n"
                        "layers' keys reach P less (SmolLM2: ‖Pk‖² 13–23 at layers 8–12 against 30–32 at 3–7), so the same α writes less there")
    parser.add_argument("--rehearse-cap", type=int, default=0, help="0: as many as the batch has (the runs' default)")
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--sample", type=int, default=500)
    parser.add_argument("--json", action="store_true", help="print only the points, as JSON")
    args = parser.parse_args()
    blocks = [block(b) for b in args.blocks.split(",")]
    alphas = [float(a) for a in args.l2.split(",")]
    if len(alphas) not in (1, len(blocks)):
        parser.error(f"--l2 gives {len(alphas)} values for {len(blocks)} blocks: give one, or one per block")
    alphas *= len(blocks) // len(alphas)
    taken = [layer for b in blocks for layer in b]
    if len(set(taken)) != len(taken):
        parser.error(f"--blocks must not share a layer: {args.blocks}")
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))

    model, tokenizer = load_model("smollm2-135m")
    spec = "counterfact:" + ",".join(str(p) for p in STREAM)
    records = select(load_dataset(spec, skipped=[]), args.n, None)
    corpus = CorpusSpec(corpus=str(DATA / "wikitext2_raw" / "wiki.valid.raw"), tokens=100000)
    configs = [config_for_model(model.config, layers=layers, l2_alpha=alpha, rehearse=1, rehearse_cap=args.rehearse_cap,
                                context_template_words=PREFIXES, reworded_prompts=0) for layers, alpha in zip(blocks, alphas)]
    editors, folders = open_blocks(model, tokenizer, configs, corpus, args.out)
    batches = [[r.request for r in records[i : i + args.batch_size]] for i in range(0, len(records), args.batch_size)]
    start = sum(len(e.batches) for e in editors)
    points_file = args.out / "points.jsonl"
    say(f"{len(records)} records, {len(batches)} batches into blocks {args.blocks}; resuming after batch {start}" if start else
        f"{len(records)} records, {len(batches)} batches into blocks {args.blocks}")
    began = time.perf_counter()

    def on_batch(i: int, report) -> None:
        edited = (i + 1) * args.batch_size
        pace = (time.perf_counter() - began) / (i + 1 - start)
        say(f"{min(edited, len(records))}/{len(records)} edits · block {args.blocks.split(',')[i % len(blocks)]} · own efficacy "
            f"{100 * report.efficacy:.0f} · earlier held {'-' if report.earlier_held is None else f'{100 * report.earlier_held:.1f}'}"
            f" · rehearsed {report.rehearsed} · {report.seconds:.0f} s · ETA {time.strftime('%H:%M:%S', time.gmtime(pace * (len(batches) - i - 1)))}")
        if edited % args.every == 0 or i == len(batches) - 1:
            p = point(editors, records, min(edited, len(records)), args.sample)
            with open(points_file, "a", encoding="utf-8") as out:
                out.write(json.dumps(p) + "\n")
                out.flush()
                os.fsync(out.fileno())
            say(json.dumps(p) if args.json else
                f"  at {p['edits']}: Eff {p['efficacy']:.1f} Gen {p['generalization']:.1f} Spe {p['specificity']:.1f}, "
                f"{p['holding']:.1f}% of all edits holding; " + "; ".join(
                    f"block {name}: f {_round(b['f'])} κ {_round(b['kappa'])}, re-writes {b['rehearsed_last']}, "
                    f"last layer ‖W‖ growth {b['last_layer_growth']}" for name, b in p["blocks"].items()))

    try:
        edit_by_turns(editors, folders, batches, on_batch)
    except ValueError as e:
        sys.exit(f"{args.out}: {e}")
    if args.json:
        print(json.dumps([json.loads(line) for line in points_file.read_text().splitlines()], indent=1))


if __name__ == "__main__":
    main()
