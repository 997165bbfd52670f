"""`alphaedit stats`: the preserved-knowledge statistics C0 of each edited layer, computed (cached,
resumable, optionally in worker processes) or imported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..config import config_for_model
from .common import (
    DeviceOption, DtypeOption, JsonOption, ModelOption, SamplingOption, SeedOption, TrustOption, _corpus_spec, _fail, _layout,
    _load, _parse_layers, app, out,
)


@app.command()
def stats(
    model: ModelOption = "smollm2-135m",
    corpus: Annotated[str, typer.Option(help="A text file or folder (.txt/.raw/.jsonl/.json), 'self' (sampled from the model), or hf:NAME[:CONFIG[:SPLIT]].")] = "self",
    tokens: Annotated[int, typer.Option(min=1, help="Token budget.")] = 20_000,
    max_length: Annotated[int, typer.Option(min=2, help="Tokens per window.")] = 256,
    seed: SeedOption = None,
    sampling: SamplingOption = None,
    layers: Annotated[Optional[str], typer.Option(help="Layers, e.g. '3-7' (default: the preset's edited layers).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write each layer's C0 (safetensors) and the report here.")] = None,
    resume: Annotated[bool, typer.Option("--resume/--restart", help="Continue an interrupted pass from its last checkpoint (default), or start this pass over (other passes keep their checkpoints).")] = True,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Tokens between checkpoints.")] = 1_000_000,
    report: Annotated[bool, typer.Option("--report", help="Print each layer's spectrum summary and kept rank; plot the spectra (PNG).")] = False,
    projector_rule: Annotated[str, typer.Option(help="absolute, relative, energy or rank (see the docs of updates.null_space_mask).")] = "absolute",
    threshold: Annotated[float, typer.Option(help="The rule's value: 2e-2 absolute (the paper's code), e.g. 1e-3 relative, 0.99 energy, or a rank.")] = 2e-2,
    import_file: Annotated[Optional[Path], typer.Option("--import", help="Bring in statistics of other tools: a MEMIT/EasyEdit .npz (mom2.mom2, mom2.count), a folder of them (one per layer, the layer in each name), or AlphaEdit's null_space_project.pt; then edit with --corpus import:PATH.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the memory and time estimate and stop.")] = False,
    layout_override: Annotated[Optional[str], typer.Option("--layout", help="Module paths as JSON, overriding detection (see `edit --help`).")] = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    trust_remote_code: TrustOption = False,
    as_json: JsonOption = False,
) -> None:
    """Compute (or import) the preserved-knowledge second moments C0 of the edited layers, cached.

    Run under `torchrun --nproc-per-node K -m alphaedit stats ...` to split the corpus across
    processes; the sums are all-reduced and rank 0 writes the cache.
    """
    from ..stats import StatsCache, second_moments
    from ..stats.importing import import_statistics
    from ..stats.report import plot_spectra, spectrum_summary

    workers = _start_workers()
    lm, tokenizer = _load(model, dtype, _worker_device(device, workers), trust_remote_code)
    layout = _layout(lm, layout_override)
    chosen = _parse_layers(layers) or config_for_model(lm.config).layers
    spec = _corpus_spec(corpus, tokens, max_length, seed, sampling)
    cache = StatsCache()
    if dry_run:
        estimate = _estimate(lm, layout, chosen, spec)
        out.print_json(json.dumps(estimate)) if as_json else out.print(estimate)
        return
    try:
        if import_file is not None:
            moments = import_statistics(import_file, lm, layout, tokenizer, chosen, cache)
        else:
            moments = second_moments(lm, layout, tokenizer, chosen, spec, cache, show_progress=workers.rank == 0,
                                     checkpoint_every=checkpoint_every, workers=workers, restart=not resume)
    except ValueError as e:
        _fail(str(e))
    if workers.rank != 0:
        return
    summary = {"model": model, "corpus": corpus, "layers": {str(l): {"tokens": m.count} for l, m in moments.items()}}
    if report:
        for layer, moment in moments.items():
            summary["layers"][str(layer)] = spectrum_summary(moment, threshold, projector_rule)
        summary["plot"] = str(plot_spectra(moments, threshold, projector_rule, (out_dir or Path(".")) / "spectra.png"))
    if out_dir is not None:
        from ..files import atomic_save_tensors, atomic_write_text

        for layer, moment in moments.items():
            atomic_save_tensors({"moment": moment.moment}, out_dir / f"layer{layer}.safetensors", {"count": str(moment.count), "layer": str(layer)})
        atomic_write_text(out_dir / "report.json", json.dumps(summary, indent=2))
    if as_json:
        out.print_json(json.dumps(summary))
        return
    table = Table(title=f"C0 of {model} over {corpus}")
    columns = ("layer", "tokens", "max", "median", "min", "null-space rank") if report else ("layer", "tokens")
    for column in columns:
        table.add_column(column, justify="right")
    for layer, row in summary["layers"].items():
        cells = [layer, str(row["tokens"])]
        if report:
            cells += [f"{row['max']:.3g}", f"{row['median']:.3g}", f"{row['min']:.3g}", f"{row['null_space_rank']} / {row['dimension']}"]
        table.add_row(*cells)
    out.print(table)
    if report:
        out.print(f"spectra plotted in {summary['plot']}")


def _start_workers():
    """Join the torchrun job when launched by one (gloo on CPU, nccl on GPUs)."""
    import atexit
    import os

    import torch

    from ..stats import Workers

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        # Left to interpreter teardown, gloo's threads can abort the process ("terminate called
        # without an active exception") when the other rank has already gone.
        atexit.register(torch.distributed.destroy_process_group)
    return Workers.from_torch_distributed()


def _worker_device(device: str, workers) -> str:
    import os

    if device == "auto" and workers.size > 1:
        import torch

        return f"cuda:{os.environ.get('LOCAL_RANK', workers.rank)}" if torch.cuda.is_available() else "cpu"
    return device


def _estimate(lm, layout, layers: list[int], spec) -> dict:
    """Rough memory and time before anything heavy starts (stated assumptions, no measurement)."""
    param_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    d0 = layout.key_size
    accumulators = len(layers) * d0 * d0 * 8
    activations = spec.batch_tokens * (d0 * len(layers) * 4 + layout.hidden_size * 4 * 8)
    depth = (max(layers) + 1) / layout.num_layers
    flops = 2 * param_bytes / lm.dtype.itemsize * depth * spec.tokens
    import torch

    rate = 4e14 if torch.cuda.is_available() else 1e11
    return {
        "model_gib": param_bytes / 2**30,
        "accumulators_gib": accumulators / 2**30,
        "activations_gib": activations / 2**30,
        "total_gib": (param_bytes + accumulators + activations) / 2**30,
        "forward_fraction": depth,
        "estimated_seconds": flops / rate,
        "assumes": f"{rate:.0e} FLOP/s sustained ({'GPU bf16' if torch.cuda.is_available() else 'CPU fp32'}); the pass stops after layer {max(layers)}",
    }
