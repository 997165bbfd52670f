"""Seconds per edit: the batched z optimisation against one request at a time, same code.

CPU (default): SmolLM2-135M in float32, one batch of the first `--edits` CounterFact records,
exactly `--steps` z iterations for every request (early stop off, so every path does the same
work). Four paths, each on the same model with its edited layers restored in between:

    batched                 all requests share each forward/backward; prefixes cached
    one at a time           the same code with v_requests_per_pass=1 (the authors' loop)
    batched, plain passes   every pass recomputes the whole rows (v_prefix_cache=False)
    one at a time, plain    both switched off: the previous path, for the ratios

GPU (`--device cuda --shape llama3-8b`): a Llama-3-8B-shaped model with random weights in
bf16, layers 4-8 (the preset), one batch of 100 edits with exactly 25 z steps, beside the
one-request-at-a-time path in float32 (on `--sequential-edits` of them, reported per edit)
and the batched path without the prefix cache. Peak GPU memory per path.

    python benchmarks/edit_speed.py [--device cpu|cuda] [--shape smollm2|llama3-8b|tiny]
        [--edits N] [--steps N] [--requests FILE] [--tokenizer DIR] [--json]

Statistics and context templates are prepared before any clock starts; each path's time is
split into z, keys, solve and check (the post-edit efficacy probe) from the batch report.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from random_models import LLAMA3_VOCAB, SHAPES, random_llama
from transformers import AutoTokenizer

from alphaedit.config import config_for_model
from alphaedit.editor import Editor
from alphaedit.layouts import detect_layout, mlp_out_weight
from alphaedit.models import load_model, smollm2_folder
from alphaedit.requests import parse_requests
from alphaedit.stats import CorpusSpec, StatsCache

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class Variant:
    name: str
    per_pass: int  # v_requests_per_pass (1 = each request alone)
    prefix_cache: bool
    dtype: torch.dtype
    edits: int


def run_variant(model, tokenizer, requests, corpus, cache, base, variant: Variant, steps: int) -> dict:
    model.to(variant.dtype)
    layout = detect_layout(model)
    with torch.no_grad():
        for layer, weight in base.items():
            mlp_out_weight(model, layout, layer).copy_(weight)
    # early_stop_loss 0: exactly `steps` iterations for every request
    config = config_for_model(
        model.config, v_num_grad_steps=steps, early_stop_loss=0.0,
        v_requests_per_pass=variant.per_pass, v_prefix_cache=variant.prefix_cache,
    )
    editor = Editor(model, tokenizer, config, corpus=corpus, cache=cache, show_progress=False)
    editor.statistics()
    editor.context_templates()
    cuda = next(model.parameters()).device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    (report,) = editor.edit(requests[: variant.edits])
    seconds = time.perf_counter() - start
    result = {
        "path": variant.name,
        "edits": variant.edits,
        "dtype": str(variant.dtype).removeprefix("torch."),
        "s_per_edit": seconds / variant.edits,
        "phase_s_per_edit": {k: v / variant.edits for k, v in report.phase_seconds.items()},
        "efficacy": report.efficacy,
    }
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=["smollm2", *SHAPES], default=None, help="smollm2 on cpu, llama3-8b on cuda")
    parser.add_argument("--edits", type=int, default=None, help="20 for smollm2, 100 otherwise")
    parser.add_argument("--sequential-edits", type=int, default=None, help="edits for the one-at-a-time paths (default: --edits)")
    parser.add_argument("--steps", type=int, default=None, help="10 for smollm2, 25 otherwise")
    parser.add_argument("--requests", default=str(DATA / "counterfact" / "counterfact_test.json"))
    parser.add_argument("--corpus", default=str(DATA / "wikitext2_raw" / "wiki.valid.raw"))
    parser.add_argument("--corpus-tokens", type=int, default=20_000)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for random models (default: SmolLM2's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shape = args.shape or ("llama3-8b" if args.device == "cuda" else "smollm2")
    edits = args.edits or (20 if shape == "smollm2" else 100)
    sequential = min(args.sequential_edits or edits, edits)
    steps = args.steps or (10 if shape == "smollm2" else 25)

    records = json.loads(Path(args.requests).read_text())[:edits]
    requests = parse_requests(records)
    corpus = CorpusSpec(args.corpus, tokens=args.corpus_tokens)
    if shape == "smollm2":
        model, tokenizer = load_model("smollm2-135m", device=args.device)
        cache = StatsCache()
        paths = [
            Variant("batched", 16, True, torch.float32, edits),
            Variant("one at a time", 1, True, torch.float32, sequential),
            Variant("batched, plain passes", 16, False, torch.float32, edits),
            Variant("one at a time, plain passes", 1, False, torch.float32, sequential),
        ]
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or smollm2_folder())
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        vocab_size = max(len(tokenizer), LLAMA3_VOCAB) if shape == "llama3-8b" else len(tokenizer)
        model = random_llama(shape, args.device, torch.bfloat16, vocab_size)
        cache = StatsCache(Path(tempfile.mkdtemp(prefix="alphaedit-bench-")))  # random weights: not the user's cache
        paths = [
            Variant("batched, bf16", edits, True, torch.bfloat16, edits),
            Variant("batched, bf16, plain passes", edits, False, torch.bfloat16, edits),
            Variant("one at a time, fp32", 1, True, torch.float32, sequential),
            Variant("one at a time, fp32, plain passes", 1, False, torch.float32, sequential),
        ]
    layers = config_for_model(model.config).layers
    layout = detect_layout(model)
    base = {l: mlp_out_weight(model, layout, l).detach().clone() for l in layers}
    results = []
    for path in paths:
        start = time.perf_counter()
        results.append(run_variant(model, tokenizer, requests, corpus, cache, base, path, steps))
        # each path as it ends, on stderr: a run stopped at its time limit still says what it measured
        print(f"path done in {time.perf_counter() - start:.0f} s (statistics included): {json.dumps(results[-1])}",
              file=sys.stderr, flush=True)

    summary = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""),
        "model": "SmolLM2-135M-Instruct" if shape == "smollm2" else f"random {shape}-shaped Llama",
        "layers": layers,
        "z_steps": steps,
        "paths": results,
        "batched_s_per_edit": results[0]["s_per_edit"],
        "sequential_s_per_edit": results[2 if shape != "smollm2" else 1]["s_per_edit"],
    }
    summary["speedup"] = summary["sequential_s_per_edit"] / summary["batched_s_per_edit"]
    if args.json:  # JSON only: a machine reads it
        print(json.dumps(summary, indent=2))
        return
    print(f"\n{summary['model']}, layers {layers}, {steps} z steps, {summary['machine']}")
    print(f"{'path':<34} {'edits':>5} {'s/edit':>8} {'z':>7} {'keys':>6} {'solve':>6} {'check':>6} {'eff':>5} {'peak GiB':>9} {'ratio':>6}")
    for r in results:
        p = r["phase_s_per_edit"]
        peak = f"{r['peak_gib']:9.1f}" if "peak_gib" in r else f"{'':>9}"
        ratio = r["s_per_edit"] / results[0]["s_per_edit"]
        print(
            f"{r['path']:<34} {r['edits']:>5} {r['s_per_edit']:8.3f} {p.get('z', 0):7.3f} {p.get('keys', 0):6.3f} "
            f"{p.get('solve', 0):6.3f} {p.get('check', 0):6.3f} {r['efficacy'] or 0:5.2f} {peak} {ratio:5.2f}x"
        )


if __name__ == "__main__":
    main()
