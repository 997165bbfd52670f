"""Audit findings (issue 12) that are not covered where their module's tests live."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alphaedit.cli import app
from alphaedit.journal import Journal
from alphaedit.stats import CorpusSpec, StatsCache, second_moments
from conftest import WIKITEXT

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()


def test_a_pass_that_starts_says_which_cached_statistics_differ_and_how(llama, tokenizer, tmp_path, capsys):
    model, layout = llama
    cache = StatsCache(tmp_path)
    second_moments(model, layout, tokenizer, [1], CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64), cache, show_progress=False)
    capsys.readouterr()
    second_moments(model, layout, tokenizer, [1], CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64), cache, show_progress=False)
    assert "computing statistics" not in capsys.readouterr().err  # found: no pass, nothing said
    second_moments(model, layout, tokenizer, [1], CorpusSpec(str(WIKITEXT), tokens=2000, max_length=32), cache, show_progress=False)
    said = capsys.readouterr().err
    assert "computing statistics for layers [1]" in said and "max_length 64 (wanted 32)" in said


def test_edit_takes_max_length_and_seed_so_a_stats_run_with_them_is_found(tiny_model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    stats = runner.invoke(app, ["stats", "--model", str(tiny_model_folder), "--corpus", str(WIKITEXT), "--tokens", "2000",
                                "--max-length", "64", "--layers", "1-2", "--json"])
    assert stats.exit_code == 0, stats.output
    requests = tmp_path / "r.json"
    requests.write_text(json.dumps([{"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"}]))
    edit = runner.invoke(app, ["edit", "--model", str(tiny_model_folder), "--requests", str(requests), "--state", str(tmp_path / "s"),
                               "--corpus", str(WIKITEXT), "--tokens", "2000", "--max-length", "64", "--steps", "2", "--layers", "1-2"])
    assert edit.exit_code == 0, edit.output
    assert "computing statistics" not in edit.output  # the cached C0 of the stats run was used
    header = Journal.open(tmp_path / "s").header
    assert header["corpus"]["max_length"] == 64
    assert header["preset_reason"].startswith("no preset")  # said why, and recorded
