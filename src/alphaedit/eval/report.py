"""Evaluation reports: per-record JSONL, summary JSON, a Markdown table and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write_text
from ..plots import figure
from .general import mean_f1
from .evaluator import CHAT_METRICS, JUDGED_METRICS, SUCCESS_METRICS
from .protocol import ProtocolResult

TABLE_METRICS = ("efficacy", "generalization", "specificity", "fluency", "consistency", "generative_success", "perplexity")


def write_report(result: ProtocolResult, out: Path, meta: dict) -> dict:
    """Write every report file into `out`; returns the summary (also summary.json)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"case_id": pre["case_id"], "pre": _without_id(pre), "post": _without_id(post)})
        for pre, post in zip(result.pre.records, result.post.records)
    ]
    atomic_write_text(out / "records.jsonl", "\n".join(lines) + "\n")
    summary = {
        **meta,
        "pre": result.pre.summary,
        "post": result.post.summary,
        "seconds_editing": result.seconds_editing,
        "seconds_per_edit": result.seconds_editing / max(1, meta.get("n", 1)),
        "curve": result.curve,
        "norms": result.norms,
        "general": result.general,
        "monitor": result.monitor,
        "notes": result.notes,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "summary.md", markdown_table(summary))
    plot_curves(result, out / "metrics_vs_edits.png")
    plot_norms(result, out / "weight_norms.png")
    if result.monitor:
        plot_growth(result, out / "norm_growth.png")
    if any(p.get("earlier_held") is not None for p in result.monitor):
        plot_rehearsal(result, out / "rehearsal.png")
    if result.general:
        for key, name in (("f1_label", "most probable label"), ("f1", "generated answer")):
            plot_general(result, key, name, out / f"general_{key}.png")
    return summary


# every file write_report may write
REPORT_FILES = ("records.jsonl", "summary.md", "metrics_vs_edits.png", "weight_norms.png", "norm_growth.png", "rehearsal.png", "general_f1.png",
                "general_f1_label.png", "summary.json")  # summary.json last: while it is in place, the move is not finished


def keep_earlier_report(folder: Path, records: int) -> Path | None:
    """A finished run grown to more records keeps the report it had in `at-N-edits/` (N: its records),
    so the new report does not overwrite it. Idempotent (a kill midway is finished by the next call).
    Returns the folder, or None when there is no earlier report."""
    folder = Path(folder)
    summary = folder / "summary.json"
    if not summary.exists():
        return None
    n = json.loads(summary.read_text(encoding="utf-8"))["n"]
    if n == records:
        return None
    kept = folder / f"at-{n}-edits"
    kept.mkdir(exist_ok=True)
    for name in REPORT_FILES:
        if (folder / name).exists():
            (folder / name).replace(kept / name)
    return kept


def _without_id(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "case_id"}


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown_table(summary: dict) -> str:
    # the generation-based metrics when the run measured them (--chat-eval)
    metrics = TABLE_METRICS + tuple(m for m in (*CHAT_METRICS, *JUDGED_METRICS) if summary["post"].get(m) is not None)
    head = f"| | {' | '.join(metrics)} |\n|---|{'---|' * len(metrics)}\n"
    rows = "".join(
        f"| {label} | {' | '.join(_cell(summary[block].get(m)) for m in metrics)} |\n"
        for label, block in (("pre-edit", "pre"), (summary.get("method_label") or summary.get("method", "post-edit"), "post"))
    )
    setting = (
        f"{summary.get('model')} on {summary.get('dataset')}: {summary.get('n')} edits in sequential batches of "
        f"{summary.get('batch_size')} ({summary.get('method_label') or summary.get('method')})."
    )
    if summary.get("z_steps_cap") is not None:
        setting += (
            f" z optimisation: preset {summary.get('preset')}, v_lr {summary.get('v_lr')}, stop rule {summary.get('stop_rule')} "
            f"< {summary.get('stop_threshold')}, clamp {summary.get('clamp')}, at most {summary.get('z_steps_cap')} steps"
            f"{_templates(summary.get('context_template_words'))}"
            f"{f', {n} reworded prompts' if (n := summary.get('reworded_prompts')) else ''}; {summary.get('mean_z_steps', 0):.1f} "
            f"steps per request on average; {summary.get('seconds_per_edit', 0):.2f} s per edit."
        )
    setting += "\n\n"
    notes = "".join(f"\n- {note}" for note in summary.get("notes", []))
    return setting + head + rows + curve_table(summary.get("curve", [])) + general_tables(summary.get("general", [])) + (
        "\nNotes:" + notes + "\n" if notes else "")


def _templates(words: list[str] | None) -> str:
    """The context-template prefixes, for the report's setting line (runs before the field: nothing)."""
    if words is None:
        return ""
    return f", context templates from {'/'.join(words)}" if words else ", no context templates"


def curve_table(points: list[dict]) -> str:
    """The editing metrics at every evaluation (--every), when there were any between the first and the last."""
    if len(points) < 3:
        return ""
    text = "\nAgainst the number of edits (records: how many a point is a mean over, where not all):\n\n"
    text += f"| edits | {' | '.join(SUCCESS_METRICS)} | records |\n|---|{'---|' * (len(SUCCESS_METRICS) + 1)}\n"
    for point in points:
        records = f"{point['records']}" + (" edited" if point.get("of") == "edited" else "") if "records" in point else "all"
        text += f"| {point['edits']} | {' | '.join(_cell(point.get(m)) for m in SUCCESS_METRICS)} | {records} |\n"
    return text


def general_tables(points: list[dict]) -> str:
    """The six tasks' weighted F1 (×100) at each check: of the most probable label, and of the generated answer."""
    if not points:
        return ""
    tasks = list(points[0]["scores"])
    text = ""
    for key, name in (("f1_label", "F1 of the most probable label"), ("f1", "F1 of the generated answer (invalid answers in brackets)")):
        text += f"\nGeneral capability, {name}:\n\n| edits | {' | '.join(tasks)} | mean |\n|---|{'---|' * (len(tasks) + 1)}\n"
        for point in points:
            scores = point["scores"]
            cells = [f"{100 * scores[t][key]:.1f}" + (f" ({scores[t]['invalid']})" if key == "f1" else "") for t in tasks]
            text += f"| {point['edits']} | {' | '.join(cells)} | {100 * mean_f1(scores, key):.1f} |\n"
    return text


def plot_curves(result: ProtocolResult, path: Path) -> None:
    edits = [p["edits"] for p in result.curve]
    edited = any(p.get("of") == "edited" for p in result.curve)
    title = "metrics against number of edits" + (" (points between: the records edited so far)" if edited else "")
    with figure(path, title, "number of edits", "score (%)") as ax:
        for metric in SUCCESS_METRICS:
            ax.plot(edits, [p[metric] for p in result.curve], marker="o", label=metric)
        ax.set_ylim(0, 100)


def plot_general(result: ProtocolResult, key: str, name: str, path: Path) -> None:
    edits = [p["edits"] for p in result.general]
    with figure(path, f"general capability: F1 of the {name}", "number of edits", "weighted F1 (%)") as ax:
        for task in result.general[0]["scores"]:
            ax.plot(edits, [100 * p["scores"][task][key] for p in result.general], marker="o", label=task)
        ax.set_ylim(0, 100)


def plot_norms(result: ProtocolResult, path: Path) -> None:
    edits = [p["edits"] for p in result.norms]
    with figure(path, "norm of each edited matrix", "number of edits", "‖W_out‖_F") as ax:
        for layer in [k for k in result.norms[0] if k != "edits"]:
            ax.plot(edits, [p[layer] for p in result.norms], marker=".", label=f"layer {layer}")


def plot_growth(result: ProtocolResult, path: Path) -> None:
    """Each edited matrix against its base (Frobenius, solid; spectral, dashed) and the target
    values' mean relative shift, per batch: what grows before a long sequence collapses."""
    edits = [p["edits"] for p in result.monitor]
    with figure(path, "edited W_out against the base; target values", "number of edits", "ratio") as ax:
        for layer in result.monitor[0]["weight_growth"]:
            for kind, style in (("frobenius", "-"), ("spectral", "--")):
                ax.plot(edits, [p["weight_growth"][layer][kind] for p in result.monitor], style, label=f"layer {layer} {kind}")
        ax.plot(edits, [p["value_shift"] for p in result.monitor], ":", marker=".", color="black", label="mean ‖δ‖/‖h0‖")


def plot_rehearsal(result: ProtocolResult, path: Path) -> None:
    """Per rehearsal check, against the edits before it: the earlier edits that still held and the
    share of the last rehearsing batch's re-writes that held (%, left), and how many re-writes the
    batch after it wrote (right). Re-writes that keep lapsing again are how rehearsal gives out
    (rehearsal.py)."""
    points = [p for p in result.monitor if p.get("earlier_held") is not None]
    at = [p["checked_at"] for p in points]
    with figure(path, "rehearsal: what held at each check, and what was written again", "number of edits", "held (%)") as ax:
        ax.plot(at, [100 * p["earlier_held"] for p in points], marker=".", label="earlier edits held")
        again = [(a, 100 * (1 - p["rewrites_lapsed"] / p["rewrites_counted"])) for a, p in zip(at, points) if p.get("rewrites_counted")]
        if again:
            ax.plot(*zip(*again), marker=".", label="the last re-writes held")
        ax.set_ylim(0, 100)
        right = ax.twinx()
        line = right.plot(at, [p["rehearsed"] for p in points], color="black", linestyle="--")[0]
        right.set(ylabel="re-writes", ylim=(0, None))
        # one legend: figure() draws the left axes' (a proxy line stands in for the right one's)
        ax.plot([], [], color=line.get_color(), linestyle="--", label="re-writes in the batch (right)")
