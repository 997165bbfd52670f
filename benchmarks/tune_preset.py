"""Choose a model's z optimisation settings (its preset) by measurement, on a slice no reported number uses.

For each candidate (v_lr, step cap, stopping rule) this edits two tuning slices in sequential
batches, restoring the base weights in between: CounterFact records 1000.. of
counterfact_test.json (mostly one-token targets) and the last records of the zsRE file
(multi-token answers). It prints each slice's Eff / Gen / Spe (the evaluation's own metrics:
CounterFact's NLL comparisons, zsRE's token accuracies), generative success, the mean z steps
per request and the seconds per edit. The winner becomes the model's preset in config.py.

    python benchmarks/tune_preset.py [--model gemma3-270m] --records 20 --batch-size 10 \\
        --candidates "1.0:10:loss,1.0:25:nll:0.05" [--json]

A candidate is V_LR:STEPS:RULE[:THRESHOLD][:FIELD=VALUE...] with RULE `loss` (the authors' total-loss stop) or
`nll` (stop once the target NLL is below THRESHOLD), FIELD any EditConfig field (a number,
true/false, or words separated by "|" for a list such as context_template_words); `--layers` sets the edited block; `--slices zsre` tunes on one kind only;
`mlp_out_norm=none` edits as if the blocks added the MLP output unnormalised (residual.py's
mapping off, for comparison on Gemma). A candidate starts from the model's preset: on SmolLM2 it
keeps the preset's three prefixes and two reworded copies unless it says
`context_template_words=The|Therefore|Because|I|You:reworded_prompts=0` (the authors' prompts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from alphaedit.config import EditConfig, config_for_model
from alphaedit.editor import Editor
from alphaedit.eval.datasets import load_dataset
from alphaedit.eval.evaluator import EvalSettings, Evaluator, summarise
from alphaedit.layouts import detect_layout
from alphaedit.models import load_model
from alphaedit.stats import CorpusSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METRICS = ("efficacy", "generalization", "specificity", "generative_success")


def tuning_slices(records: int, cf_start: int) -> dict[str, list]:
    counterfact = load_dataset(f"counterfact:{DATA / 'counterfact' / 'counterfact_test.json'}")[cf_start : cf_start + records]
    zsre = load_dataset(f"zsre:{DATA / 'zsre' / 'zsre_mend_eval_portability_gpt4.json'}")[-records:]  # reports use the first ones
    return {"counterfact": counterfact, "zsre": zsre}


def field_value(name: str, text: str):
    """An EditConfig field's value from text, typed by the field's default: true/false, an int, a
    float, or a list of words separated by "|" (context_template_words=The|A|In)."""
    fields = {f.name: f for f in dataclasses.fields(EditConfig)}
    if name not in fields:
        raise SystemExit(f"--candidates: {name!r} is not an EditConfig field")
    field = fields[name]
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if isinstance(default, bool):
        return {"true": True, "false": False}[text.lower()]
    if isinstance(default, int):
        return int(text)
    if isinstance(default, list):
        return text.split("|")
    return float(text)


def parse_candidate(text: str) -> dict:
    lr, steps, rule, *rest = text.split(":")
    settings = {"v_lr": float(lr), "v_num_grad_steps": int(steps), "early_stop_rule": rule}
    for item in rest:
        if item == "mlp_out_norm=none":
            settings["mlp_out_norm"] = "none"
        elif "=" in item:  # any other EditConfig field, e.g. clamp_norm_factor=1.5
            key, value = item.split("=", 1)
            settings[key] = field_value(key, value)
        else:
            settings["early_stop_nll" if rule == "nll" else "early_stop_loss"] = float(item)
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--records", type=int, default=20, help="records per slice")
    parser.add_argument("--cf-start", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--layers", default=None, help="FIRST-LAST (default: the model's preset or default layers)")
    parser.add_argument("--candidates", default="1.0:10:loss,1.0:25:nll:0.05")
    parser.add_argument("--json", action="store_true", help="print only JSON (one line per candidate)")
    parser.add_argument("--slices", default="counterfact,zsre", help="which tuning slices (comma-separated)")
    args = parser.parse_args()

    slices = tuning_slices(args.records, args.cf_start)
    unknown = sorted(set(args.slices.split(",")) - set(slices))
    if unknown:
        parser.error(f"--slices: unknown slice {unknown[0]!r} (choose from {', '.join(slices)})")
    slices = {name: records for name, records in slices.items() if name in args.slices.split(",")}
    corpus = CorpusSpec(str(DATA / "wikitext2_raw" / "wiki.valid.raw"), tokens=args.tokens)
    model, tokenizer = load_model(args.model)
    if args.layers:
        first, last = map(int, args.layers.split("-"))
        layers = list(range(first, last + 1))
    else:
        layers = config_for_model(model.config).layers
    base = {k: v.clone() for k, v in model.state_dict().items()}
    evaluators = {name: Evaluator(model, tokenizer, records, EvalSettings()) for name, records in slices.items()}
    rows = [{"setting": "pre-edit", **{f"{name}.{m}": summarise(ev.scores())[m] for name, ev in evaluators.items() for m in METRICS}}]
    for candidate in args.candidates.split(","):
        settings = parse_candidate(candidate)
        row = {"setting": candidate}
        for name, records in slices.items():
            model.load_state_dict(base)
            layout = detect_layout(model, {"mlp_out_norm": settings["mlp_out_norm"]}) if "mlp_out_norm" in settings else None
            fields = {k: v for k, v in settings.items() if k != "mlp_out_norm"}
            config = config_for_model(model.config, layers=layers, **fields)
            editor = Editor(model, tokenizer, config, layout=layout, corpus=corpus, show_progress=False)
            editor.statistics()
            editor.context_templates()
            start = time.perf_counter()
            reports = editor.edit([r.request for r in records], batch_size=args.batch_size)
            row[f"{name}.s_per_edit"] = (time.perf_counter() - start) / len(records)
            row[f"{name}.z_steps"] = sum(r.z_steps * r.requests for r in reports) / len(records)
            row.update({f"{name}.{m}": v for m, v in summarise(evaluators[name].scores()).items() if m in METRICS})
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    model.load_state_dict(base)
    if args.json:
        return
    names = list(slices)
    print(f"{'setting':<22}" + "".join(f" | {n[:5]:>5} Eff   Gen   Spe   gen  steps s/edit" for n in names))
    for r in rows:
        cells = []
        for n in names:
            scores = " ".join(f"{r[f'{n}.{m}']:5.1f}" for m in METRICS)
            extra = f"{r.get(f'{n}.z_steps', 0):5.1f} {r.get(f'{n}.s_per_edit', 0):6.2f}"
            cells.append(f" |       {scores} {extra}")
        print(f"{r['setting']:<22}" + "".join(cells))


if __name__ == "__main__":
    main()
