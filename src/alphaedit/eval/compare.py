"""Several `alphaedit eval` reports side by side: one table and a few plots (the paper's Table 1,
its plug-in table of §4.5 and its Fig. 4, from this project's runs).

Runs are grouped by what they edited (model, dataset, number of records); a group's runs share
its pre-edit row. A method run both without and with the projection gets a third row, what the
projection changed (the paper's "+AlphaEdit" gain). Unfinished runs are listed with how far they
got, from their progress.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..plots import figure
from .general import mean_f1

# (summary key, column): the post-edit metrics, ×100 as reported (fluency ≈ 600 for fluent text)
METRICS = (("efficacy", "Eff"), ("generalization", "Gen"), ("specificity", "Spe"), ("fluency", "Flu"), ("consistency", "Consis"),
           ("generative_success", "gen. success"), ("perplexity", "ppl"))
# and, from the run's other measurements
EXTRA = (("general_f1_label", "general F1 (label)"), ("general_f1", "general F1 (generated)"),
         ("weight_growth", "‖W‖/‖W₀‖ (largest)"), ("seconds_per_edit", "s/edit"))
COLUMNS = METRICS + EXTRA


@dataclass
class Group:
    model: str
    dataset: str
    n: int
    pre: dict[str, float | None]
    runs: list[dict] = field(default_factory=list)  # {"path", "label", "method", "projected", "metrics", "summary"}
    notes: list[str] = field(default_factory=list)

    def projection_gains(self) -> list[dict]:
        """For each method run both without and with the projection: with minus without, per column."""
        gains = []
        for run in self.runs:
            if not run["projected"]:
                continue
            plain = next((r for r in self.runs if r["method"] == run["method"] and not r["projected"]), None)
            if plain is not None:
                gains.append({"method": run["method"], "metrics": {key: _minus(run["metrics"][key], plain["metrics"][key]) for key, _ in COLUMNS}})
        return gains


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def row_metrics(summary: dict, block: str) -> dict[str, float | None]:
    """A report's numbers for one row: block "post" (after the last batch) or "pre" (before the first)."""
    metrics = {key: summary[block].get(key) for key, _ in METRICS}
    general = summary.get("general") or []
    point = (general[-1] if general and general[-1]["edits"] == summary["n"] else None) if block == "post" else \
        (general[0] if general and general[0]["edits"] == 0 else None)
    metrics["general_f1_label"] = None if point is None else 100 * mean_f1(point["scores"], "f1_label")
    metrics["general_f1"] = None if point is None else 100 * mean_f1(point["scores"], "f1")
    monitor = summary.get("monitor") or []
    if block == "post":
        growth = monitor[-1]["weight_growth"] if monitor and monitor[-1].get("weight_growth") else None
        metrics["weight_growth"] = None if growth is None else max(g["frobenius"] for g in growth.values())
        metrics["seconds_per_edit"] = summary.get("seconds_per_edit")
    else:
        metrics["weight_growth"], metrics["seconds_per_edit"] = (1.0 if monitor else None), None
    return metrics


def load_runs(paths: list[Path]) -> tuple[list[Group], list[str]]:
    """The finished runs among `paths`, grouped; and a line for each unfinished one (how far it got).
    A folder that is not a run at all is an error naming it."""
    groups: dict[tuple, Group] = {}
    unfinished = []
    for path in paths:
        path = Path(path)
        summary_file = path / "summary.json"
        if not summary_file.exists():
            if not (path / "run.json").exists():
                raise ValueError(f"{path}: no summary.json or run.json there; give report folders of `alphaedit eval` (its --out)")
            args = json.loads((path / "run.json").read_text(encoding="utf-8"))["args"]
            progress = path / "progress.json"
            done = json.loads(progress.read_text(encoding="utf-8"))["batches"] if progress.exists() else None
            where = "in its pre-edit evaluation" if done is None else f"{done} of {-(-args['n'] // args['batch_size'])} batches done"
            unfinished.append(f"{path}: not finished ({where}; continue it with `alphaedit eval --resume {path}`)")
            continue
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        key = (summary["model"], summary["dataset"], summary["n"])
        pre = row_metrics(summary, "pre")
        group = groups.setdefault(key, Group(*key, pre=pre))
        differs = [k for k, v in pre.items() if v is not None and group.pre[k] is not None and abs(v - group.pre[k]) > 0.05]
        if differs:  # the same records, the same model: only other evaluation settings or scoring code can do this
            group.notes.append(f"{path}: its pre-edit {', '.join(differs)} differ from the group's first run's (other evaluation settings?)")
        group.runs.append({"path": str(path), "label": summary.get("method_label") or summary["method"], "method": summary["method"],
                           "projected": bool(summary.get("projected")), "metrics": row_metrics(summary, "post"), "summary": summary})
    return list(groups.values()), unfinished


def _cell(key: str, value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    digits = 3 if key == "weight_growth" else 2 if key == "seconds_per_edit" else 1
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(groups: list[Group], unfinished: list[str]) -> str:
    text = ""
    for group in groups:
        text += (f"{group.model} on {group.dataset}, {group.n} edits\n\n| run | {' | '.join(name for _, name in COLUMNS)} |\n"
                 f"|---|{'---|' * len(COLUMNS)}\n")
        text += f"| pre-edit | {' | '.join(_cell(k, group.pre[k]) for k, _ in COLUMNS)} |\n"
        for run in group.runs:
            text += f"| {run['label']} | {' | '.join(_cell(k, run['metrics'][k]) for k, _ in COLUMNS)} |\n"
        for gain in group.projection_gains():
            text += f"| *{gain['method']}: projection's change* | {' | '.join(_cell(k, gain['metrics'][k], signed=True) for k, _ in COLUMNS)} |\n"
        text += "".join(f"\n- {note}" for note in group.notes) + "\n\n"
    if unfinished:
        text += "Not finished:\n" + "".join(f"\n- {line}" for line in unfinished) + "\n"
    return text


def as_json(groups: list[Group], unfinished: list[str]) -> dict:
    return {"groups": [{"model": g.model, "dataset": g.dataset, "n": g.n, "pre": g.pre,
                        "runs": [{k: v for k, v in r.items() if k != "summary"} for r in g.runs],
                        "projection_gains": g.projection_gains(), "notes": g.notes} for g in groups],
            "unfinished": unfinished}


def plot(groups: list[Group], folder: Path) -> list[Path]:
    """Per group: the general check's mean F1 (label, generated) and the largest ‖W‖/‖W₀‖ against
    the number of edits, a line per run. Returns the files written."""
    written = []
    for i, group in enumerate(groups):
        stem = f"group{i + 1}-" if len(groups) > 1 else ""
        title = f"{group.model}, {group.n} edits"
        for key, name in (("f1_label", "most probable label"), ("f1", "generated answer")):
            runs = [r for r in group.runs if r["summary"].get("general")]
            if not runs:
                continue
            path = folder / f"{stem}general_{key}.png"
            with figure(path, f"{title}: general F1 of the {name}", "number of edits", "mean weighted F1 (%)") as ax:
                for run in runs:
                    points = run["summary"]["general"]
                    ax.plot([p["edits"] for p in points], [100 * mean_f1(p["scores"], key) for p in points], marker="o", label=run["label"])
            written.append(path)
        runs = [r for r in group.runs if r["summary"].get("monitor")]
        if runs:
            path = folder / f"{stem}weight_growth.png"
            with figure(path, f"{title}: the most grown edited W_out", "number of edits", "‖W‖/‖W₀‖ (Frobenius, largest layer)") as ax:
                for run in runs:
                    points = [p for p in run["summary"]["monitor"] if p.get("weight_growth")]
                    ax.plot([0] + [p["edits"] for p in points], [1.0] + [max(g["frobenius"] for g in p["weight_growth"].values()) for p in points],
                            marker=".", label=run["label"])
            written.append(path)
    return written
