"""Commands on a state folder: `log` lists its batches, `revert` undoes one, `export` writes the
edited model or its updates, `apply` replays it onto a fresh base model, `recover` rebuilds a lost
journal.json."""

from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.table import Table

from ..journal import Journal, JournalError
from ..locks import journal_write_lock
from .common import (
    DeviceOption, DtypeOption, JsonOption, TrustOption, _base_model, _claimed, _dtype_for, _fail, _load, _open_journal, _print_whole,
    _replay, app, out,
)


@app.command()
def log(
    state: Annotated[Path, typer.Option("--state", "-s", help="State folder (journal) to list.")],
    as_json: JsonOption = False,
) -> None:
    """List the journal's batches: id, time, requests (and the earlier ones rehearsed with them),
    efficacy, norm of each layer's update, how far the edited matrices and the target values have
    grown (monitoring for long sequences) and, with rehearsal, what its check before the batch found.
    --json gives every field of every report."""
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
    checked = any(b.get("earlier_held") is not None for b in batches)  # a rehearsing journal
    for column in ("id", "started (UTC)", "requests", "efficacy", *[f"‖Δ{l}‖" for l in layers], "‖W‖/‖W₀‖ F", "σmax/σmax₀",
                   "‖δ‖/‖h‖", *(["rehearsal check"] if checked else []), "status"):
        table.add_column(column, justify="right")
    for b in batches:
        efficacy = "-" if b["efficacy"] is None else f"{100 * b['efficacy']:.0f}%"
        norms = [f"{b['delta_norms'][str(l)]:.2f}" for l in layers]
        growth = b.get("weight_growth") or {}
        largest = [f"{max(g[k] for g in growth.values()):.3f}" if growth else "-" for k in ("frobenius", "spectral")]
        shift = "-" if b.get("value_shift") is None else f"{b['value_shift']:.2f}"
        requests = f"{b['requests']} +{b['rehearsed']} rehearsed" if b.get("rehearsed") else str(b["requests"])
        check = []
        if checked:  # the earlier edits that held, and of the last rehearsing batch's re-writes (rehearsal.outlook)
            check = ["-" if b.get("earlier_held") is None else f"{100 * b['earlier_held']:.1f}% held"]
            if b.get("rewrites_counted"):
                check[0] += f", {b['rewrites_counted'] - b.get('rewrites_lapsed', 0)} of {b['rewrites_counted']} re-writes"
        table.add_row(str(b["id"]), b["started"].replace("+00:00", ""), requests, efficacy, *norms, *largest, shift, *check,
                      "reverted" if b["reverted"] else "applied")
    _print_whole(table)


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
    journal = _open_journal(state)  # a missing or damaged state is refused before anything is created
    # not while a running edit, eval or serve holds the state
    with _claimed(state, "alphaedit revert"), journal_write_lock(state):
        if not journal.unchanged_on_disk():  # written by another process before the claim
            journal = _open_journal(state)
        try:
            journal.append_revert(batch, datetime.now(timezone.utc).isoformat(timespec="seconds"))
        except JournalError as e:
            _fail(str(e))
    later = [b for b in journal.applied_batch_ids() if b > batch]
    note = f"; batches {later} were computed with it applied and stay as they are" if later else ""
    out.print(f"batch {batch} reverted{note}")


@app.command()
def export(
    state: Annotated[Path, typer.Option("--state", "-s", help="State folder (journal).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="New folder (or file, with --deltas-only) to write.")],
    deltas_only: Annotated[bool, typer.Option(help="Write only the updates: low-rank factors per layer, one small safetensors file.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out (a deltas file, or a folder of save_pretrained's files only).")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="The base model, where the state does not name it (saved from Python without model_spec).")] = None,
    device: DeviceOption = "auto",
    trust_remote_code: TrustOption = False,
) -> None:
    """Write the edited model (save_pretrained: plain transformers loads it) or just its updates."""

    header = _open_journal(state).header
    _check_export_target(out_dir, deltas_only, force)  # before the model loads: a refusal costs nothing
    lm, tokenizer = _load(_base_model(state, header, model), header["dtype"], device, trust_remote_code)
    editor = _replay(state, lm, tokenizer)
    with _writing(out_dir):
        written = editor.export_deltas(out_dir) if deltas_only else editor.export(out_dir, overwrite=force)
    out.print(f"wrote {written}")


@contextmanager
def _writing(target: Path) -> Iterator[None]:
    """A target that cannot be written (a file where a folder must be, no permission, a full
    disk) is one line naming it; the export wrote nothing there (it writes aside, then renames)."""
    try:
        yield
    except OSError as e:
        _fail(f"--out {target}: cannot write there ({e.strerror or e}); choose another path")


def _check_export_target(target: Path, deltas_only: bool, force: bool) -> None:
    """An export never overwrites what is there unless --force says so, and never deletes a
    folder that does not hold a saved model (a mistyped --out must not cost the user a folder)."""
    from ..persistence import check_deltas_file, check_export_folder

    try:
        (check_deltas_file if deltas_only else check_export_folder)(target, overwrite=force)
    except FileExistsError as e:
        _fail(f"--out {e}")


@app.command()
def recover(
    state: Annotated[Path, typer.Option("--state", "-s", help="A state folder whose journal.json was lost or damaged.")],
) -> None:
    """Rebuild a lost or damaged journal.json from the state's header.json, batch manifests and revert files."""
    if not state.is_dir():
        _fail(f"--state {state}: no such folder; give the state folder whose journal.json was lost")
    with _claimed(state, "alphaedit recover"), journal_write_lock(state):
        try:
            journal = Journal.recover(state)
        except JournalError as e:
            _fail(str(e))
    batches, reverts = journal.batch_ids(), sorted(journal.reverted())
    out.print(f"rebuilt {state / 'journal.json'}: {len(batches)} batches, {len(reverts)} reverted {reverts if reverts else ''}".rstrip(),
              soft_wrap=True, highlight=False)
    if journal.damaged_index is not None:
        out.print(f"the damaged one is kept as {journal.damaged_index}", soft_wrap=True, highlight=False)


@app.command()
def apply(
    state: Annotated[Path, typer.Option("--state", "-s", help="State folder (journal) to replay.")],
    model: Annotated[str, typer.Option("--model", "-m", help="A fresh copy of the base model (id or folder); refused if its identity differs.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="New folder for the edited model.")],
    force: Annotated[bool, typer.Option("--force", help="Replace a model saved in --out before (a folder of save_pretrained's files only).")] = False,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    trust_remote_code: TrustOption = False,
) -> None:
    """Replay the journal onto a fresh copy of the base model and save the result."""

    header = _open_journal(state).header
    _check_export_target(out_dir, False, force)
    lm, tokenizer = _load(model, _dtype_for(header, dtype), device, trust_remote_code)
    editor = _replay(state, lm, tokenizer)
    with _writing(out_dir):
        written = editor.export(out_dir, overwrite=force)
    out.print(f"replayed {len(editor.batches)} batches; wrote {written}")
