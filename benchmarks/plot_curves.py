"""Curves of one or more `alphaedit eval` runs side by side, finished or not: each run's curve
points (--every), the six tasks' mean F1 (--general-every) and the last edited layer's growth,
read from the run folder's summary.json once the run has finished (its curve ends with the final
evaluation over every edited record) or else from progress.json (written as the run goes, so a run
cut short plots too).

    python benchmarks/plot_curves.py RUN [RUN ...] --out figure.png [--label NAME ...] [--title TEXT]

One PNG of six panels: Eff, Gen, Spe and generative success at the curve points, the general
check, and the weight growth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alphaedit.eval.general import mean_f1

PANELS = (("efficacy", "Eff"), ("generalization", "Gen"), ("specificity", "Spe"), ("generative_success", "gen. success"))


def series(folder: Path) -> dict:
    finished = folder / "summary.json"  # the same keys as progress.json, and the final point on the curve
    progress = json.loads((finished if finished.exists() else folder / "progress.json").read_text(encoding="utf-8"))
    general = [(g["edits"], 100 * mean_f1(g["scores"])) for g in progress.get("general", [])]
    norms = progress.get("norms", [])
    growth = []
    if norms:
        last = max(norms[0], key=lambda layer: int(layer) if layer != "edits" else -1)  # the block's last layer grows most
        growth = [(n["edits"], n[last] / norms[0][last]) for n in norms]
    return {"curve": progress.get("curve", []), "general": general, "growth": growth, "layer": last if norms else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label", action="append", help="a name per run (default: the folder's)")
    parser.add_argument("--title", default="sequential edits")
    a = parser.parse_args()
    labels = a.label or [run.name for run in a.runs]
    if len(labels) != len(a.runs):
        parser.error("give one --label per run")
    data = [series(run) for run in a.runs]
    from matplotlib.figure import Figure  # the object API, as alphaedit.plots: no global pyplot state

    fig = Figure(figsize=(13, 7))
    axes = list(fig.subplots(2, 3).flat)
    of = " of the records edited so far" if any(p.get("of") == "edited" for d in data for p in d["curve"]) else ""
    for ax, (key, name) in zip(axes, PANELS):
        for label, d in zip(labels, data):
            points = [p for p in d["curve"] if p.get(key) is not None]
            ax.plot([p["edits"] for p in points], [p[key] for p in points], marker="o", label=label)
        ax.set(title=f"{name}{of}", xlabel="edits", ylabel="%")
    ax = axes[4]
    for label, d in zip(labels, data):
        ax.plot(*zip(*d["general"]), marker="o", label=label)
    ax.set(title="six tasks: mean F1 of the most probable label", xlabel="edits", ylabel="%")
    ax = axes[5]
    layers = sorted({d["layer"] for d in data if d["layer"] is not None})
    for label, d in zip(labels, data):
        ax.plot(*zip(*d["growth"]), label=label)
    ax.set(title="growth of the last edited W_out" + (f" (layer {layers[0]})" if len(layers) == 1 else ""),
           xlabel="edits", ylabel="‖W‖_F / ‖W₀‖_F")
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    # one legend for all six panels, under them: per panel, six runs' labels hid the curves
    names = labels if len(layers) <= 1 else [f"{label} (last layer {d['layer']})" for label, d in zip(labels, data)]
    columns = min(len(names), 3 if max(map(len, names)) <= 45 else 2)  # long names: two columns fit the width
    fig.legend(axes[0].get_lines(), names, loc="lower center", ncol=columns, fontsize=9)
    fig.suptitle(a.title)
    rows = -(-len(names) // columns)  # the legend's rows, each about 3% of the figure's height
    fig.tight_layout(rect=(0, 0.035 * rows + 0.01, 1, 1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, format="png", dpi=90)
    print(a.out)


if __name__ == "__main__":
    main()
