"""`alphaedit edit` (requests into a state folder, batch by batch) and `alphaedit ask` (complete
prompts with the edited model, or with an unedited one given by --model)."""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..config import EditConfig
from ..methods import DEFAULT_METHOD, METHODS, get_method
from ..guard import Guard, GuardTripped
from ..journal import Journal, JournalError
from ..locks import FolderInUse
from ..requests import RequestError, load_requests
from .common import (
    AnchorOption, ClampOption, DeviceOption, DtypeOption, EarlierRereadOption, RehearseOption, RehearseCapOption, RehearseWarmOption, ReplaceHoldsOption, RewriteWeightOption, RewordedOption, ContextTemplatesOption, EarlierWeightOption, LeakWeightOption, JsonOption, L2Option, LayersOption, LayoutOption, LrOption, MaxLengthOption,
    MaxPromptOption, MethodOptionOption, Mom2WeightOption, ModelOption, MostProbableOption, PrefixCacheOption, ProjectOption, RuleOption,
    SamplingOption, SeedOption, SpreadOption, StepsOption, StopNllOption, StopRuleOption, ThresholdOption, TrustOption, _corpus_spec,
    _base_model, _check_chat_values, _dtype_for, _edit_config, _fail, _held_file, _hold, _load, _method_options, _new_editor, _open_journal, _parse_layers, _replay, _seed_for,
    _template_words,
    _state_claim, _with_chat, app, console, out,
)


@app.command()
def edit(
    requests: Annotated[Path, typer.Option("--requests", "-r", help="JSON or JSONL file of edit requests (CounterFact, MEMIT or EasyEdit records).")],
    state: Annotated[Path, typer.Option("--state", "-s", help="State folder: created, or continued when it exists.")],
    model: ModelOption = None,
    method: Annotated[Optional[str], typer.Option(help=f"Editing method: {', '.join(METHODS)} (default {DEFAULT_METHOD}; a continued state keeps its own; see `alphaedit methods`).")] = None,
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
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Write each request that has a \"question\" also in the tokenizer's chat template, so the edit holds when the model is asked in conversation (default on for a new state; a continued state keeps its own).")] = None,
    chat_values: Annotated[Optional[str], typer.Option(help="With chat-aware editing, what a chat form's column asks of W_out: 'own' (a z of its own; the default for a new state), 'shared' (its request's δ, optimised on the plain and chat prompts together) or 'trained' (that δ, written at the plain prompt's key only: no chat column). A continued state keeps its own.")] = None,
    guard: Annotated[bool, typer.Option("--guard", help="Refuse (and take back) a batch after which any edited W_out's largest singular value exceeds --guard-growth × the base model's, or more than --guard-drift of the probe prompts change their next token; the journal keeps the batches before it.")] = False,
    guard_growth: Annotated[float, typer.Option(min=1.0, help="--guard: the largest σ_max(W) / σ_max(W_base) accepted.")] = 1.5,
    guard_drift: Annotated[float, typer.Option(min=0.0, max=1.0, help="--guard: the largest share of probe prompts whose next token may change in one batch.")] = 0.10,
    guard_probes: Annotated[Optional[Path], typer.Option(help="--guard: a text file of probe prompts, one per line (default: 40 general-knowledge prompts).")] = None,
    hold: Annotated[Optional[Path], typer.Option(help="A new state only: a JSON list of texts, or {\"question\": ...} objects (asked in the chat template, the unedited model's own answer held with them), whose W_out outputs every batch is solved to leave as they are (their keys in C_p; Editor.hold). Not in the paper.")] = None,
    allow_repeat: Annotated[bool, typer.Option("--allow-repeat", help="Apply requests that the state already holds again (by default they are skipped, e.g. after a killed run).")] = False,
    max_prompt_tokens: MaxPromptOption = 256,
    layers: LayersOption = None,
    steps: StepsOption = None,
    lr: LrOption = None,
    stop_rule: StopRuleOption = None,
    stop_nll: StopNllOption = None,
    clamp: ClampOption = None,
    l2: L2Option = None,
    mom2_weight: Mom2WeightOption = None,
    earlier_weight: EarlierWeightOption = None,
    leak_weight: LeakWeightOption = None,
    earlier_reread: EarlierRereadOption = None,
    rehearse: RehearseOption = None,
    rehearse_cap: RehearseCapOption = None,
    rehearse_warm: RehearseWarmOption = False,
    replace_holds: ReplaceHoldsOption = False,
    rewrite_weight: RewriteWeightOption = None,
    reworded_prompts: RewordedOption = None,
    context_templates: ContextTemplatesOption = None,
    spread: SpreadOption = None,
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
    submitted = len(parsed)
    _parse_layers(layers)
    template_words = _template_words(context_templates)  # None: the preset's
    _check_chat_values(chat_values)
    probe_prompts = _probe_lines(guard_probes)  # read before the model loads: a bad file changes nothing
    held = _held_file(hold)
    with ExitStack() as claims:  # the state is this command's while it edits (locks.py)
        hold_state = _state_claim(claims, state, "alphaedit edit")  # a new state: at its first batch's commit
        journal = _state_journal(state)
        if journal is not None:
            options = dict(method=method, project=project, method_options=_method_options(method_option), layers=_parse_layers(layers), steps=steps, lr=lr, stop_rule=stop_rule, stop_nll=stop_nll, clamp=clamp, l2=l2, mom2_weight=mom2_weight, spread=spread, earlier_weight=earlier_weight, earlier_reread=earlier_reread, rehearse=rehearse,
                         rehearse_cap=rehearse_cap, leak_weight=leak_weight, reworded_prompts=reworded_prompts, context_templates=template_words, projector_rule=projector_rule, threshold=threshold, corpus=corpus, tokens=tokens, max_length=max_length,
                         seed=_seed_for(seed, sampling), sampling=sampling,
                         layout=json.loads(layout) if layout else None, chat=chat, chat_values=chat_values,
                         # on/off flags: only switching one on can contradict the state
                         stop_most_probable=stop_most_probable or None, anchor_values=anchor_values or None, rehearse_warm=rehearse_warm or None,
                         replace_holds=replace_holds or None, rewrite_weight=rewrite_weight)
            _check_continuation(state, journal.header, options)
            if hold is not None:
                _fail(f"--hold {hold}: {state} began already, and what a state holds is fixed when it begins (its first batch "
                      "reads those keys on the unedited model); leave --hold out, or start a new state")
            parsed = _without_repeats(journal, parsed, allow_repeat)
            if not parsed:
                if as_json:
                    out.print_json(json.dumps({"state": str(state), "requests": 0, "skipped": submitted, "batches": []}))
                else:
                    out.print(f"nothing to do: every request is already in {state}")
                return

        def new_config(lm) -> EditConfig:
            config = _edit_config(lm, method or DEFAULT_METHOD, layers, steps, lr, prefix_cache, projector_rule, threshold, stop_rule, stop_nll, clamp,
                                  project, method_option, stop_most_probable, anchor_values, l2, mom2_weight=mom2_weight, spread=spread, earlier_weight=earlier_weight,
                                  earlier_reread=earlier_reread, rehearse=rehearse, reworded_prompts=reworded_prompts,
                                  context_template_words=template_words, leak_weight=leak_weight, rehearse_cap=rehearse_cap,
                                  rehearse_warm=rehearse_warm, replace_holds=replace_holds, rewrite_weight=rewrite_weight)
            return _with_chat(config, chat, chat_values)

        editor, spec = _state_editor(state, journal, model, dtype, device, trust_remote_code, new_config, layout,
                                     lambda: _corpus_spec(corpus, tokens, max_length, seed, sampling))
        editor.max_prompt_tokens = max_prompt_tokens
        if held is not None:
            _hold(editor, *held)
        editor.config.v_prefix_cache = prefix_cache  # exact either way, so a continued state may switch it too
        if guard:
            editor.guard = Guard(guard_growth, guard_drift, *([probe_prompts] if probe_prompts else []))

        committed = []

        def commit(report) -> None:
            hold_state()
            editor.save_state(state)
            committed.append(report)

        started = time.perf_counter()
        try:
            reports = editor.edit(parsed, batch_size, on_batch=commit)
        except (RequestError, GuardTripped, JournalError, FolderInUse) as e:  # the last two from a batch's commit
            _fail(str(e))
        except KeyboardInterrupt:
            done = sum(r.requests for r in committed)
            console.print(f"interrupted: {len(committed)} batch(es), {done} of {len(parsed)} request(s), were committed to {state} "
                          "before it; the batch in progress was not. The same command continues (requests already in the "
                          "state are skipped)", soft_wrap=True, highlight=False)
            raise typer.Exit(130)
        summary = {
            "state": str(state),
            "method": editor.config.method,
            "layers": editor.config.layers,
            "requests": len(parsed),
            "skipped": submitted - len(parsed),  # already in the state (see --allow-repeat)
            "seconds": time.perf_counter() - started,
            "projector_rank": editor.projector_rank,
            "batches": [asdict(r) for r in reports],
        }
        if as_json:
            out.print_json(json.dumps(summary))
            return
        table = Table(title=f"{len(parsed)} edits into {spec} ({editor.config.method}, layers {editor.config.layers[0]}-{editor.config.layers[-1]})")
        rehearsing = editor.config.rehearse > 0
        for column in ("batch", "requests", "seconds", "z steps", "target p", "efficacy", *(["earlier held", "rehearsed"] if rehearsing else [])):
            table.add_column(column, justify="right")
        for r in reports:
            efficacy = "-" if r.efficacy is None else f"{100 * r.efficacy:.0f}%"
            # with rehearsal: what its check before the batch found, and how many lapsed edits the batch wrote again
            check = ["-" if r.earlier_held is None else f"{100 * r.earlier_held:.1f}%", str(r.rehearsed)] if rehearsing else []
            table.add_row(str(r.index), str(r.requests), f"{r.seconds:.1f}", f"{r.z_steps:.1f}", f"{r.target_prob:.2f}", efficacy, *check)
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
    if header is None and model is None:
        _fail("--model is required for a new state")
    spec = model if header is None else _base_model(state, header, model)
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
    "l2": ("--l2", lambda c, corpus: c.l2_alpha),
    "mom2_weight": ("--mom2-weight", lambda c, corpus: c.mom2_update_weight),
    "spread": ("--spread", lambda c, corpus: c.spread),
    "earlier_weight": ("--earlier-weight", lambda c, corpus: c.earlier_weight),
    "leak_weight": ("--leak-weight", lambda c, corpus: c.leak_weight),
    "earlier_reread": ("--earlier-reread", lambda c, corpus: c.earlier_reread),
    "rehearse": ("--rehearse", lambda c, corpus: c.rehearse),
    "rehearse_cap": ("--rehearse-cap", lambda c, corpus: c.rehearse_cap),
    "rehearse_warm": ("--rehearse-warm", lambda c, corpus: c.rehearse_warm),
    "replace_holds": ("--replace-holds", lambda c, corpus: c.replace_holds),
    "rewrite_weight": ("--rewrite-weight", lambda c, corpus: c.rewrite_weight),
    "reworded_prompts": ("--reworded-prompts", lambda c, corpus: c.reworded_prompts),
    "context_templates": ("--context-templates", lambda c, corpus: c.context_template_words),
    "projector_rule": ("--projector-rule", lambda c, corpus: c.projector_rule),
    "threshold": ("--threshold", lambda c, corpus: c.nullspace_threshold),
    "corpus": ("--corpus", lambda c, corpus: corpus["corpus"]),
    "tokens": ("--tokens", lambda c, corpus: corpus["tokens"]),
    "max_length": ("--max-length", lambda c, corpus: corpus["max_length"]),
    "seed": ("--seed", lambda c, corpus: corpus["seed"]),
    "sampling": ("--sampling", lambda c, corpus: corpus.get("sampling", "stream")),
    "chat": ("--chat/--no-chat", lambda c, corpus: c.chat),
    "chat_values": ("--chat-values", lambda c, corpus: c.chat_values),
    "stop_most_probable": ("--stop-most-probable", lambda c, corpus: c.stop_when_most_probable),
    "anchor_values": ("--anchor-values", lambda c, corpus: c.value_anchor),
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
            _fail(f"{state} was edited with {option} {_as_given(name, recorded)}; it cannot continue with {option} "
                  f"{_as_given(name, value)}. Leave {option} out to continue, or use a new --state")


def _as_given(name: str, value):
    """A recorded setting as its option is written on the command line."""
    if name == "layers":
        return f"{value[0]}-{value[-1]}"
    if name == "context_templates":
        return repr(",".join(value))
    return value


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
    from ..generate import greedy_completions

    if state is None and model is None:
        _fail("give --state DIR (an edited model) or --model M (an unedited one)")
    empty = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        _fail(f"prompt {empty[0]} is empty; give the start of a sentence to complete, e.g. \"The Eiffel Tower is in\"")
    header = _open_journal(state).header if state is not None else None
    spec = model if header is None else _base_model(state, header, model)
    lm, tokenizer = _load(spec, _dtype_for(header, dtype), device, trust_remote_code)
    if state is not None:
        _replay(state, lm, tokenizer)
    completions = greedy_completions(lm, tokenizer, prompts, max_new_tokens)
    if as_json:
        out.print_json(json.dumps([{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]))
        return
    for prompt, completion in zip(prompts, completions):
        out.print(f"[bold]{prompt}[/]{completion}", highlight=False)
