"""Seconds per edit: the batched z optimisation against one request at a time, same code.

CPU: SmolLM2-135M, one batch of 20 CounterFact edits, each path timed on a fresh copy of the
model in the same run (statistics and context templates prepared before the clock starts).
The one-at-a-time path is the same Editor with `z_requests_per_pass=1`: every request gets
its own forward/backward passes, as in the authors' code.

    python benchmarks/edit_speed.py [--device cpu|cuda] [--edits 20] [--steps 25] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from alphaedit.config import config_for_model
from alphaedit.editor import Editor
from alphaedit.models import load_model
from alphaedit.requests import parse_requests
from alphaedit.stats import CorpusSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def timed_edit(model, tokenizer, base, requests, corpus, steps: int, per_pass: int) -> dict:
    model.load_state_dict(base)
    # early_stop_loss 0: exactly `steps` iterations for every request, so both paths do equal work
    config = config_for_model(model.config, v_num_grad_steps=steps, early_stop_loss=0.0, z_requests_per_pass=per_pass)
    editor = Editor(model, tokenizer, config, corpus=corpus, show_progress=False)
    editor.statistics()
    editor.context_templates()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    (report,) = editor.edit(requests)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "s_per_edit": seconds / len(requests), "efficacy": report.efficacy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    records = json.loads((DATA / "counterfact" / "counterfact_test.json").read_text())[:args.edits]
    requests = parse_requests(records)
    corpus = CorpusSpec(str(DATA / "wikitext2_raw" / "wiki.valid.raw"), tokens=20_000)
    model, tokenizer = load_model("smollm2-135m", device=args.device)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    batched = timed_edit(model, tokenizer, base, requests, corpus, args.steps, per_pass=16)
    sequential = timed_edit(model, tokenizer, base, requests, corpus, args.steps, per_pass=1)
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {args.device}",
        "model": "SmolLM2-135M-Instruct (fp32)",
        "edits": args.edits,
        "z_steps": args.steps,
        "batched_s_per_edit": batched["s_per_edit"],
        "sequential_s_per_edit": sequential["s_per_edit"],
        "speedup": sequential["s_per_edit"] / batched["s_per_edit"],
        "batched_efficacy": batched["efficacy"],
        "sequential_efficacy": sequential["efficacy"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    print(f"\n{'path':<28} {'s/edit':>8} {'efficacy':>9}")
    print(f"{'batched (16 per pass)':<28} {batched['s_per_edit']:8.2f} {batched['efficacy']:9.2f}")
    print(f"{'one request at a time':<28} {sequential['s_per_edit']:8.2f} {sequential['efficacy']:9.2f}")
    print(f"speed-up: {result['speedup']:.2f}x")


if __name__ == "__main__":
    main()
