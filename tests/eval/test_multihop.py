"""MQuAKE portability (eval/multihop.py): loading, scoring, and each case edited alone."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from alphaedit.config import EditConfig
from alphaedit.editor import Editor
from alphaedit.eval.multihop import MultiHopCase, _case_scores, load_mquake, run_multihop
from alphaedit.layouts import mlp_out_weight
from alphaedit.requests import EditRequest
from alphaedit.stats import CorpusSpec, StatsCache
from conftest import WIKITEXT

MQUAKE = Path(__file__).resolve().parents[3] / "shared" / "data" / "mquake" / "AKEW_MQuAKE-CF.json"


def test_mquake_cases_carry_their_rewrites_with_questions_and_both_answers():
    cases = load_mquake(MQUAKE, 5)
    first = cases[0]
    assert [r.text() for r in first.requests] == ["Ellie Kemper is a citizen of"]
    assert first.requests[0].target_new == "Croatia" and first.requests[0].target_true == "United States of America"
    assert first.requests[0].question_text() == "What is the country of citizenship of Ellie Kemper?"
    assert len(first.questions) == 3 and first.new_answers[0] == "Kolinda Grabar-Kitarović" and "Trump" in first.old_answers
    assert len(load_mquake(MQUAKE)) == 354


def test_a_case_counts_when_any_question_is_answered_with_an_alias():
    case = MultiHopCase(1, [EditRequest("{} is a citizen of", "Ellie Kemper", "Croatia", "USA")], ["q1", "q2"],
                        ["Donald Trump", "Trump"], ["Kolinda Grabar-Kitarović", "Grabar-Kitarović"])
    scores = _case_scores(case, ["I do not know.", "It is Grabar-Kitarovic.", "She is a citizen of Croatia."])
    assert scores["multihop"] == 1.0 and scores["multihop_old"] == 0.0 and scores["edited"] == 1.0
    scores = _case_scores(case, ["President Trump.", "no idea", "America."])
    assert scores["multihop"] == 0.0 and scores["multihop_old"] == 1.0 and scores["edited"] == 0.0


def test_a_bad_file_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[{"prompt": "{} is", "subject": "a", "target_new": "b"}]')
    with pytest.raises(ValueError, match="expected MQuAKE records"):
        load_mquake(path)


@pytest.mark.usefixtures("single_thread")
def test_each_case_is_edited_alone_and_the_weights_come_back(llama, tokenizer, tmp_path):
    model, layout = llama
    model = copy.deepcopy(model)
    config = EditConfig(method="alphaedit", layers=[1, 2], v_num_grad_steps=3, nullspace_threshold=0.5, context_template_length=6)
    editor = Editor(model, tokenizer, config, layout=layout, corpus=CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64),
                    cache=StatsCache(tmp_path / "home"), show_progress=False)
    before = {l: mlp_out_weight(model, layout, l).detach().clone() for l in (1, 2)}
    cases = [
        MultiHopCase(i, [EditRequest("{} lives in", name, "Rome", "Paris")], [f"Where does {name} live?"], ["Paris"], ["Rome"])
        for i, name in enumerate(["Anna", "Boris"])
    ]
    seen = []
    report = run_multihop(editor, cases, max_new_tokens=4, on_case=seen.append)
    assert seen == [1, 2] and [c["case_id"] for c in report["cases"]] == [0, 1]
    for block in ("pre", "post"):
        assert set(report[block]) == {"multihop", "multihop_old", "edited"}
        assert all(0 <= v <= 100 for v in report[block].values())
    assert all(b.reverted for b in editor.batches) and len(editor.batches) == 2
    for layer, weight in before.items():
        torch.testing.assert_close(mlp_out_weight(model, layout, layer), weight, rtol=0, atol=1e-5)


def test_the_multihop_command_reports_before_and_after(tiny_model_folder, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from alphaedit.cli import app

    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    cases = json.loads(MQUAKE.read_text())[:2]
    data = tmp_path / "mquake.json"
    data.write_text(json.dumps(cases))
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["multihop", "--dataset", str(data), "--model", str(tiny_model_folder), "--corpus", str(WIKITEXT),
                                      "--tokens", "2000", "--layers", "1-2", "--steps", "2", "--max-tokens", "4", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n"] == 2 and set(summary["pre"]) == {"multihop", "multihop_old", "edited"} and "cases" not in summary
    assert summary["held_texts"] == 0
    hold = tmp_path / "hold.json"
    hold.write_text(json.dumps(["Paris is the capital of France.", {"question": "Where is the Louvre?"}]))
    held = CliRunner().invoke(app, ["multihop", "--dataset", str(data), "--model", str(tiny_model_folder), "--corpus", str(WIKITEXT),
                                    "--tokens", "2000", "--layers", "1-2", "--steps", "2", "--max-tokens", "4", "--hold", str(hold), "--json"])
    assert held.exit_code == 0 and json.loads(held.stdout)["held_texts"] == 2, held.output
    report = json.loads(out.read_text())
    assert [c["case_id"] for c in report["cases"]] == [c["case_id"] for c in cases]
    assert all(len(c["post"]["answers"]) == len(cases[i]["questions"]) for i, c in enumerate(report["cases"]))
    bad = CliRunner().invoke(app, ["multihop", "--dataset", str(tmp_path / "missing.json"), "--model", str(tiny_model_folder)])
    assert bad.exit_code == 2 and "missing.json" in bad.output


def test_the_multihop_command_takes_alpha_and_chat_values(tiny_model_folder, tmp_path, monkeypatch):
    """Portability can be measured with the settings the 200-edit chat runs compare (chat-aware,
    shared values, another α); bad values are refused before a model is loaded."""
    import json

    from typer.testing import CliRunner

    from alphaedit.cli import app

    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    data = tmp_path / "mquake.json"
    data.write_text(json.dumps(json.loads(MQUAKE.read_text())[:1]))
    base = ["multihop", "--dataset", str(data), "--model", str(tiny_model_folder), "--corpus", str(WIKITEXT), "--tokens", "2000",
            "--layers", "1-2", "--steps", "2", "--max-tokens", "4", "--json"]
    result = CliRunner().invoke(app, [*base, "--l2", "60", "--chat", "--chat-values", "shared"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert "α 60" in summary["method"] and summary["chat"] is True and summary["chat_values"] == "shared"
    for bad, named in ((["--chat-values", "mine"], "--chat-values mine"), (["--l2", "0"], "--l2 0")):
        refused = CliRunner().invoke(app, ["multihop", "--dataset", str(tmp_path / "missing.json"), "--model", str(tiny_model_folder), *bad])
        assert refused.exit_code == 2 and named in refused.output, refused.output
