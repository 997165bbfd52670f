"""The collapse guard (issue 14): a batch that grows the matrices or drifts answers too far is
taken back exactly and refused with a message that says what tripped."""

from __future__ import annotations

import copy

import pytest
import torch

from alphaedit.config import EditConfig
from alphaedit.editor import Editor
from alphaedit.guard import Guard, GuardTripped
from alphaedit.layouts import mlp_out_weight
from alphaedit.requests import EditRequest
from alphaedit.stats import CorpusSpec, StatsCache
from conftest import WIKITEXT

pytestmark = pytest.mark.usefixtures("single_thread")

FIRST = [EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French")]
SECOND = [EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")]
PROBES = ["The river flows", "The city of", "In the year", "The valley is", "He was born in", "The war began"]


def _editor(model, layout, tokenizer, tmp_path, method="alphaedit") -> Editor:
    # a small λ: updates large enough to move the tiny model's norms visibly
    config = EditConfig(method=method, layers=[1, 2], v_num_grad_steps=4, v_lr=0.5, nullspace_threshold=0.5, context_template_length=6,
                        mom2_update_weight=1e-3)
    return Editor(model, tokenizer, config, layout=layout, corpus=CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64),
                  cache=StatsCache(tmp_path / "home"), show_progress=False)


def _state(editor: Editor) -> dict:
    return {"weights": {l: mlp_out_weight(editor.model, editor.layout, l).detach().clone() for l in (1, 2)},
            "preserved": {l: c.clone() for l, c in editor.preserved.items()}}


@pytest.mark.parametrize("method", ["memit", "prune"])  # prune: the restrained weights must come back too
def test_a_batch_over_the_growth_limit_is_taken_back_exactly(llama, tokenizer, tmp_path, method):
    model, layout = llama
    editor = _editor(copy.deepcopy(model), layout, tokenizer, tmp_path, method)
    editor.edit(FIRST)
    growth = max(g["spectral"] for g in editor.history[-1].weight_growth.values())
    before = _state(editor)
    # measured: the second batch takes σ_max from 2.56× to 2.72× (memit) or 4.28× (prune)
    editor.guard = Guard(max_growth=growth + 1e-3, max_drift=1.0, probes=PROBES)
    with pytest.raises(GuardTripped, match=r"σ_max of layer \d's W_out would be [\d.]+× the base model's \(limit [\d.]+\)"):
        editor.edit(SECOND)
    after = _state(editor)
    for layer in (1, 2):
        assert torch.equal(after["weights"][layer], before["weights"][layer])
        assert torch.equal(after["preserved"][layer], before["preserved"][layer])
    assert len(editor.batches) == 1 and editor.events == [("batch", 0)]
    editor.guard = None
    editor.edit(SECOND)  # and the editor goes on as if the refused batch never happened
    assert [r.index for r in editor.history] == [0, 1]


def test_a_batch_that_changes_too_many_probe_answers_is_refused_and_named(llama, tokenizer, tmp_path):
    model, layout = llama
    editor = _editor(copy.deepcopy(model), layout, tokenizer, tmp_path, "memit")
    editor.guard = Guard(max_growth=100.0, max_drift=0.0, probes=PROBES)
    plain = copy.deepcopy(editor.model)
    with pytest.raises(GuardTripped, match=r"of 6 probe prompts \(\d+%\) changed their next token \(limit 0%\): 'The"):
        editor.edit(FIRST + SECOND)
    for layer in (1, 2):
        assert torch.equal(mlp_out_weight(editor.model, layout, layer), mlp_out_weight(plain, layout, layer))
    assert editor.batches == []


def test_a_loose_guard_lets_batches_through_and_skips_probes_about_edited_subjects(llama, tokenizer, tmp_path):
    model, layout = llama
    editor = _editor(copy.deepcopy(model), layout, tokenizer, tmp_path)
    editor.guard = Guard(max_growth=100.0, max_drift=1.0, probes=[*PROBES, "The Eiffel Tower stands in"])
    assert "The Eiffel Tower stands in" not in editor.guard.usable_probes(SECOND)
    editor.edit(FIRST + SECOND, batch_size=1)
    assert len(editor.history) == 2


def test_the_verdict_reports_both_problems_with_their_sizes(tokenizer):
    guard = Guard(max_growth=1.2, max_drift=0.25, probes=["a", "b", "c", "d"])
    verdict = guard.verdict({"3": {"frobenius": 1.1, "spectral": 1.5}, "4": {"frobenius": 1.0, "spectral": 1.1}},
                            ["a", "b", "c", "d"], [1, 2, 3, 4], [1, 9, 9, 4], tokenizer)
    assert "layer 3's W_out would be 1.500×" in verdict and "limit 1.2" in verdict
    assert "2 of 4 probe prompts (50%)" in verdict and "limit 25%" in verdict
    assert guard.verdict({"3": {"frobenius": 1.0, "spectral": 1.1}}, ["a"], [1], [1], tokenizer) is None


def test_edit_with_a_guard_keeps_the_batches_before_the_refused_one(tiny_model_folder, tmp_path, monkeypatch):
    """`alphaedit edit --guard`: a batch within the limits is committed; the next, past them, fails
    naming what tripped, and the journal keeps the first batch only."""
    import json

    from typer.testing import CliRunner

    from alphaedit.cli import app
    from alphaedit.journal import Journal

    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    first, both = tmp_path / "first.json", tmp_path / "both.json"
    first.write_text(json.dumps([r.to_dict() for r in FIRST]))
    both.write_text(json.dumps([r.to_dict() for r in FIRST + SECOND]))
    probes = tmp_path / "probes.txt"
    probes.write_text("\n".join(PROBES) + "\n")
    common = ["--model", str(tiny_model_folder), "--state", str(tmp_path / "s"), "--method", "memit", "--corpus", str(WIKITEXT),
              "--tokens", "2000", "--max-length", "64", "--steps", "2", "--layers", "1-2", "--guard", "--guard-probes", str(probes)]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    bad = CliRunner().invoke(app, ["edit", "--requests", str(first), *common[:-1], str(empty)])
    assert bad.exit_code == 2 and "no prompts in it" in bad.output and not (tmp_path / "s").exists()
    loose = CliRunner().invoke(app, ["edit", "--requests", str(first), *common, "--guard-growth", "100", "--guard-drift", "1.0"])
    assert loose.exit_code == 0, loose.output
    # σ_max moves with any MEMIT update: a limit of 1.0 refuses the next batch
    strict = CliRunner().invoke(app, ["edit", "--requests", str(both), *common, "--guard-growth", "1.0", "--guard-drift", "1.0"])
    assert strict.exit_code == 2 and "refused by the guard" in " ".join(strict.output.split()), strict.output
    assert Journal.open(tmp_path / "s").batch_ids() == [0]
