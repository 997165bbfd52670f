"""Choose SmolLM2-135M's edited layers and z learning rate by measurement.

For each candidate (layer block, v_lr) this edits a tuning slice of CounterFact that the
reported results never use (records 1000.. of counterfact_test.json), in sequential batches,
and prints efficacy / generalization / specificity (CounterFact's teacher-forced metrics)
and the seconds per edit. The winner becomes the `smollm2-135m` preset in config.py.

    python benchmarks/tune_smollm2.py --records 20 --batch-size 10 --json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from alphaedit.config import config_for_model
from alphaedit.editor import Editor
from alphaedit.models import load_model
from alphaedit.requests import parse_requests
from alphaedit.scoring import prefers_new
from alphaedit.stats import CorpusSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def counterfact_scores(model, tokenizer, records: list[dict]) -> dict[str, float]:
    """Efficacy, generalization and specificity as in ALGORITHM.md §3.3 (mean over records)."""
    eff, gen, spe = [], [], []
    for rec in records:
        rw = rec["requested_rewrite"]
        new, true = rw["target_new"]["str"], rw["target_true"]["str"]
        prompts = [rw["prompt"].replace("{}", rw["subject"])] + rec["paraphrase_prompts"] + rec["neighborhood_prompts"]
        wins = prefers_new(model, tokenizer, prompts, [new] * len(prompts), [true] * len(prompts)).float()
        n_para = len(rec["paraphrase_prompts"])
        eff.append(wins[0].item())
        gen.append(wins[1 : 1 + n_para].mean().item())
        spe.append((1 - wins[1 + n_para :]).mean().item())
    mean = lambda xs: 100 * sum(xs) / len(xs)  # noqa: E731
    return {"efficacy": mean(eff), "generalization": mean(gen), "specificity": mean(spe)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--start", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--candidates", default="2-6:0.5,3-7:0.5,4-8:0.5,3-7:0.1",
                        help="comma-separated FIRST-LAST:V_LR[:STEPS[:mp]] settings (mp: most-probable early stop)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    records = json.loads((DATA / "counterfact" / "counterfact_test.json").read_text())[args.start : args.start + args.records]
    requests = parse_requests(records)
    corpus = CorpusSpec(str(DATA / "wikitext2_raw"), tokens=args.tokens)
    model, tokenizer = load_model("smollm2-135m")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [{"setting": "pre-edit", **counterfact_scores(model, tokenizer, records), "s_per_edit": 0.0}]
    for candidate in args.candidates.split(","):
        span, lr, *rest = candidate.split(":")
        first, last = map(int, span.split("-"))
        model.load_state_dict(base)
        config = config_for_model(model.config, layers=list(range(first, last + 1)), v_lr=float(lr),
                                  v_num_grad_steps=int(rest[0]) if rest else None,
                                  stop_when_most_probable="mp" in rest[1:])
        editor = Editor(model, tokenizer, config, corpus=corpus, show_progress=False)
        editor.statistics()
        editor.context_templates()
        start = time.perf_counter()
        reports = editor.edit(requests, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        scores = counterfact_scores(model, tokenizer, records)
        mean_steps = sum(r.z_steps * r.requests for r in reports) / len(requests)
        label = f"layers {span}, v_lr {lr}, {config.v_num_grad_steps} steps" + (", most-probable stop" if config.stop_when_most_probable else "")
        rows.append({"setting": label, **scores, "s_per_edit": seconds / len(requests), "z_steps": mean_steps})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    print(f"\n{'setting':<52} {'Eff':>6} {'Gen':>6} {'Spe':>6} {'s/edit':>7}")
    for r in rows:
        print(f"{r['setting']:<52} {r['efficacy']:6.1f} {r['generalization']:6.1f} {r['specificity']:6.1f} {r['s_per_edit']:7.1f}")


if __name__ == "__main__":
    main()
