"""Faults and careless input that must never cost the user data (issue 17, data loss)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from alphaedit.cli import app
from alphaedit.journal import INDEX, Journal
from alphaedit.stats import CorpusSpec, StatsCache, second_moments
from conftest import WIKITEXT
from test_journal import _cli_state, edited  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- 1. a state whose journal.json is lost ---------------------------------------------------------


def test_edit_refuses_a_state_with_batches_but_no_journal_and_changes_nothing(edited, tmp_path):
    state = tmp_path / "state"
    (state / INDEX).unlink()
    before = _tree(state)
    requests = tmp_path / "more.jsonl"
    requests.write_text(json.dumps({"prompt": "{} is in", "subject": "X", "target_new": "Y"}))
    result = runner.invoke(app, ["edit", "--model", "no-such-model", "--requests", str(requests), "--state", str(state)])
    assert result.exit_code == 2
    assert "no journal.json" in result.output and "alphaedit recover" in result.output
    assert _tree(state) == before  # the batches are still there, untouched
    with pytest.raises(Exception, match="damaged"):
        edited.save_state(state)  # the library refuses too: Journal.create never deletes batches
    assert _tree(state) == before


def test_recover_rebuilds_the_lost_journal_with_its_reverts(edited, llama, tokenizer, tmp_path):
    state = tmp_path / "state"
    edited.edit(edited.batches[0].requests)  # a third batch ...
    edited.revert(1)  # ... after which batch 1 is reverted ...
    edited.edit(edited.batches[1].requests)  # ... and a fourth comes after the revert
    edited.save_state(state)
    original = json.loads((state / INDEX).read_text())
    (state / INDEX).unlink()

    result = runner.invoke(app, ["recover", "--state", str(state)])
    assert result.exit_code == 0, result.output
    assert json.loads((state / INDEX).read_text()) == original
    assert "4 batches, 1 reverted [1]" in result.output

    again = runner.invoke(app, ["recover", "--state", str(state)])
    assert again.exit_code == 2 and "nothing to recover" in again.output


def test_recover_refuses_a_tampered_batch_and_a_gap(edited, tmp_path):
    state = tmp_path / "state"
    (state / INDEX).unlink()
    update = state / "batches" / "000001" / "update.safetensors"
    update.write_bytes(update.read_bytes()[:-8])
    result = runner.invoke(app, ["recover", "--state", str(state)])
    assert result.exit_code == 2 and "batch 1" in result.output and "manifest" in result.output
    assert not (state / INDEX).exists()

    shutil.rmtree(state / "batches" / "000000")
    result = runner.invoke(app, ["recover", "--state", str(state)])
    assert result.exit_code == 2 and "batch 0 is missing" in result.output
    assert not (state / INDEX).exists()


def test_a_state_written_before_header_json_gains_one_on_its_next_commit(edited, tmp_path):
    state = tmp_path / "state"
    (state / "header.json").unlink()
    edited.edit(edited.batches[0].requests)
    edited.save_state(state)
    assert json.loads((state / "header.json").read_text()) == Journal.open(state).header


# -- 2. export never overwrites without --force ----------------------------------------------------


def test_export_refuses_to_overwrite_unless_forced(tiny_model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    state = _cli_state(tiny_model_folder, tmp_path)
    deltas = tmp_path / "deltas.safetensors"
    deltas.write_bytes(b"precious")
    refused = runner.invoke(app, ["export", "--state", str(state), "--out", str(deltas), "--deltas-only"])
    assert refused.exit_code == 2 and "--force" in refused.output
    assert deltas.read_bytes() == b"precious"
    forced = runner.invoke(app, ["export", "--state", str(state), "--out", str(deltas), "--deltas-only", "--force"])
    assert forced.exit_code == 0, forced.output
    assert load_file(str(deltas))["layer.1.left"].shape[1] == 2

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    for extra in ([], ["--force"]):
        result = runner.invoke(app, ["export", "--state", str(state), "--out", str(folder), *extra])
        assert result.exit_code == 2 and "not empty" in result.output and "Traceback" not in result.output
        assert (folder / "thesis.txt").read_text() == "years of work"
    onto_folder = runner.invoke(app, ["export", "--state", str(state), "--out", str(folder), "--deltas-only"])
    assert onto_folder.exit_code == 2 and "is a folder" in onto_folder.output

    model_dir = tmp_path / "model"
    assert runner.invoke(app, ["export", "--state", str(state), "--out", str(model_dir)]).exit_code == 0
    (model_dir / "marker").write_text("old export")
    assert runner.invoke(app, ["export", "--state", str(state), "--out", str(model_dir)]).exit_code == 2
    assert (model_dir / "marker").exists()
    assert runner.invoke(app, ["export", "--state", str(state), "--out", str(model_dir), "--force"]).exit_code == 0
    assert not (model_dir / "marker").exists() and (model_dir / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model-")]  # nothing left aside


# -- 3. stats --restart restarts only the pass asked for -------------------------------------------


def test_restart_drops_only_its_own_pass_checkpoint(llama, tokenizer, tmp_path):
    model, layout = llama
    cache = StatsCache(tmp_path)
    checkpoints = cache.root / "checkpoints"
    checkpoints.mkdir(parents=True)
    other = checkpoints / "pass-0123456789abcdef.safetensors"  # another corpus's interrupted pass
    other.write_bytes(b"keep me")
    spec = CorpusSpec(str(WIKITEXT), tokens=3000, max_length=64)
    restarted = second_moments(model, layout, tokenizer, [1], spec, cache, show_progress=False, restart=True)
    assert other.read_bytes() == b"keep me"
    reference = second_moments(model, layout, tokenizer, [1], spec, None, show_progress=False)
    assert torch.equal(restarted[1].moment, reference[1].moment)
