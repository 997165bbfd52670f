"""The command line on the real SmolLM2: `edit` then `ask` changes a fact."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alphaedit.cli import app

from .conftest import WIKITEXT

pytestmark = pytest.mark.slow
runner = CliRunner()
PROMPT = "The Eiffel Tower is located in the city of"


def _ask(*args: str) -> list[dict]:
    result = runner.invoke(app, ["ask", *args, "--json", "--max-new-tokens", "4", PROMPT])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_edit_then_ask_changes_a_fact(isolated_home, tmp_path):
    requests = tmp_path / "edits.jsonl"
    requests.write_text(json.dumps({"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome", "target_true": "Paris"}) + "\n")
    state = tmp_path / "state"

    (before,) = _ask("--model", "smollm2-135m")
    assert before["prompt"] == PROMPT and "Paris" in before["completion"]

    result = runner.invoke(app, ["edit", "--model", "smollm2-135m", "--requests", str(requests), "--state", str(state),
                                 "--corpus", str(WIKITEXT), "--tokens", "20000", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["requests"] == 1 and summary["batches"][0]["efficacy"] == 1.0
    assert (state / "journal.json").exists()

    (after,) = _ask("--state", str(state))
    assert "Rome" in after["completion"]


def test_a_bad_request_file_is_refused_before_anything_is_written(isolated_home, tmp_path):
    requests = tmp_path / "bad.jsonl"
    requests.write_text(json.dumps({"prompt": "{} is in {}", "subject": "X", "target_new": "Y"}) + "\n")
    result = runner.invoke(app, ["edit", "--model", "smollm2-135m", "--requests", str(requests), "--state", str(tmp_path / "state")])
    assert result.exit_code == 2
    assert "record 1" in result.output and "prompt" in result.output
    assert not (tmp_path / "state").exists()
