"""A run's curve points as the rows of BENCHMARKS.md's long-run tables, finished or not: what was
edited still holding (Eff, Gen, Spe, generative success over the curve's records), what the batches
since the previous point wrote of their own edits and how many z steps they took, the six tasks,
the growth of the first and last edited W_out, and, for a run with rehearsal, how much of the
earlier edits held before a batch, how many were written again, and how many of the re-writes held
to the next check (pooled over the checks of the batches since the previous point, each about the
re-writes of the rehearsing batch before it), and rehearsal's outlook at the point, f / κ pooled
over the latest 150 re-writes or more (alphaedit.rehearsal.outlook), κ split into the batches' own
misses and the earlier edits knocked out; journals of older code count neither.

    python benchmarks/curve_rows.py RUN [--json] [--pool N]

Reads RUN/summary.json (a finished run: its curve ends with the final evaluation) or else
RUN/progress.json, and the batch reports under RUN/state/batches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from alphaedit.eval.general import mean_f1
from alphaedit.journal import Journal
from alphaedit.rehearsal import OUTLOOK_REWRITES, outlook


def _progress(run: Path) -> dict:
    finished = run / "summary.json"
    return json.loads((finished if finished.exists() else run / "progress.json").read_text(encoding="utf-8"))


def _reports(run: Path) -> list[tuple[int, dict]]:
    """(edits made once the batch was applied, its report), in the journal's order: committed batches
    only (a killed run may leave a batch folder it never committed), reverted ones left out."""
    journal = Journal.open(run / "state")
    out, edits = [], 0
    for batch_id in journal.applied_batch_ids():
        report = journal.batch(batch_id).report
        edits += report["requests"]
        out.append((edits, report))
    return out


def _mean(pairs: list[tuple[float, float]]) -> float | None:
    """Weighted mean of (value, weight) pairs."""
    weight = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / weight if weight else None


def _applied(reports: list[dict]) -> list[SimpleNamespace]:
    """Report dicts as the applied batches rehearsal.outlook reads (the counts 0 or None where a
    journal of older code has none)."""
    fields = {"requests": 0, "rehearsed": 0, "efficacy": None, "earlier_held": None, "earlier_lapsed": None,
              "rewrites_counted": 0, "rewrites_lapsed": 0}
    return [SimpleNamespace(report=SimpleNamespace(**{k: r.get(k, d) for k, d in fields.items()}), reverted=False) for r in reports]


def rows(run: Path, pool: int = OUTLOOK_REWRITES) -> list[dict]:
    progress, reports = _progress(run), _reports(run)
    general = {g["edits"]: g["scores"] for g in progress.get("general", [])}
    layers = sorted({layer for _, r in reports for layer in r.get("weight_growth", {})}, key=int)
    out, previous = [], 0
    for point in progress.get("curve", []):
        edits = point["edits"]
        row = {k: point.get(k) for k in ("edits", "efficacy", "generalization", "specificity", "generative_success")}
        since = [r for e, r in reports if previous < e <= edits]
        # the batches' own efficacy and z steps: per request, over the batches since the last point
        row["batch_efficacy"] = _mean([(100 * r["efficacy"], r["requests"]) for r in since if r.get("efficacy") is not None])
        row["z_steps"] = _mean([(r["z_steps"], r["requests"]) for r in since if r.get("z_steps") is not None])
        scores = general.get(edits)
        row["general_label"] = 100 * mean_f1(scores) if scores else None
        row["general_generated"] = 100 * mean_f1(scores, "f1") if scores else None
        last = next((r for e, r in reports if e == edits), None)
        growth = (last or {}).get("weight_growth", {})
        for name, layer in (("last", layers[-1] if layers else None), ("first", layers[0] if layers else None)):
            row[f"{name}_layer"] = layer
            row[f"{name}_frobenius"] = growth.get(layer, {}).get("frobenius")
            row[f"{name}_spectral"] = growth.get(layer, {}).get("spectral")
        # per batch that checked the earlier edits (none before the first batch, none without rehearsal)
        rehearsed = [r.get("rehearsed", 0) for r in since if r.get("earlier_held") is not None]
        row["earlier_held"] = 100 * last["earlier_held"] if last and last.get("earlier_held") is not None else None
        row["rehearsed_mean"] = sum(rehearsed) / len(rehearsed) if rehearsed else None
        row["rehearsed_most"] = max(rehearsed) if rehearsed else None
        counted = sum(r.get("rewrites_counted", 0) for r in since)
        row["rewrites_held"] = 100 * (1 - sum(r.get("rewrites_lapsed", 0) for r in since) / counted) if counted else None
        seen = outlook(_applied([r for e, r in reports if e <= edits]), at_least=pool)
        row["f"], row["kappa"] = (seen.f, seen.kappa) if seen else (None, None)
        row["kappa_own"], row["kappa_knocked_out"] = (seen.own_missed, seen.knocked_out) if seen else (None, None)
        out.append(row)
        previous = edits
    return out


def _cell(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _outlook_cell(row: dict) -> str:
    if row["f"] is None:
        return ""
    split = f" ({row['kappa_own']:.2f} + {row['kappa_knocked_out']:.2f})" if row["kappa_own"] is not None else ""
    return f"{row['f']:.2f} / {row['kappa']:.2f}{split}"


def table(found: list[dict]) -> str:
    last = next((r["last_layer"] for r in found if r["last_layer"]), "?")
    first = next((r["first_layer"] for r in found if r["first_layer"]), "?")
    head = ["edits", "Eff", "Gen", "Spe", "gen. success", "batches' own Eff", "z steps", "general F1 label / generated",
            f"‖W{last}‖/‖W{last}⁰‖ F / spectral", f"‖W{first}‖/‖W{first}⁰‖", "earlier held", "rehearsed (mean / most)", "re-writes held",
            "f / κ (own misses + knocked out)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in found:
        general = f"{_cell(r['general_label'])} / {_cell(r['general_generated'])}" if r["general_label"] is not None else ""
        growth = f"{_cell(r['last_frobenius'], 3)} / {_cell(r['last_spectral'], 3)}" if r["last_frobenius"] is not None else ""
        rehearsed = f"{_cell(r['rehearsed_mean'])} / {r['rehearsed_most']}" if r["rehearsed_mean"] is not None else ""
        cells = [_cell(r["edits"]), _cell(r["efficacy"]), _cell(r["generalization"]), _cell(r["specificity"]),
                 _cell(r["generative_success"]), _cell(r["batch_efficacy"]), _cell(r["z_steps"]), general, growth,
                 _cell(r["first_frobenius"], 3), _cell(r["earlier_held"]), rehearsed, _cell(r["rewrites_held"]),
                 _outlook_cell(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--json", action="store_true", help="the rows as JSON, nothing else")
    parser.add_argument("--pool", type=int, default=OUTLOOK_REWRITES, help="re-writes the outlook pools at least (default: alphaedit's)")
    a = parser.parse_args()
    if not (a.run / "progress.json").exists() and not (a.run / "summary.json").exists():
        parser.error(f"{a.run} holds neither summary.json nor progress.json: not an `alphaedit eval` run folder")
    found = rows(a.run, a.pool)
    print(json.dumps(found, indent=1) if a.json else table(found))


if __name__ == "__main__":
    main()
