"""`alphaedit eval` (the paper's protocol: N records edited in sequential batches, evaluated before
and after, resumable and growable), `compare` (reports side by side), `methods` and `multihop`."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..config import describe_preset
from ..methods import DEFAULT_METHOD, METHODS
from ..progress import progress_bar
from ..journal import Journal
from ..requests import RequestError
from .common import (
    AnchorOption, ChatValuesOption, ClampOption, CorpusOption, DeviceOption, DtypeOption, EarlierRereadOption, RehearseOption, RehearseCapOption, RehearseWarmOption, ReplaceHoldsOption, RewriteWeightOption, RewordedOption, ContextTemplatesOption, EarlierWeightOption, LeakWeightOption, JsonOption, L2Option, LayersOption, LayoutOption, LrOption,
    MaxLengthOption, MethodOptionOption, Mom2WeightOption, ModelOption, MostProbableOption, PrefixCacheOption, ProjectOption, RuleOption,
    SamplingOption, SeedOption, SpreadOption, StepsOption, StopNllOption, StopRuleOption, ThresholdOption, TokensOption, TrustOption,
    _check_chat_values, _check_method_choice, _claimed, _corpus_spec, _edit_config, _fail, _held_file, _hold, _load, _method_label, _new_editor, _parse_layers, _replay, _template_words, app, console, out,
)


@app.command()
def methods(as_json: JsonOption = False) -> None:
    """List the editing methods: what each does, its own options (with the papers' defaults) and its source."""
    rows = [{"name": m.name, "summary": m.summary, "projected_by_default": m.projected_by_default, "options": m.option_defaults(),
             "source": m.source} for m in METHODS.values()]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="editing methods (--method NAME; --project/--no-project switches AlphaEdit's null-space projection on any of them)")
    # a narrow terminal folds the cells, never cuts them: an option's default is what one looks for
    for column in ("method", "what it does", "projection", "options (--method-option NAME=VALUE)", "follows"):
        table.add_column(column, overflow="fold")
    for row in rows:
        options = "\n".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["options"].items()) or "–"
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
    from ..eval.compare import as_json as compare_json, load_runs, markdown, plot

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
    method: Annotated[str, typer.Option(help=f"Editing method: {', '.join(METHODS)} (see `alphaedit methods`).")] = DEFAULT_METHOD,
    project: ProjectOption = None,
    method_option: MethodOptionOption = None,
    every: Annotated[Optional[int], typer.Option(min=1, help="Also evaluate every K batches (curves).")] = None,
    curve_of: Annotated[str, typer.Option(help="What a curve point (--every) evaluates: 'all' records, edited or not yet (the paper's figures), or the records 'edited' so far (do the edits made still hold?).")] = "all",
    curve_sample: Annotated[Optional[int], typer.Option(min=1, help="At most this many records per curve point, evenly spread over those it evaluates (a long run's points then cost minutes, not hours).")] = None,
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
    stop_most_probable: MostProbableOption = False,
    anchor_values: AnchorOption = False,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Chat-aware editing: give each edit request a question (CounterFact: its relation's question form; zsRE: its prompt) so that the fact is also written in the tokenizer's chat template.")] = False,
    chat_values: ChatValuesOption = "own",
    chat_eval: Annotated[bool, typer.Option("--chat-eval/--no-chat-eval", help="Also evaluate by generation: the model answers each record's question, paraphrased question and neighbours' questions freely (chat template where the model has one); an answer counts when it states the expected object.")] = False,
    chat_max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens of one free answer (--chat-eval); an answer also ends at the end of its turn.")] = 32,
    chat_neighbours: Annotated[int, typer.Option(min=0, help="Neighbour questions per record in --chat-eval (0: all of them; each costs a free answer).")] = 4,
    chat_judge: Annotated[Optional[str], typer.Option(help="With --chat-eval, also have this model (a hub id, a folder or a bundled alias; unedited, ideally stronger than the edited one) judge whether each free answer states the expected object: reported beside the normalised match as chat_*_judged, with judge_agreement, the share of answers on which the two agree.")] = None,
    keep_conversations: Annotated[int, typer.Option(min=0, help="Hold N conversations about subjects nobody edits (CounterFact; a relation's question about a subject no evaluated record names, and the unedited model's own answer): every batch is solved to leave W_out's outputs at all their positions as they were (Editor.hold; not in the paper), so that answers about other subjects change less.")] = 0,
    keep_same_relation: Annotated[int, typer.Option(min=0, help="Keep K subjects of the same relation per edit (CounterFact; drawn from records not evaluated, never one an evaluated record names): the solve asks W_out not to change their answer, so that an edit spreads less to its neighbours (EditRequest.keep_subjects).")] = 0,
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
        # An option newer than the run takes its default here, once; a new option's default must
        # therefore be the behaviour runs had before it existed (as every option's is today).
        args = {**args, **recorded}
        out_dir = resume
        if grow and n != recorded["n"]:
            _check_growth(resume, args, n)
            args = {**args, "n": n}
    else:
        if dataset is None or out_dir is None:
            _fail("give --dataset and --out for a new run (or --resume DIR to continue one)")
        if (out_dir / "run.json").exists():
            _fail(f"--out {out_dir} holds a run already; continue it with --resume {out_dir}, or choose a new --out")
        if out_dir.exists() and not out_dir.is_dir():
            _fail(f"--out {out_dir} is a file; give a folder")
    _run_eval(args, Path(out_dir), resuming=resume is not None, as_json=as_json)


def _earlier_points(curve_of: str, curve_sample: int | None, before: int) -> str:
    """What the curve points a grown run took before it grew are means over."""
    if curve_of == "edited":
        return ""  # the records edited so far: the same as in a run started with more records
    sample = "a sample of " if curve_sample else ""
    return f"; curve points before {before} edits are means over {sample}the first {before} records"


def _check_growth(folder: Path, a: dict, n: int) -> None:
    """A run can go on to n records (the first n of its dataset) when that gives the same sequence
    of batches as a run started with n: its records are the first ones and its batches whole."""
    if n < a["n"]:
        _fail(f"--n {n}: the run in {folder} has {a['n']} records already; with --resume, --n can only grow a run")
    if a["select_seed"] is not None:
        _fail(f"--n: the run in {folder} drew its records with --select-seed {a['select_seed']}; a draw of {n} is another set, "
              "so it cannot grow (start a new run with --out)")
    if a["keep_same_relation"] or a["keep_conversations"]:
        _fail(f"--n: the run in {folder} keeps subjects drawn from the records it does not evaluate (--keep-same-relation or --keep-conversations); "
              "grown, some of them would be evaluated, so it cannot grow (start a new run with --out)")
    if a["n"] % a["batch_size"]:
        _fail(f"--n: the run in {folder} ended with a partial batch ({a['n']} records in batches of {a['batch_size']}); "
              "grown, its batches would not be those of a run started with more records (start a new run with --out)")


def _run_eval(a: dict, out_dir: Path, resuming: bool, as_json: bool) -> None:
    """The protocol for the options `a` (run.json's "args"): check them, record the run, then
    pre-edit evaluation, the sequence with its periodic checks, the final evaluation and the report."""
    from ..eval.evaluator import EvalSettings, Evaluator
    from ..eval.general import GeneralCheck
    from ..eval.pre_cache import PreEvalCache
    from ..eval.protocol import grow_pre, run_protocol
    from ..eval.report import keep_earlier_report, write_report

    tasks = _check_eval_options(a)  # everything that needs no model fails before it loads; None: no general check
    records, skipped, held = _eval_records(a)
    # one process per run folder, for its whole life; its state too, so that `revert` waits for it
    with _claimed(out_dir, "alphaedit eval"), _claimed(out_dir / "state", "alphaedit eval"):
        run_file = _record_run(a, out_dir, resuming)
        keep_earlier_report(out_dir, len(records))  # a grown run's earlier report, into at-N-edits/
        lm, tokenizer = _load(a["model"], a["dtype"], a["device"], a["trust_remote_code"])
        settings = EvalSettings(generation_every=a["generation_every"], perplexity_corpus=a["perplexity_corpus"],
                                perplexity_tokens=a["perplexity_tokens"], idf_corpus=a["idf_corpus"] or a["perplexity_corpus"],
                                consistency=a["consistency"], chat_eval=a["chat_eval"], chat_max_tokens=a["chat_max_tokens"],
                                chat_neighbours=a["chat_neighbours"] or None, chat_judge=a["chat_judge"])
        evaluator = Evaluator(lm, tokenizer, records, settings, on_phase=lambda message: console.print(message, soft_wrap=True, highlight=False),
                              judge=_judge(a))
        grow_pre(out_dir, evaluator)  # a grown run's new records, scored before the journal's edits are replayed
        state = out_dir / "state"
        editor = _replay(state, lm, tokenizer) if Journal.exists(state) else _eval_editor(a, lm, tokenizer)
        if held and not editor.held:  # a new run (a resumed one held them again from its journal)
            console.print(f"holding {len(held)} conversations about subjects nobody edits …", highlight=False)
            _hold(editor, [], held, "--keep-conversations", a["chat_max_tokens"])
        general = GeneralCheck(lm, tokenizer, Path(a["general"]), a["general_tests"], tasks, editor.layout) if tasks is not None else None
        editor.statistics()  # before the timed edits, as the paper's per-batch times exclude it
        with _run_progress(len(records), len(editor.batches) * a["batch_size"], evaluator) as on_batch:
            try:
                result = run_protocol(editor, evaluator, a["batch_size"], out_dir, a["every"], general, a["general_every"], on_batch,
                                      PreEvalCache() if a["pre_cache"] else None, a["curve_of"], a["curve_sample"])
            except (ValueError, RequestError) as e:
                _fail(str(e))
        result.notes += _eval_notes(records, settings) + _run_notes(a, records, skipped, run_file, editor, tasks, out_dir)
        summary = write_report(result, out_dir, _run_meta(a, records, editor, lm))
        if as_json:
            out.print_json(json.dumps(summary))
            return
        out.print((out_dir / "summary.md").read_text())
        out.print(f"report in {out_dir}")


def _judge(a: dict):
    """The answer judge of --chat-judge (eval/judge.py), loaded as the edited model is; None without one."""
    if a["chat_judge"] is None:
        return None
    from ..eval.judge import AnswerJudge

    judge_lm, judge_tokenizer = _load(a["chat_judge"], a["dtype"], a["device"], a["trust_remote_code"])
    try:
        return AnswerJudge(judge_lm, judge_tokenizer, a["chat_judge"])
    except ValueError as e:
        _fail(f"--chat-judge {a['chat_judge']}: {e}")


def _check_eval_options(a: dict) -> list[str] | None:
    """Refuse what cannot run, before anything loads; the general check's tasks (None without --general)."""
    from ..eval.general import TASKS, load_task_records
    from ..eval.protocol import CURVE_OF

    _parse_layers(a["layers"])
    _template_words(a["context_templates"])  # (a resumed run's args hold every option: the recorded ones over today's defaults)
    _check_method_choice(a["method"], a["project"], a["method_option"], a["l2"], a["mom2_weight"], a["spread"], a["earlier_weight"],
                         a["earlier_reread"], a["rehearse"], a["leak_weight"], a["rehearse_cap"], a["rehearse_warm"],
                         a["replace_holds"], a["rewrite_weight"])
    if a["curve_of"] not in CURVE_OF:
        _fail(f"--curve-of {a['curve_of']}: choose {' or '.join(CURVE_OF)}")
    if _curve_chosen(a) and not a["every"]:
        _fail("--curve-of and --curve-sample choose the records of the curve points: give --every K too")
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
    consistency = a["consistency"]
    if consistency != "local":
        if not (consistency == "rome" or consistency.startswith("rome:")):
            _fail(f"--consistency {consistency}: choose rome, rome:DIR or local")
        from ..eval.consistency import rome_folder

        try:
            rome_folder(consistency)  # fetched or checked before the model loads
        except ValueError as e:
            _fail(str(e))
    _check_chat_values(a["chat_values"])
    if a["chat_judge"] is not None and not a["chat_eval"]:
        _fail(f"--chat-judge {a['chat_judge']}: the judge reads the free answers of --chat-eval; add --chat-eval")
    return tasks if a["general"] is not None else None


def _curve_chosen(a: dict) -> bool:
    """Whether the curve points evaluate a chosen set of records rather than all of them."""
    return a["curve_of"] != "all" or bool(a["curve_sample"])


def _eval_records(a: dict) -> tuple[list, list[str], list[str]]:
    """The evaluated records (with their kept subjects and chat questions where asked), the
    dataset's records left out as invalid or repeated, and the questions of --keep-conversations."""
    from ..eval.datasets import held_questions, load_dataset, select, with_kept_subjects, with_questions

    skipped: list[str] = []
    try:
        dataset = load_dataset(a["dataset"], skipped)
        records = select(dataset, a["n"], a["select_seed"])
        if a["keep_same_relation"]:
            records = with_kept_subjects(records, dataset, a["keep_same_relation"])
        held = held_questions(records, dataset, a["keep_conversations"]) if a["keep_conversations"] else []
    except (ValueError, RequestError) as e:
        _fail(str(e))
    return (with_questions(records) if a["chat"] else records), skipped, held


def _record_run(a: dict, out_dir: Path, resuming: bool) -> dict:
    """run.json: written by a new run; on resume with a larger --n (now that the records are known
    to exist), rewritten with the new args and the growth appended to its "grown" list."""
    from ..files import atomic_write_text

    if not resuming:
        atomic_write_text(out_dir / "run.json", json.dumps({"args": a}, indent=1))
    run_file = json.loads((out_dir / "run.json").read_text(encoding="utf-8"))
    if run_file["args"]["n"] != a["n"]:
        grown = {"from": run_file["args"]["n"], "to": a["n"], "at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        run_file = {**run_file, "args": a, "grown": [*run_file.get("grown", []), grown]}
        atomic_write_text(out_dir / "run.json", json.dumps(run_file, indent=1))
    return run_file


def _eval_editor(a: dict, lm, tokenizer):
    """A new run's editor, configured from its options."""
    config = _edit_config(lm, a["method"], a["layers"], a["steps"], a["lr"], a["prefix_cache"], a["projector_rule"], a["threshold"],
                          a["stop_rule"], a["stop_nll"], a["clamp"], a["project"], a["method_option"], a["stop_most_probable"],
                          a["anchor_values"], a["l2"], mom2_weight=a["mom2_weight"], spread=a["spread"],
                          earlier_weight=a["earlier_weight"], earlier_reread=a["earlier_reread"], rehearse=a["rehearse"],
                          reworded_prompts=a["reworded_prompts"], context_template_words=_template_words(a["context_templates"]),
                          leak_weight=a["leak_weight"], rehearse_cap=a["rehearse_cap"], rehearse_warm=a["rehearse_warm"],
                          replace_holds=a["replace_holds"], rewrite_weight=a["rewrite_weight"])
    config.chat = a["chat"]  # the records carry questions only with --chat
    config.chat_values = a["chat_values"]
    return _new_editor(lm, tokenizer, config, a["layout"], _corpus_spec(a["corpus"], a["tokens"], a["max_length"], a["seed"], a["sampling"]),
                       a["model"], show_progress=False)


def _run_notes(a: dict, records: list, skipped: list[str], run_file: dict, editor, tasks: list[str] | None, out_dir: Path) -> list[str]:
    """What the report must say about how this run was made (its notes), beyond the evaluation's own;
    `tasks`: the general check's, None without one."""
    notes = []
    if editor.config.chat and any(r.request.question is not None for r in records):
        asked = sum(r.request.question is not None for r in records)
        how = {"own": "written in the chat template, each as a column of its own",
               "shared": "written in the chat template, each as a column of its own, sharing its request's δ (--chat-values shared)",
               "trained": "trained in the chat template, training its request's δ, with no column of its own (--chat-values trained)"}
        notes.append(f"chat-aware editing (--chat): {asked} requests with a question were also {how[editor.config.chat_values]}")
    for grown in run_file.get("grown", []):
        earlier, old_batches = out_dir / f"at-{grown['from']}-edits", grown["from"] // a["batch_size"]
        extra = tasks is not None and not (a["general_every"] and old_batches % a["general_every"] == 0)
        notes.append(f"grown from {grown['from']} to {grown['to']} records ({grown['at']}, `eval --resume DIR --n {grown['to']}`): the "
                     f"same batches and measurements as a run started with {grown['to']}"
                     + (", plus the general check the shorter run took after its last batch" if extra else "")
                     + (_earlier_points(a["curve_of"], a["curve_sample"], grown["from"]) if a["every"] else "")
                     + (f"; its report is kept in {earlier}" if earlier.is_dir() else ""))
    if _curve_chosen(a):
        which = "the records edited so far" if a["curve_of"] == "edited" else "all records"
        notes.append(f"curve points between the first and the last evaluate {which}"
                     + (f", at most {a['curve_sample']} of them evenly spread" if a["curve_sample"] else ""))
    if a["keep_same_relation"]:
        kept = [len(r.request.keep_subjects) for r in records]
        notes.append(f"each edit kept up to {a['keep_same_relation']} subjects of its relation unchanged (--keep-same-relation; "
                     f"{sum(kept) / len(kept):.1f} on average), drawn from the dataset's other records")
    if a["keep_conversations"]:
        notes.append(f"every batch held {a['keep_conversations']} conversations about subjects no evaluated record names (--keep-conversations: "
                     "a relation's question and the unedited model's own answer, every position's key in C_p; not in the paper)")
    if skipped:
        notes.append(f"{len(skipped)} dataset records left out: invalid edit requests, or (in a stream of several files) "
                     f"repeats of an earlier record's subject and prompt (first: {skipped[0]})")
    if tasks is not None:
        notes.append(f"general capability: {', '.join(tasks)}, {a['general_tests']} records each, zero-shot, before the first batch, "
                     + (f"every {a['general_every']} batches and " if a["general_every"] else "") + "after the last; RTE in GLUE's label coding")
    return notes


def _run_meta(a: dict, records: list, editor, lm) -> dict:
    """The report's description of the run: model, data, method and its settings, the z optimisation's
    preset and how many steps it took."""
    c = editor.config
    history = editor.history
    return {"model": a["model"], "dataset": a["dataset"], "n": len(records), "batch_size": a["batch_size"],
            "batches": -(-len(records) // a["batch_size"]), "method": c.method, "consistency_source": a["consistency"],
            "projected": editor.method.projects(c), "method_label": _method_label(c), "method_options": asdict(editor.method.option_values(c)),
            "layers": c.layers, "selection": "first N" if a["select_seed"] is None else f"seed {a['select_seed']}",
            "generation_every": a["generation_every"], "corpus": a["corpus"], "tokens": a["tokens"], "projector_rank": editor.projector_rank,
            "preset": c.preset, "preset_reason": describe_preset(lm.config), "z_steps_cap": c.v_num_grad_steps, "v_lr": c.v_lr,
            "stop_rule": c.early_stop_rule, "clamp": c.clamp_norm_factor, "l2_alpha": c.l2_alpha, "mom2_update_weight": c.mom2_update_weight, "earlier_weight": c.earlier_weight, "leak_weight": c.leak_weight, "earlier_reread": c.earlier_reread, "rehearse": c.rehearse, "rehearse_cap": c.rehearse_cap, "rehearse_warm": c.rehearse_warm, "replace_holds": c.replace_holds, "rewrite_weight": c.rewrite_weight, "reworded_prompts": c.reworded_prompts, "context_template_words": c.context_template_words, "spread": c.spread, "chat": a["chat"], "chat_values": c.chat_values,
            "keep_same_relation": a["keep_same_relation"], "keep_conversations": a["keep_conversations"], "chat_eval": a["chat_eval"], "chat_judge": a["chat_judge"],
            "stop_threshold": c.early_stop_nll if c.early_stop_rule == "nll" else c.early_stop_loss,
            "mean_z_steps": sum(r.z_steps * r.requests for r in history) / max(1, sum(r.requests for r in history))}


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
        shown = " · ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in latest.items() if v is not None)
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
                     f"{len(records)} records; an answer counts when it states the new object (locality: the neighbour's own; "
                     f"chat_leak: a neighbour's answer that states the edit's new object)")
    if settings.chat_judge:
        notes.append(f"chat_*_judged: the same answers as the judge model {settings.chat_judge} counts them (its yes against its no "
                     "after the question, the answer and the expected object; eval/judge.py); judge_agreement: the share of answers "
                     "on which it agrees with the normalised match — believe the judged columns only where that is high")
    return notes


@app.command()
def multihop(
    dataset: Annotated[Path, typer.Option(help="MQuAKE records (e.g. ../shared/data/mquake/AKEW_MQuAKE-CF.json).")],
    n: Annotated[Optional[int], typer.Option("--n", min=1, help="Cases to evaluate (default: all); each is edited alone and reverted.")] = None,
    model: ModelOption = "smollm2-135m",
    method: Annotated[str, typer.Option(help=f"Editing method: {', '.join(METHODS)}.")] = DEFAULT_METHOD,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Write each rewrite also in the chat template, with its MQuAKE question.")] = False,
    chat_values: ChatValuesOption = "own",
    l2: L2Option = None,
    corpus: CorpusOption = "self",
    tokens: TokensOption = 20_000,
    layers: LayersOption = None,
    steps: StepsOption = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens of one free answer.")] = 32,
    hold: Annotated[Optional[Path], typer.Option(help="A JSON list of texts, or {\"question\": ...} objects (held with the unedited model's own answer), whose W_out outputs every case's edit is solved to leave as they are (Editor.hold; as `edit --hold`).")] = None,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Write the report (summary and every case's answers) to this JSON file.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Portability (MQuAKE): edit each case's single-hop facts, ask its multi-hop questions freely, revert."""
    from ..eval.multihop import load_mquake, run_multihop
    from ..files import atomic_write_text

    _check_chat_values(chat_values)
    _check_method_choice(method, None, None, l2)
    held = _held_file(hold)
    try:
        cases = load_mquake(dataset, n)
    except (OSError, ValueError, RequestError) as e:
        _fail(f"--dataset {dataset}: {e}")
    lm, tokenizer = _load(model)
    config = _edit_config(lm, method, layers, steps, None, True, None, None, l2=l2)
    config.chat, config.chat_values = chat, chat_values
    editor = _new_editor(lm, tokenizer, config, None, _corpus_spec(corpus, tokens, None, None), model, show_progress=False)
    if held is not None:
        _hold(editor, *held, max_new_tokens=max_tokens)
    editor.statistics()
    with progress_bar("multihop (cases)", total=len(cases), enabled=not as_json) as advance:
        report = run_multihop(editor, cases, max_tokens, on_case=lambda _: advance(1))
    report = {"model": model, "dataset": str(dataset), "n": len(cases), "method": _method_label(config), "chat": chat,
              "chat_values": chat_values if chat else None,
              "held_texts": sum(len(h.texts) for h in editor.held), **report}
    if out_file is not None:
        atomic_write_text(out_file, json.dumps(report, indent=1))
    if as_json:
        out.print_json(json.dumps({k: v for k, v in report.items() if k != "cases"}))
        return
    table = Table(title=f"MQuAKE portability, {len(cases)} cases, {report['method']}" + (f" + chat-aware ({chat_values} values)" if chat else ""))
    for column in ("", "multi-hop, new answer", "multi-hop, old answer", "edited facts answered"):
        table.add_column(column, justify="right")
    for block in ("pre", "post"):
        s = report[block]
        table.add_row("pre-edit" if block == "pre" else "after each case's edits", *(f"{s[m]:.1f}" for m in ("multihop", "multihop_old", "edited")))
    out.print(table)
