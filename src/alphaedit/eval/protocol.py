"""The paper's sequential protocol (ALGORITHM.md §3.1), resumable, on any model and method.

N records are edited in sequential batches of B by one Editor. Every record is evaluated before
the first batch and after the last; optionally also every K batches, for curves: all records (the
paper's figures) or the ones edited so far, all or a sample of them (Schedule). The six-task
general-capability check (general.py) runs before the first batch, every G batches and after the
last (the paper's Fig. 4).

A run lives in its report folder and survives a kill at any point:

    state/           the editor's journal, committed after every batch
    progress.json    everything measured so far, committed after each batch's measurements
    pre.jsonl        the pre-edit per-record scores (from pre_cache.py's cache when an earlier
                     run computed the same ones)
    general/NNNNNN.jsonl   each general check's answers, NNNNNN = edits done

Resuming replays the journal (the same weights, bit for bit), takes the measurements a kill
skipped, and continues: the final numbers equal an uninterrupted run's. A run can also grow: resumed
with more records (the first N of the same dataset), it scores the new records on the unedited model
(grow_pre, before the replay), keeps its earlier report (report.keep_earlier_report), takes the measurements
the longer schedule calls for after its last batch, and continues — again to the numbers of a run
started with all the records, except the curve points of all records taken before it grew: those
are means over the records it had then (marked with their "records"; a point of the records edited
so far is the same in both).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..editor import Editor
from ..files import atomic_write_text
from ..layouts import mlp_out_weight
from .evaluator import GENERAL_PHASE, SUCCESS_METRICS, Evaluation, Evaluator, summarise
from .general import GeneralCheck, mean_f1
from .pre_cache import PreEvalCache, pre_eval_key

@dataclass
class ProtocolResult:
    pre: Evaluation
    post: Evaluation
    # {"edits": n, metric: value, ...; "records": how many a point is a mean over, where not all,
    # and "of": "all" or "edited" for a point of a chosen set (Schedule.curve_records)}
    curve: list[dict] = field(default_factory=list)
    norms: list[dict] = field(default_factory=list)  # {"edits": n, "layer": ‖W‖_F, ...}
    general: list[dict] = field(default_factory=list)  # {"edits": n, "scores": {task: {f1, f1_label, mcc, ...}}}
    seconds_editing: float = 0.0
    notes: list[str] = field(default_factory=list)
    # per batch, from the editor's reports: {"edits": n, "weight_growth": {layer: {frobenius, spectral}},
    # "value_norm", "value_shift", "null_space_rank"} (monitoring, issue 14), and with rehearsal the
    # check before the batch: "checked_at" (the edits before it), "earlier_held", "earlier_lapsed",
    # "rewrites_counted", "rewrites_lapsed", and "rehearsed", how many the batch wrote again
    monitor: list[dict] = field(default_factory=list)


def monitor(editor: Editor) -> list[dict]:
    """The monitoring fields of every batch report, against the number of edits after it."""
    points, edits = [], 0
    for report in editor.history:
        edits += report.requests
        if report.weight_growth:
            points.append({"edits": edits, "weight_growth": report.weight_growth, "value_norm": report.value_norm,
                           "value_shift": report.value_shift, "null_space_rank": report.null_space_rank})
            if report.earlier_held is not None:  # the rehearsal check before the batch
                points[-1].update({"checked_at": edits - report.requests, "earlier_held": report.earlier_held,
                                   "earlier_lapsed": report.earlier_lapsed, "rewrites_counted": report.rewrites_counted,
                                   "rewrites_lapsed": report.rewrites_lapsed, "rehearsed": report.rehearsed})
    return points


def weight_norms(editor: Editor) -> dict[str, float]:
    return {str(l): float(mlp_out_weight(editor.model, editor.layout, l).detach().float().norm()) for l in editor.config.layers}


class RunFolder:
    """The files through which a run survives a kill (see the module docstring); each written atomically."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.state = self.root / "state"

    def progress(self) -> dict | None:
        path = self.root / "progress.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def commit(self, progress: dict) -> None:
        atomic_write_text(self.root / "progress.json", json.dumps(progress, indent=1))

    def write_rows(self, name: str, rows: list[dict]) -> None:
        atomic_write_text(self.root / name, "".join(json.dumps(r) + "\n" for r in rows))

    def read_rows(self, name: str) -> list[dict]:
        return [json.loads(line) for line in (self.root / name).read_text(encoding="utf-8").splitlines()]


CURVE_OF = ("all", "edited")  # what a curve point between the first and the last evaluates


@dataclass
class Schedule:
    """Which measurements follow which batch (counted from 1), and of which records."""

    batches: int
    every: int | None = None  # teacher-forced metrics every K batches (curves)
    general_every: int | None = None  # the general check every G batches (and always after the last)
    # a curve point of "all" records (edited or not yet: the paper's figures) or of the records
    # "edited" so far (a lifelong run's question: do the edits made hold?), at most curve_sample
    # of them, evenly spread over the sequence (a 10,000-record evaluation per point costs hours)
    curve_of: str = "all"
    curve_sample: int | None = None

    def __post_init__(self) -> None:
        if self.curve_of not in CURVE_OF:
            raise ValueError(f"curve_of must be one of {', '.join(CURVE_OF)}, not {self.curve_of!r}")

    def curve_records(self, edits: int, total: int) -> list[int] | None:
        """Indices of the records a curve point after `edits` edits evaluates (None: all `total`)."""
        count = edits if self.curve_of == "edited" else total
        if self.curve_of == "all" and not self.curve_sample:
            return None
        if self.curve_sample and count > self.curve_sample:  # steps over 1: distinct, increasing
            return [k * count // self.curve_sample for k in range(self.curve_sample)]
        return list(range(count))

    def curve_after(self, k: int) -> bool:
        return bool(self.every) and k % self.every == 0 and k < self.batches  # the last one is the post-edit evaluation

    def general_after(self, k: int) -> bool:
        return k == self.batches or bool(self.general_every) and k % self.general_every == 0


def run_protocol(
    editor: Editor,
    evaluator: Evaluator,
    batch_size: int,
    folder: Path,
    every: int | None = None,
    general: GeneralCheck | None = None,
    general_every: int | None = None,
    on_batch: Callable[[int, dict], None] | None = None,
    pre_cache: PreEvalCache | None = None,
    curve_of: str = "all",
    curve_sample: int | None = None,
) -> ProtocolResult:
    """Run the protocol into `folder`, or continue the run it holds (the editor replayed from its state).

    `on_batch(edits done, latest measurements)` runs after each batch's measurements are committed;
    `pre_cache` serves the pre-edit evaluation when an earlier run computed the same one; `curve_of`
    and `curve_sample`: which records a curve point evaluates (Schedule).
    """
    run = RunFolder(folder)
    requests = [r.request for r in evaluator.records]
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    schedule = Schedule(len(batches), every, general_every, curve_of, curve_sample)
    _check_replayed(editor, batches)
    progress = run.progress()
    if progress is not None:
        progress.setdefault("resumed", []).append(len(editor.batches))
    else:
        if editor.batches:
            raise ValueError(f"{folder}: the state holds batches but progress.json is missing; this is not a run folder eval can resume")
        pre, general_point, reused = _pre_edit(evaluator, general, pre_cache)
        run.write_rows("pre.jsonl", pre.records)
        progress = {"pre": pre.summary, "batches": 0, "curve": [{"edits": 0, **{k: pre.summary[k] for k in SUCCESS_METRICS}}],
                    "norms": [{"edits": 0, **weight_norms(editor)}], "general": [], "pre_reused": reused}
        if general_point is not None:
            point, rows = general_point
            run.write_rows(f"general/{0:06d}.jsonl", rows)
            progress["general"].append(point)
        run.commit(progress)

    def edits_after(k: int) -> int:
        return sum(len(b) for b in batches[:k])

    def missing(k: int) -> list[str]:
        """The measurements due after batch k that progress.json lacks."""
        edits = edits_after(k)
        taken = {kind: {p["edits"] for p in progress[kind]} for kind in ("norms", "curve", "general")}
        due = ["norms", *(["curve"] if schedule.curve_after(k) else []), *(["general"] if general is not None and schedule.general_after(k) else [])]
        return [kind for kind in due if edits not in taken[kind]]

    def measure(k: int) -> None:
        """The measurements after batch k that are missing (the model holds exactly k batches), then commit."""
        edits = edits_after(k)
        todo = missing(k)
        if "norms" in todo:
            progress["norms"].append({"edits": edits, **weight_norms(editor)})
        if "curve" in todo:
            chosen = schedule.curve_records(edits, len(requests))
            evaluator.announce(f"evaluation after {edits} edits" + ("" if chosen is None else f", of {len(chosen)} records"))
            point = summarise(evaluator.scores(indices=chosen))
            # "records": how many the point is a mean over (a grown run marks its earlier points so too)
            of = {} if chosen is None else {"of": schedule.curve_of, "records": len(chosen)}
            progress["curve"].append({"edits": edits, **{m: point[m] for m in SUCCESS_METRICS}, **of})
        if "general" in todo:
            progress["general"].append(_general_point(run, evaluator, general, edits))
        progress["batches"] = k
        run.commit(progress)
        if on_batch is not None:
            on_batch(edits, _latest(editor, progress))

    done = len(editor.batches)
    # killed after the journal took batch `done`, before its measurements; or a run grown to more records,
    # whose last batch now has measurements the shorter run's schedule did not call for (a curve point)
    if done and (progress["batches"] < done or missing(done)):
        measure(done)
    for k in range(done + 1, len(batches) + 1):
        editor.edit(batches[k - 1])
        editor.save_state(run.state)
        measure(k)
    evaluator.announce(f"final evaluation, after {len(requests)} edits")
    post = evaluator.evaluate()
    pre = Evaluation(run.read_rows("pre.jsonl"), progress["pre"])
    curve = [*progress["curve"], {"edits": len(requests), **{m: post.summary[m] for m in SUCCESS_METRICS}}]
    seconds = sum(r.seconds for r in editor.history)
    notes = [f"resumed after batch {k} (editing time counts each batch once)" for k in progress.get("resumed", [])]
    reused = _reused_from(progress.get("pre_reused"))
    if reused is not None:
        which = f" for its first {reused['records']} records" if reused.get("records") else ""
        notes.append(f"pre-edit scores reused from {reused['file']}{which} (the same model, records, settings and scoring code)")
    return ProtocolResult(pre, post, curve, progress["norms"], progress["general"], seconds, notes, monitor(editor))


def grow_pre(folder: Path, evaluator: Evaluator) -> int:
    """The pre-edit scores of the records a grown run (`eval --resume DIR --n M`) added, on the unedited
    model: call it before the journal is replayed. Appends them to pre.jsonl and recomputes the
    pre-edit summary over all records, as an evaluation of all of them would give it (the perplexity,
    the model's own, is kept). Returns how many records it scored."""
    run = RunFolder(folder)
    progress = run.progress()
    if progress is None:
        return 0
    rows = run.read_rows("pre.jsonl")
    start = len(rows)
    if start >= len(evaluator.records):
        return 0
    evaluator.announce(f"pre-edit evaluation of the {len(evaluator.records) - start} records the run grew by")
    rows += evaluator.evaluate(start=start).records
    summary = {**progress["pre"], **summarise(rows)}
    progress["pre"] = summary
    progress["curve"][0] = {"edits": 0, **{k: summary[k] for k in SUCCESS_METRICS}}
    reused = _reused_from(progress.get("pre_reused"))
    if reused is not None:  # the cached scores cover the records the run had before it first grew
        reused.setdefault("records", start)
        progress["pre_reused"] = reused
    for point in progress["curve"][1:]:  # points taken before the run grew are means over the records it had then
        point.setdefault("records", start)
    # the summary first: killed before the rows are written, the next resume scores the new records again
    run.commit(progress)
    run.write_rows("pre.jsonl", rows)
    return len(evaluator.records) - start


def _check_replayed(editor: Editor, batches: list) -> None:
    """A resumed state must hold the first batches of this run, in order (not another dataset's)."""
    for i, applied in enumerate(editor.batches):
        planned = batches[i] if i < len(batches) else []
        if [r.to_dict() for r in applied.requests] != [r.to_dict() for r in planned]:
            raise ValueError(f"batch {i + 1} of the saved state is not batch {i + 1} of this run: the dataset or the "
                             "selection changed since the run started; start a new run with another --out")


def _general_point(run: RunFolder, evaluator: Evaluator, general: GeneralCheck, edits: int) -> dict:
    point, rows = _general_scores(evaluator, general, edits)
    run.write_rows(f"general/{edits:06d}.jsonl", rows)
    return point


def _general_scores(evaluator: Evaluator, general: GeneralCheck, edits: int) -> tuple[dict, list[dict]]:
    with evaluator.phase(GENERAL_PHASE, f"{len(general.tasks)} tasks, {general.tests} records each") as tick:
        scores, rows = general.run(tick)
    return {"edits": edits, "scores": scores}, [{"task": task, **row} for task, task_rows in rows.items() for row in task_rows]


def _pre_edit(evaluator: Evaluator, general: GeneralCheck | None, cache: PreEvalCache | None):
    """The unedited model's evaluation and general check (point, rows): from the cache when it holds
    them, else computed (and stored there). Returns them and {"file": the cache file reused}, or None."""
    key = pre_eval_key(evaluator, general) if cache is not None else None
    stored = cache.load(key) if cache is not None else None
    if stored is not None:
        general_point = (stored["general"], stored["general_rows"]) if general is not None else None
        return Evaluation(stored["records"], stored["summary"]), general_point, {"file": f"{cache.path(key)} (computed {stored['created']})"}
    evaluator.announce("pre-edit evaluation")
    pre = evaluator.evaluate()
    general_point = _general_scores(evaluator, general, 0) if general is not None else None
    if cache is not None:
        cache.store(key, {"records": pre.records, "summary": pre.summary, "general": general_point and general_point[0],
                          "general_rows": general_point and general_point[1]})
    return pre, general_point, None


def _reused_from(value: dict | str | None) -> dict | None:
    """progress.json's "pre_reused": {"file", and "records" once the run grew past them}, or None.
    Runs written before 2026-12-03 kept it as text, "FILE (computed ...)[ for its first N records]"."""
    if not isinstance(value, str):
        return value
    file, _, records = value.partition(" for its first ")
    return {"file": file, "records": int(records.split()[0])} if records else {"file": file}


def _latest(editor: Editor, progress: dict) -> dict:
    """What a progress line shows: the last batch's own efficacy probe and the newest measurements."""
    report = editor.history[-1]
    latest = {"batch efficacy": None if report.efficacy is None else 100 * report.efficacy, "s/edit": report.seconds / max(1, report.requests)}
    if report.earlier_held is not None:  # rehearsal's check: how many earlier edits still held before the batch
        latest.update({"earlier edits held": 100 * report.earlier_held, "rehearsed": report.rehearsed})
    if report.rewrites_counted:  # of the last rehearsing batch's re-writes (rehearsal.outlook)
        latest["re-writes held"] = 100 * (1 - report.rewrites_lapsed / report.rewrites_counted)
    if len(progress["curve"]) > 1:
        latest.update({k: progress["curve"][-1][k] for k in ("efficacy", "specificity")})
    if progress["general"]:
        latest["general F1"] = 100 * mean_f1(progress["general"][-1]["scores"])
    return latest
