"""Screen (issue 14, not in the paper): does C_p hold the earlier edits where it needs to?

C_p holds every earlier edit's key with the same weight, so a batch's solve spends as much of the
null space keeping an edit that is many nats past the line as one about to lapse. This screen
re-weighs C_p by each earlier edit's margin on the model before the batch (NLL of the true object
minus NLL of the new one, teacher_forcing.new_margin): the keys of an edit whose margin is over
`--over` nats weigh `--weight` (a comfortable edit lets the batch use more of the room), those
of an edit holding by less than `--under` nats (near the line) weigh `--boost`, all others 1 (a
lapsed edit's too: the batch writes it again, and a heavier hold on its lapsed answer would
hold the re-write back). The rest is benchmarks/batch_ab.py: batches 0..N-1 of STATE replayed,
batch N edited both ways with the same rehearsal and the same z values, so that only the solve
differs.

    python benchmarks/margin_hold_ab.py STATE N --over 3 --weight 0.25 [--under 1 --boost 4] [--json]

Every copy of a fact's keys in C_p (its first write and any re-writes) takes the fact's weight.
"""

from __future__ import annotations

import json

import torch

from alphaedit.editor import Editor
from alphaedit.rehearsal import standing_requests
from batch_ab import fact, margins, measure, print_table, screen_parser


def reweigh_by_margin(editor: Editor, over: float, weight: float, under: float = float("-inf"), boost: float = 1.0) -> dict:
    """C_p = the held texts' moments + Σ over the applied batches' key rows of w kkᵀ, w = `weight`
    for a fact whose margin is over `over` nats now, `boost` for one holding by less than `under`,
    else 1 (each row's (w − 1) kkᵀ added to the C_p the replay built); returns the margins' summary."""
    if editor.config.replace_holds or editor.config.earlier_reread:
        # their C_p is not the sum of every applied batch's key rows, which the (w − 1) kkᵀ assume
        raise ValueError("margin_hold_ab re-weighs the C_p of a journal made without --replace-holds and --earlier-reread")
    standing = [r for r in standing_requests(editor.batches) if r.target_true]
    margin = dict(zip(map(fact, standing), margins(editor.model, editor.tokenizer, standing).tolist()))

    def extra_of(request) -> float:
        m = margin.get(fact(request), 0.0)
        return weight - 1.0 if m > over else boost - 1.0 if 0 < m < under else 0.0

    trace_before = {layer: c.trace() for layer, c in editor.preserved.items()}
    for applied in editor.batches:
        if applied.reverted:
            continue
        extra = torch.tensor([extra_of(r) for r in applied.written])
        for layer, keys in applied.keys.items():
            keys = keys.to(editor.preserved[layer].device).float()
            editor.preserved[layer].add_(keys.T @ (keys * extra.to(keys.device)[:, None]))
    values = torch.tensor(list(margin.values()))
    return {"earlier": len(values), "over": int((values > over).sum()), "under": int(((values > 0) & (values < under)).sum()),
            "median margin": values.median().item(),
            "C_p trace ratio": {l: (editor.preserved[l].trace() / trace_before[l]).item() for l in editor.config.layers}}


def main() -> None:
    parser = screen_parser(__doc__)
    parser.add_argument("--over", type=float, default=3.0, help="nats: an earlier edit past this margin is comfortable")
    parser.add_argument("--weight", type=float, default=0.25, help="the weight of a comfortable edit's keys in C_p")
    parser.add_argument("--under", type=float, default=float("-inf"), help="nats: an earlier edit under this margin is at risk")
    parser.add_argument("--boost", type=float, default=1.0, help="the weight of an at-risk edit's keys in C_p")
    args = parser.parse_args()
    seen: dict = {}

    def prepare(editor: Editor) -> None:
        seen.update(reweigh_by_margin(editor, args.over, args.weight, args.under, args.boost))

    label = f"C_p weight {args.weight:g} over {args.over:g} nats" + (f", {args.boost:g} under {args.under:g}" if args.boost != 1 else "")
    result = measure(args.state, args.n, {}, prepare_b=prepare, label=label)
    result["margins"] = seen
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.state}, batch {args.n}: {seen['earlier']} earlier edits standing, {seen['over']} over {args.over:g} nats "
          f"and {seen['under']} under {args.under:g} (median margin {seen['median margin']:.2f}); C_p trace B / A: "
          + ", ".join(f"{l}: {r:.2f}" for l, r in seen["C_p trace ratio"].items()))
    print_table(result)


if __name__ == "__main__":
    main()
