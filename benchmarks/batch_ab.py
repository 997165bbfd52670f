"""One batch solved two ways on the same state, the same requests and the same z values: with the
journal's edit config (A) and with some of its fields changed (B, `--set`), e.g. the re-writes'
earlier holds taken out of C_p (`--set replace_holds=true`) or the re-writes weighed more in the
solve (`--set rewrite_weight=3`).

Replays the first N batches of STATE (a journal made with --rehearse), then edits batch N's own
requests again both ways on fresh copies of the unedited model: the rehearsal check finds the same
lapsed edits both times and the z optimisation gives the same values (it reads neither C_p nor the
solve's settings, so it runs once and is reused), so the two updates differ only in their solves.
`--base` changes a field for both ways. Reported per way: how many re-writes hold right after the
batch, their margin (NLL of the true object minus NLL of the new one, in nats; > 0 holds), the
batch's own efficacy and margin, and the share of the other earlier edits still holding; then the
paired difference of the margins (B minus A).

    python benchmarks/batch_ab.py STATE N --set FIELD=VALUE [--set ...] [--base FIELD=VALUE ...] [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

from alphaedit import editor as editor_module
from alphaedit.config import EditConfig
from alphaedit.editor import Editor
from alphaedit.journal import Journal
from alphaedit.layouts import Layout
from alphaedit.models import load_model
from alphaedit.rehearsal import edit_holds, standing_requests
from alphaedit.requests import parse_requests
from alphaedit.stats import CorpusSpec, StatsCache
from alphaedit.teacher_forcing import new_margin


def margins(model, tokenizer, requests) -> torch.Tensor:
    """Per request with a true object: NLL(true) − NLL(new) after its prompt, in nats (> 0: the edit holds)."""
    known = [r for r in requests if r.target_true]
    if not known:
        return torch.zeros(0)
    return new_margin(model, tokenizer, [r.text() for r in known], [r.target_new for r in known], [r.target_true for r in known])


def fact(request) -> tuple[str, str]:
    """What names an edit across batches and re-writes: its subject and prompt."""
    return request.subject, request.prompt


def screen_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every screen built on measure() takes: STATE, N and --json."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("state", help="a journal made with --rehearse (an eval run's state/)")
    parser.add_argument("n", type=int, help="replay batches 0..N-1, then edit batch N's own requests both ways")
    parser.add_argument("--json", action="store_true", help="print only JSON")
    return parser


def setting(text: str) -> tuple[str, object]:
    """FIELD=VALUE, the value read as JSON where it parses (true, 3, 0.5, [3, 4]) and as text otherwise."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE (an EditConfig field), got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def measure(state: str, n: int, changes: dict, base: dict | None = None, load=None, cache: StatsCache | None = None,
            prepare_b=None, label: str | None = None, score=None) -> dict:
    """Batch N of `state` with the journal's config (+ `base`) and with `changes` on top.
    `load()`: a fresh unedited model and its tokenizer (default: the journal's model, loaded);
    `cache`: the statistics cache (default: $ALPHAEDIT_HOME's); `prepare_b(editor)`: a change to
    way B's editor after the replay, before the batch (a screen of something no config field
    says, e.g. benchmarks/margin_hold_ab.py's re-weighted C_p), named `label`; `score(editor, own,
    earlier)`: more measures of each way after its batch, a dict of numbers merged into its results."""
    journal = Journal.open(state)
    header = journal.header
    load = load or (lambda: load_model(header["model"]))
    batch = journal.batch(journal.batch_ids()[n])
    own = parse_requests(batch.requests, source=str(batch.path / "requests.json"))[: batch.report["requests"]]
    cut = next(i for i, e in enumerate(journal.entries) if e["kind"] == "batch" and e["id"] == journal.batch_ids()[n])
    settings = dict(header["config"])
    if "rehearse_replace" in settings:  # c2addfb's name of replace_holds
        settings["replace_holds"] = settings.pop("rehearse_replace")
    settings.update(base or {})
    real, kept = editor_module.compute_targets, []

    def once(*a, **k):  # the same z for both ways: it depends on the weights and requests only
        if not kept:
            kept.append(real(*a, **k))
        return kept[0]

    ways = {}
    editor_module.compute_targets = once
    try:
        for way, config in (("A", settings), ("B", {**settings, **changes})):
            model, tokenizer = load()
            editor = Editor(model, tokenizer, EditConfig.from_dict(config),
                            layout=Layout.from_dict(header["layout"]), corpus=CorpusSpec(**header["corpus"]),
                            cache=cache or StatsCache(), show_progress=False)
            editor.templates = header["templates"]
            replay = Journal.open(state)
            replay.index["entries"] = replay.entries[:cut]  # everything before batch N, reverts included
            editor.apply_journal(replay)
            earlier = standing_requests(editor.batches)
            if way == "B" and prepare_b is not None:
                prepare_b(editor)
            editor.edit(own)
            rehearsed = editor.batches[-1].rehearsed
            others = [r for r in earlier if r not in rehearsed]
            ways[way] = {
                "rehearsed": len(rehearsed), "rehearsed holding": sum(edit_holds(model, tokenizer, rehearsed, editor.layout)),
                "rehearsed margin": margins(model, tokenizer, rehearsed), "own efficacy": editor.history[-1].efficacy,
                "own margin": margins(model, tokenizer, own),
                "other earlier holding": sum(edit_holds(model, tokenizer, others, editor.layout)) / max(1, len(others)),
                "rehearsed_requests": rehearsed, **(score(editor, own, earlier) if score is not None else {})}
    finally:
        editor_module.compute_targets = real
    a, b = ways["A"], ways["B"]
    paired = {k: b[k] - a[k] for k in ("rehearsed margin", "own margin")}
    label = label or ", ".join(f"{k}={json.dumps(v)}" for k, v in changes.items())
    return {"state": state, "batch": n, "own": len(own), "base": base or {}, "changes": changes,
            "same rehearsal": a["rehearsed_requests"] == b["rehearsed_requests"],
            "ways": {name: {k: (v.mean().item() if isinstance(v, torch.Tensor) else v) for k, v in w.items() if k != "rehearsed_requests"}
                     for name, w in (("the journal's config", a), (label, b))},
            "paired": {k: {"mean": d.mean().item() if len(d) else None, "se": (d.std() / len(d) ** 0.5).item() if len(d) > 1 else None,
                           "larger": int((d > 0).sum()), "of": len(d)} for k, d in paired.items()}}


def main() -> None:
    parser = screen_parser(__doc__)
    parser.add_argument("--set", dest="changes", type=setting, action="append", required=True, metavar="FIELD=VALUE",
                        help="an EditConfig field of way B (repeatable)")
    parser.add_argument("--base", type=setting, action="append", default=[], metavar="FIELD=VALUE",
                        help="an EditConfig field of both ways (repeatable)")
    args = parser.parse_args()
    result = measure(args.state, args.n, dict(args.changes), dict(args.base))
    if args.json:
        print(json.dumps(result, indent=1))
        return
    ways = list(result["ways"].values())
    print(f"{args.state}, batch {args.n}: {ways[0]['rehearsed']} re-writes, {result['own']} own requests"
          + (f"; both ways {result['base']}" if result["base"] else ""))
    print_table(result)


def print_table(result: dict) -> None:
    """measure()'s two ways as a Markdown table, then the paired differences of the margins."""
    print("| way | re-writes holding | their margin (nats) | own efficacy | own margin | other earlier edits holding |")
    print("|---|---|---|---|---|---|")
    for name, w in result["ways"].items():
        print(f"| {name} | {w['rehearsed holding']} of {w['rehearsed']} | {w['rehearsed margin']:.2f} | {100 * w['own efficacy']:.1f} | "
              f"{w['own margin']:.2f} | {100 * w['other earlier holding']:.1f} |")
    for k, d in result["paired"].items():
        if d["mean"] is not None:
            print(f"{k}, B minus A: {d['mean']:+.3f} ± {d['se'] or 0:.3f} nats, larger for {d['larger']} of {d['of']}")


if __name__ == "__main__":
    main()
