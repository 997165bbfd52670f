"""Kept subjects (EditRequest.keep_subjects, `eval --keep-same-relation`): zero-change columns in a
batch's solve, so that an edit does not spread to other subjects asked the same question."""

from __future__ import annotations

import copy

import pytest
import torch

from alphaedit.config import EditConfig
from alphaedit.eval.datasets import load_dataset, select, with_kept_subjects
from alphaedit.keys import compute_keys
from alphaedit.prompts import PLAIN_TEMPLATE, chat_form
from alphaedit.requests import EditRequest, RequestError, check_conflicts, parse_requests
from alphaedit.updates import LayerStatistics
from conftest import WIKITEXT
from test_chat import _editor, chat_tokenizer  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

EDIT = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French", question="What is the mother tongue of {}?",
                   keep_subjects=("Marie Curie", "Victor Hugo", "Jean Gabin"))


def test_a_kept_column_is_the_penalty_on_the_change_at_its_key():
    """Float64 reference: with kept keys K_k (target: no change) beside the edited K, AlphaEdit's
    projected solve minimises ‖ΔK − R‖² + ‖ΔK_k‖² + ‖ΔK_p‖² + α‖Δ‖² over Δ = Δ̃P, i.e.
    Δ = R Kᵀ P (C_p P + K Kᵀ P + K_k K_kᵀ P + α I)⁻¹; the change at the kept keys shrinks."""
    from alphaedit.methods import get_method

    g = torch.Generator().manual_seed(0)
    d0, d, u, m = 24, 8, 3, 5
    K, R, Kk, Kp = (torch.randn(a, b, dtype=torch.float64, generator=g) for a, b in ((d0, u), (d, u), (d0, m), (d0, 4)))
    Q, _ = torch.linalg.qr(torch.randn(d0, 16, dtype=torch.float64, generator=g))
    P = Q @ Q.T  # a projector onto a 16-dimensional subspace
    stats = LayerStatistics(None, P.float(), (Kp @ Kp.T).float())
    config = EditConfig(method="alphaedit", solve_dtype="float64")
    method = get_method("alphaedit")
    kept = method.layer_update(torch.cat([K, Kk], 1).float(), torch.cat([R, torch.zeros(d, m, dtype=torch.float64)], 1).float(), stats,
                               config).dense().double()
    eye = torch.eye(d0, dtype=torch.float64)
    expected = R @ K.T @ P @ torch.linalg.inv(Kp @ Kp.T @ P + K @ K.T @ P + Kk @ Kk.T @ P + config.l2_alpha * eye)
    torch.testing.assert_close(kept, expected, rtol=1e-5, atol=1e-6)
    plain = method.layer_update(K.float(), R.float(), stats, config).dense().double()
    assert (kept @ Kk).norm() < 0.5 * (plain @ Kk).norm()



def test_the_editor_keeps_the_kept_subjects_answers_in_plain_and_chat_form(llama, chat_tokenizer, tmp_path):  # noqa: F811
    """Each kept subject under the request's prompt and its chat question is a column of the solve
    with no change asked; W_out's change at those keys (read on the model before the edit, on the
    plain prompt) falls well below the change an edit without them makes there, and the edited
    keys still get their change."""
    model, layout = llama
    kept_forms = [f for s in EDIT.keep_subjects for r in [EditRequest(EDIT.prompt, s, "x", question=EDIT.question)]
                  for f in (r, chat_form(chat_tokenizer, r))]
    edited_forms = [EDIT, chat_form(chat_tokenizer, EDIT)]
    changes = {}
    for keep in (False, True):
        editor = _editor(copy.deepcopy(model), layout, chat_tokenizer, tmp_path, chat=True)  # MEMIT, as test_chat
        before = {l: editor._math_weight(l).clone() for l in (1, 2)}
        k_kept = compute_keys(editor.model, layout, chat_tokenizer, kept_forms, [PLAIN_TEMPLATE], [1, 2]).keys
        k_edit = compute_keys(editor.model, layout, chat_tokenizer, edited_forms, [PLAIN_TEMPLATE], [1, 2]).keys
        request = EDIT if keep else EditRequest(EDIT.prompt, EDIT.subject, EDIT.target_new, EDIT.target_true, question=EDIT.question)
        report = editor.edit([request])[0]
        assert report.kept_columns == (6 if keep else 0)  # three subjects, plain and chat
        delta = {l: editor._math_weight(l) - before[l] for l in (1, 2)}  # [d, d0]
        changes[keep] = [(float((delta[l] @ k_kept[l].T).norm(dim=0).mean()), float((delta[l] @ k_edit[l].T).norm(dim=0).mean()))
                         for l in (1, 2)]
    for (kept_plain, edit_plain), (kept_kept, edit_kept) in zip(changes[False], changes[True]):
        assert kept_kept < 0.3 * kept_plain, changes
        assert edit_kept > 0.5 * edit_plain, changes
    # with chat_values="trained" the edit has no chat column, but the kept subjects' chat questions
    # stay columns: what must not move in conversation does not depend on where the edit is written
    editor = _editor(copy.deepcopy(model), layout, chat_tokenizer, tmp_path, chat=True)
    editor.config.chat_values = "trained"
    report = editor.edit([EDIT])[0]
    assert report.kept_columns == 6 and all(len(k) == 1 for k in editor.batches[-1].keys.values())


def test_kept_subjects_are_read_checked_and_written_back():
    record = {"prompt": "{} speaks", "subject": "Paris", "target_new": "Rome", "keep_subjects": ["Lyon", "Nice"]}
    request = parse_requests([record], "requests.json")[0]
    assert request.keep_subjects == ("Lyon", "Nice")
    assert parse_requests([request.to_dict()], "again")[0] == request
    assert "keep_subjects" not in EditRequest("{} is", "x", "y").to_dict()
    for value, problem in (("Lyon", "keep_subjects' must be a list"), ([""], r"keep_subjects\[0\]' must be a non-empty string"),
                           (["Paris"], r"keep_subjects\[0\]' is the edited subject")):
        with pytest.raises(RequestError, match=f"record 1.*field '{problem}"):
            parse_requests([{**record, "keep_subjects": value}], "requests.json")
    # one batch cannot keep and change the same subject's answer to the same prompt
    other = EditRequest("{} speaks", "Lyon", "Spanish")
    with pytest.raises(RequestError, match="keeps the answer of subject 'Lyon'.*which record 2 edits"):
        check_conflicts([request, other])
    check_conflicts([request, EditRequest("{} is in", "Lyon", "Spain")])  # another prompt: no conflict


def test_eval_draws_kept_subjects_of_the_same_relation_outside_what_it_evaluates():
    dataset = load_dataset(f"counterfact:{WIKITEXT.parent / 'counterfact' / 'counterfact_test.json'}")
    records = select(dataset, 30, None)
    kept = with_kept_subjects(records, dataset, 4)
    named = " ".join(r.request.subject + " " + " ".join(r.neighbourhood + r.paraphrases) for r in records)
    by_subject = {r.request.subject: r.relation_id for r in dataset}
    for rec in kept:
        assert len(rec.request.keep_subjects) == 4 and rec.request.subject not in rec.request.keep_subjects
        for s in rec.request.keep_subjects:
            assert by_subject[s] == rec.relation_id and s not in named
    assert with_kept_subjects(records, dataset, 4) == kept  # drawn with a fixed seed
    zsre = load_dataset(f"zsre:{WIKITEXT.parent / 'zsre' / 'zsre_mend_eval_portability_gpt4.json'}")[:3]
    with pytest.raises(ValueError, match="only CounterFact records carry"):
        with_kept_subjects(zsre, zsre, 2)


def test_eval_keeps_same_relation_subjects_and_a_run_with_them_does_not_grow(tiny_model_folder, tmp_path):
    import json

    from test_eval_resume import COUNTERFACT, _run

    out = tmp_path / "run"
    done = _run(["eval", "--model", str(tiny_model_folder), "--dataset", f"counterfact:{COUNTERFACT}", "--n", "4", "--batch-size", "2",
                 "--steps", "2", "--layers", "1-2", "--corpus", str(WIKITEXT), "--tokens", "2000", "--keep-same-relation", "2",
                 "--out", str(out), "--json"], tmp_path / "home")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["keep_same_relation"] == 2 and any("kept up to 2 subjects of its relation" in n for n in summary["notes"])
    journal = sorted((out / "state").rglob("requests.json"))
    assert journal and all(len(r["keep_subjects"]) == 2 for f in journal for r in json.loads(f.read_text()))
    grown = _run(["eval", "--resume", str(out), "--n", "6"], tmp_path / "home")
    assert grown.returncode == 2 and "--keep-same-relation" in grown.stderr


def test_the_joint_spread_keeps_the_kept_subjects_too(llama, tokenizer, tmp_path):
    """With the joint spread the kept subjects are columns of the block's one solve (editor._with_kept
    serves both spreads), asking that the block's summed change at their keys, Σ_l Δ_l k_l, be none:
    it falls well below what the same edit makes there without them, and the edited subject's
    summed change stays."""
    from test_editor import _editor as _alphaedit_editor

    model, layout = llama
    plain = EditRequest(EDIT.prompt, EDIT.subject, EDIT.target_new, EDIT.target_true)
    kept_forms = [EditRequest(EDIT.prompt, s, "x") for s in EDIT.keep_subjects]
    changes = {}
    for keep in (False, True):
        # a small α, so that the columns, not the norm penalty, decide what each layer writes
        editor = _alphaedit_editor((copy.deepcopy(model), layout), tokenizer, tmp_path, spread="joint", l2_alpha=1e-3)
        layers = editor.config.layers
        before = {l: editor._math_weight(l).clone() for l in layers}
        k_kept = compute_keys(editor.model, layout, tokenizer, kept_forms, [PLAIN_TEMPLATE], layers).keys
        k_edit = compute_keys(editor.model, layout, tokenizer, [plain], [PLAIN_TEMPLATE], layers).keys
        request = EditRequest(EDIT.prompt, EDIT.subject, EDIT.target_new, EDIT.target_true, keep_subjects=EDIT.keep_subjects) if keep else plain
        assert editor.edit([request])[0].kept_columns == (3 if keep else 0)
        summed = {name: sum((editor._math_weight(l) - before[l]) @ keys[l].T for l in layers) for name, keys in (("kept", k_kept), ("edit", k_edit))}
        changes[keep] = {name: float(change.norm(dim=0).mean()) for name, change in summed.items()}
    assert changes[True]["kept"] < 0.3 * changes[False]["kept"], changes
    assert changes[True]["edit"] > 0.5 * changes[False]["edit"], changes
