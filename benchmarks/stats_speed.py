"""Throughput of the preserved-knowledge statistics: one pass for all layers vs one per layer.

CPU (default): SmolLM2-135M in fp32 over WikiText-2, layers 3–7.
GPU (--device cuda): a Llama-3-8B-shaped model with random weights, layers 4–8; the one-pass
path in bf16 beside the reference structure (one fp32 pass per layer) in the same run.
`--shape tiny` runs the random-model path at a size a CPU does in seconds (a smoke test).
Prints tokens/s and the implied time for 44M tokens (the authors' 100k Wikipedia articles).

    python benchmarks/stats_speed.py [--device cpu|cuda] [--shape smollm2|llama3-8b|tiny] [--tokens N] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from random_models import SHAPES, random_llama

from alphaedit.layouts import detect_layout, mlp_out_weight
from alphaedit.stats import CorpusSpec, second_moments

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PAPER_TOKENS = 44_000_000


LAYERS = [4, 5, 6, 7, 8]  # Llama-3-8B's preset, also for the tiny shape


def _model(shape: str, device: str, dtype: torch.dtype):
    if shape == "smollm2":
        from alphaedit.models import load_model

        model, tokenizer = load_model("smollm2-135m", dtype="fp32" if dtype == torch.float32 else "bf16", device=device)
        return model, tokenizer, [3, 4, 5, 6, 7], CorpusSpec(str(DATA / "wikitext2_raw"), tokens=0)
    return random_llama(shape, device, dtype), None, LAYERS, None


class _RandomTokens:
    """A tokenizer stand-in for the random-weight model: windows of random token ids."""

    bos_token_id = None
    pad_token_id = 0
    eos_token_id = 0


def _run(model, tokenizer, layers, spec, tokens: int, device: str, per_layer: bool) -> float:
    layout = detect_layout(model)
    groups = [[l] for l in layers] if per_layer else [layers]
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for group in groups:
        if spec is not None:
            second_moments(model, layout, tokenizer, group, CorpusSpec(spec.corpus, tokens=tokens), show_progress=False)
        else:
            _random_pass(model, layout, group, tokens)
    if device != "cpu":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def _random_pass(model, layout, layers, tokens: int, window: int = 2048, batch_tokens: int = 65536) -> None:
    from alphaedit.stats.moments import MomentAccumulator, accumulate_batch

    acc = MomentAccumulator({l: mlp_out_weight(model, layout, l).device for l in layers}, layout.key_size)
    generator = torch.Generator().manual_seed(0)
    done = 0
    while done < tokens:
        rows = max(1, min(batch_tokens, tokens - done) // window)
        windows = torch.randint(1, 128000, (rows, window), generator=generator).tolist()
        done += accumulate_batch(model, layout, _RandomTokens(), acc, windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=["smollm2", *SHAPES], default=None, help="smollm2 on cpu, llama3-8b on cuda")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tokens = args.tokens or (20_000 if args.device == "cpu" else 2_000_000)

    shape = args.shape or ("smollm2" if args.device == "cpu" else "llama3-8b")
    fast_dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model, tokenizer, layers, spec = _model(shape, args.device, fast_dtype)
    one_pass = _run(model, tokenizer, layers, spec, tokens, args.device, per_layer=False)
    print(f"one pass: {one_pass:.0f} tokens/s", file=sys.stderr, flush=True)  # survives a time limit
    if args.device != "cpu":
        model = model.float()
    per_layer = _run(model, tokenizer, layers, spec, tokens, args.device, per_layer=True)
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads" if args.device == "cpu" else torch.cuda.get_device_name(),
        "model": "SmolLM2-135M fp32" if shape == "smollm2" else f"{shape}-shaped Llama, random weights",
        "layers": layers,
        "tokens": tokens,
        "one_pass_tokens_per_s": one_pass,
        "one_pass_dtype": str(fast_dtype).removeprefix("torch."),
        "per_layer_fp32_tokens_per_s": per_layer,
        "speedup": one_pass / per_layer,
        "hours_for_44M_tokens_one_pass": PAPER_TOKENS / one_pass / 3600,
        "hours_for_44M_tokens_per_layer": PAPER_TOKENS / per_layer / 3600,
    }
    if args.json:  # JSON only: a machine reads it
        print(json.dumps(result, indent=2))
        return
    print(f"\n{'path':<34} {'tokens/s':>10} {'44M tokens':>12}")
    print(f"{'one pass, all layers (' + result['one_pass_dtype'] + ')':<34} {one_pass:10.0f} {result['hours_for_44M_tokens_one_pass']:10.2f} h")
    print(f"{'one fp32 pass per layer':<34} {per_layer:10.0f} {result['hours_for_44M_tokens_per_layer']:10.2f} h")
    print(f"speed-up: {result['speedup']:.2f}x")


if __name__ == "__main__":
    main()
