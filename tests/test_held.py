"""Held texts (`Editor.hold`, held.py, `eval --keep-conversations`): every position's W_out key of
some texts in C_p before the first batch, so that the edits leave the model's outputs there alone."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from alphaedit.editor import Editor
from alphaedit.eval.datasets import held_questions, load_dataset, select
from alphaedit.generate import prompt_ids
from alphaedit.journal import JournalError
from alphaedit.stats import StatsCache
from conftest import WIKITEXT
from test_editor import REQUESTS, _editor, _weights

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ("The mother tongue of Victor Hugo is French, and he wrote in it.",
         "Question: Where is the Louvre?\nAnswer: The Louvre is in Paris.")


def _keys(editor: Editor, texts) -> dict[int, torch.Tensor]:
    """Reference: each text alone, unpadded, its W_out inputs at every position, float64 [tokens, d0]."""
    out = {l: [] for l in editor.config.layers}
    hooks = [editor.model.get_submodule(editor.layout.mlp_out_path(l)).register_forward_hook(
        (lambda l: lambda m, i, o: out[l].append(i[0][0].double()))(l)) for l in editor.config.layers]
    with torch.no_grad():
        for text in texts:
            editor.model(input_ids=torch.tensor([prompt_ids(editor.tokenizer, text)]))
    for h in hooks:
        h.remove()
    return {l: torch.cat(k) for l, k in out.items()}


def test_holding_adds_every_positions_keys_to_c_p_as_a_hand_sum(llama, tokenizer, tmp_path):
    """C_p gains w Σ k kᵀ over every token of every held text (batched with padding: the padding's
    positions count for nothing), and the editor records what it holds."""
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path)
    editor.hold(TEXTS, weight=2.5)
    keys = _keys(editor, TEXTS)
    for layer in editor.config.layers:
        torch.testing.assert_close(editor.preserved[layer].double(), 2.5 * keys[layer].T @ keys[layer], rtol=1e-5, atol=1e-4)
    assert [h.to_dict() for h in editor.held] == [{"texts": list(TEXTS), "weight": 2.5}]


def test_an_edit_leaves_the_held_texts_outputs_closer_to_where_they_were(llama, tokenizer, tmp_path):
    """The same two batches with and without holding: W_out's change at the held texts' keys
    (read on the unedited model) shrinks well below the change without holding, while the
    edited requests' own keys still get most of theirs."""
    from alphaedit.keys import compute_keys

    model, layout = llama
    changes = {}
    for hold in (False, True):
        # a small α, so that the held keys, not the norm penalty, decide where the update goes
        editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, l2_alpha=1e-3)
        if hold:
            editor.hold(TEXTS)
        before = _weights(editor)
        held = _keys(editor, TEXTS)
        edited = compute_keys(editor.model, layout, tokenizer, REQUESTS[:2], editor.context_templates(), editor.config.layers).keys
        editor.edit(REQUESTS[:2])
        after = _weights(editor)
        changes[hold] = [(float(((after[l] - before[l]).double() @ held[l].T).norm()),
                          float(((after[l] - before[l]) @ edited[l].T).norm())) for l in editor.config.layers]
    for (held_free, edited_free), (held_held, edited_held) in zip(changes[False], changes[True]):
        assert held_held < 0.5 * held_free, changes
        assert edited_held > 0.5 * edited_free, changes


def test_holding_is_refused_after_a_batch_without_c_p_and_for_bad_texts(llama, tokenizer, tmp_path):
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path)
    for texts, weight, problem in (((), 1.0, "no texts to hold"), (("ok", " "), 1.0, "held text 1 is empty"),
                                   (TEXTS, 0.0, "weight 0.0: give a positive number")):
        with pytest.raises(ValueError, match=problem):
            editor.hold(texts, weight)
    assert editor.held == [] and all(float(c.abs().sum()) == 0 for c in editor.preserved.values())  # nothing changed
    editor.edit(REQUESTS[:1])
    with pytest.raises(ValueError, match="before the first batch"):
        editor.hold(TEXTS)
    memit = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, method="memit")
    with pytest.raises(ValueError, match="no C_p to hold texts in"):
        memit.hold(TEXTS)


def test_a_journal_holds_the_texts_again_on_load_and_refuses_other_ones(llama, tokenizer, tmp_path):
    model, layout = llama
    straight = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path)
    straight.hold(TEXTS)
    straight.edit(REQUESTS, batch_size=2)

    first = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path)
    first.hold(TEXTS)
    first.edit(REQUESTS[:2])
    first.save_state(tmp_path / "state")
    assert json.loads((tmp_path / "state" / "header.json").read_text())["held_texts"] == [{"texts": list(TEXTS), "weight": 1.0}]
    resumed = Editor.load_state(tmp_path / "state", copy.deepcopy(model), tokenizer, cache=StatsCache(tmp_path / "home"), show_progress=False)
    assert resumed.held == first.held
    for layer in first.config.layers:
        torch.testing.assert_close(resumed.preserved[layer], first.preserved[layer], rtol=1e-5, atol=1e-4)
    resumed.edit(REQUESTS[2:])
    for layer, weight in _weights(straight).items():
        torch.testing.assert_close(_weights(resumed)[layer], weight, rtol=0, atol=1e-6)

    other = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path)  # the same history, nothing held
    other.edit(REQUESTS[:2])
    with pytest.raises(JournalError, match="holding other texts"):
        other.save_state(tmp_path / "state")


def test_a_re_read_holds_the_texts_where_the_model_reads_them_now(llama, tokenizer, tmp_path):
    from test_reread import _keys_now

    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, l2_alpha=1e-3, earlier_reread=1)
    editor.hold(TEXTS)
    editor.edit(REQUESTS[:2])
    held, edited = _keys(editor, TEXTS), _keys_now(editor, REQUESTS[:2])
    for layer in editor.config.layers:
        torch.testing.assert_close(editor.preserved[layer].double(), held[layer].T @ held[layer] + edited[layer].double(),
                                   rtol=1e-4, atol=1e-3)


def test_eval_asks_held_questions_about_subjects_it_does_not_evaluate():
    dataset = load_dataset(f"counterfact:{WIKITEXT.parent / 'counterfact' / 'counterfact_test.json'}")
    records = select(dataset, 30, None)
    questions = held_questions(records, dataset, 25)
    named = " ".join(r.request.subject + " " + " ".join(r.neighbourhood + r.paraphrases) for r in records)
    subjects = {r.request.subject for r in dataset}
    assert len(set(questions)) == 25
    for q in questions:
        assert not any(r.request.subject in q for r in records), q
        assert any(s in q and s not in named for s in subjects), q
    assert held_questions(records, dataset, 25) == questions  # drawn with a fixed seed
    with pytest.raises(ValueError, match="ask for fewer"):
        held_questions(records, dataset, len(dataset))
    zsre = load_dataset(f"zsre:{WIKITEXT.parent / 'zsre' / 'zsre_mend_eval_portability_gpt4.json'}")[:3]
    with pytest.raises(ValueError, match="only CounterFact records carry"):
        held_questions(zsre, zsre, 2)


def test_eval_keeps_conversations_and_a_run_with_them_resumes_holding_them(tiny_model_folder, tmp_path):
    from test_eval_resume import COUNTERFACT, _run

    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_model_folder), "--dataset", f"counterfact:{COUNTERFACT}", "--n", "4", "--batch-size", "2",
            "--steps", "2", "--layers", "1-2", "--corpus", str(WIKITEXT), "--tokens", "2000", "--keep-conversations", "3",
            "--chat-max-tokens", "4", "--out", str(out), "--json"]
    done = _run(args, tmp_path / "home")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["keep_conversations"] == 3 and any("held 3 conversations" in n for n in summary["notes"])
    held = json.loads((out / "state" / "header.json").read_text())["held_texts"]
    assert len(held) == 1 and len(held[0]["texts"]) == 3
    grown = _run(["eval", "--resume", str(out), "--n", "6"], tmp_path / "home")
    assert grown.returncode == 2 and "--keep-conversations" in grown.stderr
    refused = _run([*args[:-3], "--method", "memit", "--out", str(tmp_path / "memit")], tmp_path / "home")
    assert refused.returncode == 2 and "--keep-conversations: method memit" in refused.stderr


def test_edit_holds_a_files_texts_and_questions_in_a_new_state_only(tiny_model_folder, tmp_path):
    from typer.testing import CliRunner

    from alphaedit.cli import app
    from test_methods import assert_edit_refuses, tiny_edit_command

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    hold = tmp_path / "hold.json"
    hold.write_text(json.dumps([TEXTS[0], {"question": "Where is the Louvre?"}]))
    state = tmp_path / "state"
    done = CliRunner().invoke(app, [*common, "--state", str(state), "--hold", str(hold)], env=env)
    assert done.exit_code == 0, done.output
    held = json.loads((state / "header.json").read_text())["held_texts"]
    assert held[0]["texts"][0] == TEXTS[0] and held[0]["texts"][1].startswith("Question: Where is the Louvre?\nAnswer:")
    again = CliRunner().invoke(app, [*common, "--state", str(state), "--hold", str(hold)], env=env)
    assert again.exit_code == 2 and "began already" in again.output, again.output
    cases = []
    for content, says in (("[1]", "item 1 must be a non-empty text"), ('[{"question": "x", "answer": "y"}]', "item 1 must be"),
                          ("{}", "non-empty JSON list"), ("[", "cannot read it as JSON")):
        path = tmp_path / f"bad{len(cases)}.json"
        path.write_text(content)
        cases.append((["--hold", str(path)], says))
    assert_edit_refuses(common, env, tmp_path, cases + [(["--hold", str(hold), "--method", "memit"], "no C_p to hold texts in")])
