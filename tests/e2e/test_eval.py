"""`alphaedit eval` end to end on a few CounterFact records of the real SmolLM2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alphaedit.cli import app

from .conftest import COUNTERFACT, WIKITEXT

pytestmark = pytest.mark.slow


def test_eval_writes_the_report_files(isolated_home, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, [
        "eval", "--dataset", f"counterfact:{COUNTERFACT}", "--n", "4", "--batch-size", "2", "--every", "1",
        "--steps", "6", "--corpus", str(WIKITEXT / "wiki.valid.raw"), "--tokens", "20000",
        "--perplexity-corpus", str(WIKITEXT / "wiki.test.raw"), "--perplexity-tokens", "1024",
        "--generation-every", "4", "--out", str(out), "--json",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    for block in ("pre", "post"):
        values = summary[block]
        for metric in ("efficacy", "generalization", "specificity", "generative_success", "consistency"):
            assert 0 <= values[metric] <= 100, (block, metric)
        assert 0 <= values["rewrite_acc"] <= 100 and 0 <= values["rephrase_acc"] <= 100 and "locality" not in values
        assert 200 < values["fluency"] < 1000  # n-gram entropy ×100, as the paper reports
        assert 1 < values["perplexity"] < 1000
    assert summary["post"]["efficacy"] > summary["pre"]["efficacy"]
    assert [p["edits"] for p in summary["curve"]] == [0, 2, 4]
    assert [p["edits"] for p in summary["norms"]] == [0, 2, 4]

    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in records] == [rec["case_id"] for rec in json.loads(COUNTERFACT.read_text())[:4]]
    assert "fluency" in records[0]["post"] and "fluency" not in records[1]["post"]  # every 4th record: 100 tokens a text are slow
    table = (out / "summary.md").read_text()
    assert "| pre-edit |" in table and "| alphaedit |" in table and "idf" in table
    for plot in ("metrics_vs_edits.png", "weight_norms.png", "norm_growth.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # monitoring: one point per batch, the matrices moved off their base
    assert [p["edits"] for p in summary["monitor"]] == [2, 4]
    assert all(g["frobenius"] != 1 for g in summary["monitor"][-1]["weight_growth"].values())
    assert "earlier_held" not in summary["monitor"][-1] and not (out / "rehearsal.png").exists()  # no rehearsal, no plot of it


def test_chat_aware_editing_and_the_generation_based_evaluation(isolated_home, tmp_path):
    """--chat writes each edit in SmolLM2's chat template too; --chat-eval asks the questions and
    reads the free answers, which end at the end of the turn; --chat-judge has an unedited copy
    of the model judge them beside the match."""
    out = tmp_path / "chat"
    result = CliRunner().invoke(app, [
        "eval", "--dataset", f"counterfact:{COUNTERFACT}", "--n", "2", "--batch-size", "2", "--steps", "8",
        "--corpus", str(WIKITEXT / "wiki.valid.raw"), "--tokens", "20000", "--chat", "--chat-eval",
        "--chat-neighbours", "2", "--chat-max-tokens", "16", "--chat-judge", "smollm2-135m", "--out", str(out), "--json",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for block in ("pre", "post"):
        for metric in ("chat_success", "chat_paraphrase", "chat_locality", "chat_leak"):
            assert 0 <= summary[block][metric] <= 100, (block, metric)
    assert summary["pre"]["chat_success"] == 0  # nobody answers "Antarctica" for Angola unedited
    assert summary["chat"] and summary["chat_eval"]
    for block in ("pre", "post"):  # the judge's counts beside the match's, and how often the two agree
        for metric in ("chat_success_judged", "chat_paraphrase_judged", "chat_locality_judged", "judge_agreement"):
            assert 0 <= summary[block][metric] <= 100, (block, metric)
    assert any("judge model smollm2-135m" in note for note in summary["notes"])
    assert "judge_agreement" in (out / "summary.md").read_text()
    assert any("chat-aware editing" in note and "2 requests" in note for note in summary["notes"])
    assert "chat_success" in (out / "summary.md").read_text()
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    answers = [r[block]["chat_answer"] for r in records for block in ("pre", "post")]
    assert all(a and "<|im_end|>" not in a and "<|im_start|>" not in a for a in answers), answers
