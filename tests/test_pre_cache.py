"""The pre-edit evaluation is computed once per model, records and settings, and reused only then."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from alphaedit.cli import app
from alphaedit.eval.pre_cache import model_digest
from alphaedit.eval.protocol import _reused_from
from conftest import WIKITEXT

DATA = WIKITEXT.parent
COUNTERFACT = DATA / "counterfact" / "counterfact_test.json"
GLUE = DATA / "glue_eval"


def _eval(model: Path, home: Path, out: Path, *extra: str) -> dict:
    args = ["eval", "--model", str(model), "--dataset", f"counterfact:{COUNTERFACT}", "--n", "4", "--batch-size", "2",
            "--steps", "2", "--layers", "1-2", "--corpus", str(WIKITEXT), "--tokens", "2000", "--general", str(GLUE),
            "--general-tests", "3", "--general-tasks", "sst2", "--perplexity-corpus", str(WIKITEXT), "--perplexity-tokens", "300",
            "--out", str(out), "--json", *extra]
    result = CliRunner().invoke(app, args, env={"ALPHAEDIT_HOME": str(home)})
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


def _rows(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def test_a_second_method_reuses_the_pre_edit_evaluation_and_it_equals_a_fresh_one(tiny_model_folder, tmp_path):
    home = tmp_path / "home"
    first = _eval(tiny_model_folder, home, tmp_path / "alphaedit")
    assert len(list((home / "pre-eval").glob("*.json"))) == 1
    assert not any("reused" in note for note in first["notes"])

    second = _eval(tiny_model_folder, home, tmp_path / "memit", "--method", "memit")
    assert any(note.startswith("pre-edit scores reused from") for note in second["notes"])
    fresh = _eval(tiny_model_folder, home, tmp_path / "fresh", "--method", "memit", "--no-pre-cache")
    assert not any("reused" in note for note in fresh["notes"])
    assert second["pre"] == fresh["pre"] == first["pre"]
    assert second["general"][0] == fresh["general"][0]
    assert _rows(tmp_path / "memit", "pre.jsonl") == _rows(tmp_path / "fresh", "pre.jsonl")
    assert _rows(tmp_path / "memit", "general/000000.jsonl") == _rows(tmp_path / "fresh", "general/000000.jsonl")
    assert second["post"] != first["post"] or second["norms"] != first["norms"]  # the methods themselves differ


def test_other_records_settings_or_a_damaged_file_are_not_served_from_the_cache(tiny_model_folder, tmp_path):
    home = tmp_path / "home"
    _eval(tiny_model_folder, home, tmp_path / "a")
    for k, extra in enumerate([("--n", "6"), ("--general-tests", "4"), ("--perplexity-tokens", "200")]):
        summary = _eval(tiny_model_folder, home, tmp_path / f"b{k}", *extra)
        assert not any("reused" in note for note in summary["notes"]), extra
    assert len(list((home / "pre-eval").glob("*.json"))) == 4

    # a damaged cache file is recomputed (and rewritten), never trusted
    for path in (home / "pre-eval").glob("*.json"):
        path.write_text("{not json")
    damaged = _eval(tiny_model_folder, home, tmp_path / "c")
    assert not any("reused" in note for note in damaged["notes"])
    again = _eval(tiny_model_folder, home, tmp_path / "d")
    assert any("reused" in note for note in again["notes"])


def test_the_model_digest_sees_every_weight(llama):
    model, _ = llama
    before = model_digest(model)
    name, parameter = list(model.named_parameters())[0]  # the embedding: no edited layer
    kept = parameter.detach().clone()
    with torch.no_grad():
        parameter.view(-1)[0] += 1e-3
    try:
        assert model_digest(model) != before, name
    finally:
        with torch.no_grad():
            parameter.copy_(kept)
    assert model_digest(model) == before


def test_a_run_folder_written_before_the_reuse_record_was_structured_still_reads():
    assert _reused_from(None) is None
    assert _reused_from({"file": "f.json (computed t)", "records": 40}) == {"file": "f.json (computed t)", "records": 40}
    assert _reused_from("f.json (computed t)") == {"file": "f.json (computed t)"}
    assert _reused_from("f.json (computed t) for its first 1000 records") == {"file": "f.json (computed t)", "records": 1000}
