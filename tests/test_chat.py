"""Chat-aware editing (issue 15): the chat form of a request, its own column in the solve, and
the keys of requests read under different numbers of templates."""

from __future__ import annotations

import copy

import pytest
import torch

from alphaedit.config import EditConfig
from alphaedit.editor import Editor
from alphaedit.keys import compute_keys, template_weights
from alphaedit.prompts import PLAIN_TEMPLATE, chat_form, chat_prompt, encode, fill, target_ids
from alphaedit.requests import EditRequest, RequestError, parse_requests
from alphaedit.stats import CorpusSpec, StatsCache
from alphaedit.targets import compute_targets
from conftest import BOS, EOS, WIKITEXT

pytestmark = pytest.mark.usefixtures("single_thread")

CHAT_TEMPLATE = (
    "{% for m in messages %}" + BOS + "{{ m['role'] }}\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}" + BOS + "assistant\n{% endif %}"
)
QUESTIONED = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French", question="What is the mother tongue of {}?"),
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris", question="Where is {}?"),
]


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_the_chat_form_asks_the_question_in_the_template_and_marks_the_subject(chat_tokenizer):
    form = chat_form(chat_tokenizer, QUESTIONED[0])
    assert form.chat_turn and form.target_new == "English"
    text = fill(PLAIN_TEMPLATE, form).text
    assert text == chat_prompt(chat_tokenizer, "What is the mother tongue of Danielle Darrieux?")
    assert text.startswith(BOS + "user\nWhat is the mother tongue of Danielle Darrieux?") and text.endswith(BOS + "assistant\n")
    ids, last = encode(chat_tokenizer, fill(PLAIN_TEMPLATE, form))
    assert chat_tokenizer.decode(ids[: last + 1]).endswith("Danielle Darrieux")
    # an answer starts its line: no leading space, unlike a cloze's continuation
    assert target_ids(chat_tokenizer, form.target_new, leading_space=False) == chat_tokenizer("English", add_special_tokens=False)["input_ids"]


def test_a_chat_template_that_drops_the_question_is_refused(chat_tokenizer):
    chat_tokenizer.chat_template = "{% if add_generation_prompt %}assistant:{% endif %}"
    with pytest.raises(RequestError, match="does not keep the question"):
        chat_form(chat_tokenizer, QUESTIONED[0])


def test_keys_of_requests_under_different_template_counts_equal_separate_reads(llama, chat_tokenizer):
    """The chat form is read under the plain template alone, its request under all: one pass
    over both must give each the keys (and z) that reading it alone gives."""
    model, layout = llama
    templates = [PLAIN_TEMPLATE, "Therefore, {}", "I think that {}"]
    forms = [QUESTIONED[0], chat_form(chat_tokenizer, QUESTIONED[0]), QUESTIONED[1]]
    mixed = compute_keys(model, layout, chat_tokenizer, forms, templates, [1, 2], z_layer=2)
    for i, form in enumerate(forms):
        alone = compute_keys(model, layout, chat_tokenizer, [form], templates, [1, 2], z_layer=2)
        for layer in (1, 2):
            torch.testing.assert_close(mixed.keys[layer][i], alone.keys[layer][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed.z_current[i], alone.z_current[0], rtol=1e-5, atol=1e-6)
    # the request's key is the template average: half the plain row, half the others
    plain = compute_keys(model, layout, chat_tokenizer, [QUESTIONED[0]], [PLAIN_TEMPLATE], [1]).keys[1][0]
    others = [compute_keys(model, layout, chat_tokenizer, [QUESTIONED[0]], [t], [1]).keys[1][0] for t in templates[1:]]
    expected = template_weights(3) @ torch.stack([plain, *others])
    torch.testing.assert_close(mixed.keys[1][0], expected, rtol=1e-5, atol=1e-6)


def _editor(model, layout, tokenizer, tmp_path, chat: bool, method: str = "memit") -> Editor:
    # alphaedit: a threshold that keeps a real null space for the tiny model's flat spectrum (as test_editor)
    config = EditConfig(method=method, layers=[1, 2], v_num_grad_steps=12, v_lr=0.5, context_template_length=6,
                        mom2_update_weight=1e-3, nullspace_threshold=0.5, chat=chat)
    corpus = CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64)
    return Editor(model, tokenizer, config, layout=layout, corpus=corpus, cache=StatsCache(tmp_path / "home"), show_progress=False)


def test_chat_aware_editing_writes_the_fact_where_the_question_is_asked(llama, chat_tokenizer, tmp_path):
    """One edited layer takes the whole residual: with the chat forms as columns of their own,
    the residual stream at the subject inside the chat question reaches its z; edited through
    the cloze alone it stays where it was. (The tiny random model's output distribution is
    near uniform, so the test reads the residual stream, as tests/test_editor.py does.)"""
    model, layout = llama
    forms = [*QUESTIONED, *(chat_form(chat_tokenizer, r) for r in QUESTIONED)]
    gaps = {}
    for chat in (False, True):
        editor = _editor(copy.deepcopy(model), layout, chat_tokenizer, tmp_path, chat)
        editor.config.layers = [2]
        templates = editor.context_templates()
        z = compute_targets(model, layout, chat_tokenizer, forms, templates, editor.config).z
        before = compute_keys(model, layout, chat_tokenizer, forms, templates, [2], z_layer=2).z_current
        report = editor.edit(QUESTIONED)[0]
        assert editor.edit_forms(QUESTIONED) == (forms if chat else QUESTIONED) and report.requests == 2
        after = compute_keys(editor.model, layout, chat_tokenizer, forms, templates, [2], z_layer=2).z_current
        gaps[chat] = ((z - after).norm(dim=1) / (z - before).norm(dim=1)).tolist()
    # measured: plain [0.02, 0.06 | 0.92, 1.12]; chat-aware [0.29, 0.18 | 0.0003, 0.0001]
    assert min(gaps[False][2:]) > 0.5 and max(gaps[True][2:]) < 0.05, gaps
    assert max(gaps[True][:2]) < 0.5 and max(gaps[False][:2]) < 0.2, gaps


def test_without_a_chat_template_a_question_changes_nothing(fresh_llama_tokenizer_pair, tmp_path):
    model, layout, tokenizer = fresh_llama_tokenizer_pair
    editor = _editor(model, layout, tokenizer, tmp_path, chat=True)
    assert editor.edit_forms(QUESTIONED) == QUESTIONED


@pytest.fixture
def fresh_llama_tokenizer_pair(llama, tokenizer):
    model, layout = llama
    return copy.deepcopy(model), layout, tokenizer


def test_a_question_is_read_from_any_format_and_written_back(tmp_path):
    records = [
        {"prompt": "{} is located in", "subject": "Paris", "target_new": "Rome", "question": "Where is Paris?"},
        {"case_id": 3, "requested_rewrite": {"prompt": "{} plays", "subject": "Messi", "target_new": {"str": "cricket"},
                                              "question": "Which sport does {} play?"}},
    ]
    requests = parse_requests(records, "test")
    assert [r.question for r in requests] == ["Where is {}?", "Which sport does {} play?"]
    assert requests[0].question_text() == "Where is Paris?"
    assert parse_requests([requests[0].to_dict()], "again")[0] == requests[0]
    assert "question" not in EditRequest("{} is", "x", "y").to_dict()


@pytest.mark.parametrize("question, problem", [("", "non-empty"), ("Where is it?", "does not contain the subject"),
                                               ("Is {} near {}?", "2 '{}'"), (7, "non-empty")])
def test_a_bad_question_names_the_record_and_field(question, problem):
    record = {"prompt": "{} is located in", "subject": "Paris", "target_new": "Rome", "question": question}
    with pytest.raises(RequestError, match=f"record 1.*field 'question'.*{problem}"):
        parse_requests([record], "requests.json")


def test_a_state_edited_with_chat_forms_continues_exactly(llama, chat_tokenizer, tmp_path):
    """The journal keeps each request's question, so a saved state continues like an
    uninterrupted sequence: the same columns, the same C_p."""
    model, layout = llama
    straight = _editor(copy.deepcopy(model), layout, chat_tokenizer, tmp_path, chat=True, method="alphaedit")
    straight.edit(QUESTIONED, batch_size=1)
    assert straight.batches[-1].keys[1].shape[0] == 2  # the request's and its chat form's keys join C_p
    first = _editor(copy.deepcopy(model), layout, chat_tokenizer, tmp_path, chat=True, method="alphaedit")
    first.edit(QUESTIONED[:1])
    first.save_state(tmp_path / "state")
    resumed = Editor.load_state(tmp_path / "state", copy.deepcopy(model), chat_tokenizer, cache=StatsCache(tmp_path / "home"), show_progress=False)
    assert resumed.batches[0].requests == QUESTIONED[:1] and resumed.config.chat
    resumed.edit(QUESTIONED[1:])
    for layer in (1, 2):
        torch.testing.assert_close(resumed.preserved[layer], straight.preserved[layer], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(resumed._math_weight(layer), straight._math_weight(layer), rtol=0, atol=1e-6)


def test_a_chat_form_that_shares_its_requests_delta_trains_it_with_half_the_loss(llama, chat_tokenizer):
    """chat_values="shared": the chat form's rows add and train its request's δ (each form half
    of the NLL, one KL row), and z_chat = h0_chat + δ with the chat prompt's own h0. Batched, each
    pair gives what it gives alone."""
    model, layout = llama
    templates = [PLAIN_TEMPLATE, "Therefore, {}", "I think that {}"]
    chats = [chat_form(chat_tokenizer, r) for r in QUESTIONED]
    config = EditConfig(method="memit", layers=[1, 2], v_num_grad_steps=6, v_lr=0.5)
    both = compute_targets(model, layout, chat_tokenizer, [*QUESTIONED, *chats], templates, config, owners=[0, 1, 0, 1])
    h0_chat = compute_keys(model, layout, chat_tokenizer, chats, templates, [2], z_layer=2).z_current
    torch.testing.assert_close(both.h0[2:], h0_chat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both.z[2:] - both.h0[2:], both.z[:2] - both.h0[:2])  # one δ per pair
    assert both.steps[2:] == both.steps[:2] and both.steps[0] > 0
    for i in range(2):
        alone = compute_targets(model, layout, chat_tokenizer, [QUESTIONED[i], chats[i]], templates, config, owners=[0, 0])
        torch.testing.assert_close(alone.z, both.z[[i, i + 2]], rtol=1e-4, atol=1e-5)
    # the loss: before any step (one iteration never steps), the pair's target NLL is the mean of the two forms' own
    first = EditConfig(method="memit", layers=[1, 2], v_num_grad_steps=1)
    pair = compute_targets(model, layout, chat_tokenizer, [QUESTIONED[0], chats[0]], templates, first, owners=[0, 0])
    own = compute_targets(model, layout, chat_tokenizer, [QUESTIONED[0], chats[0]], templates, first)
    assert pair.target_nll[0] == pytest.approx((own.target_nll[0] + own.target_nll[1]) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="must own it"):
        compute_targets(model, layout, chat_tokenizer, [QUESTIONED[0], chats[0], chats[0]], templates, first, owners=[0, 0, 1])


def test_shared_chat_values_in_the_editor(llama, chat_tokenizer, tmp_path):
    """The editor ties each chat form to its request under chat_values="shared" and the edit still
    moves the residual at the subject inside the chat question toward its z."""
    model, layout = llama
    editor = _editor(copy.deepcopy(model), layout, chat_tokenizer, tmp_path, chat=True)
    editor.config.chat_values = "shared"
    forms = editor.edit_forms(QUESTIONED)
    # each form's source request: the requests, then the chat forms of those with a question
    unasked = EditRequest("{} plays the", "Miles Davis", "piano", "trumpet")
    assert [source for source, _ in editor._sourced_forms([QUESTIONED[0], unasked, QUESTIONED[1]])] == [0, 1, 2, 0, 2]
    editor.config.layers = [2]
    templates = editor.context_templates()
    target = compute_targets(model, layout, chat_tokenizer, forms, templates, editor.config, owners=[0, 1, 0, 1]).z
    before = compute_keys(model, layout, chat_tokenizer, forms, templates, [2], z_layer=2).z_current
    editor.edit(QUESTIONED)
    after = compute_keys(editor.model, layout, chat_tokenizer, forms, templates, [2], z_layer=2).z_current
    gaps = ((target - after).norm(dim=1) / (target - before).norm(dim=1)).tolist()
    assert max(gaps[2:]) < 0.05, gaps  # the chat columns reach their z (h0_chat + the shared δ)
    with pytest.raises(ValueError, match="chat_values"):
        EditConfig(method="memit", layers=[1, 2], chat_values="both")


def test_trained_chat_values_write_only_the_plain_columns_with_the_shared_delta(llama, chat_tokenizer, tmp_path):
    """chat_values="trained": the δ is trained as under "shared" (the plain and the chat prompt
    together), but only the requests' own forms get a column: the batch's keys are one per request,
    and the plain forms reach the shared δ's Z."""
    model, layout = llama
    editor = _editor(copy.deepcopy(model), layout, chat_tokenizer, tmp_path, chat=True)
    editor.config.chat_values, editor.config.layers = "trained", [2]
    assert editor.edit_forms(QUESTIONED) == QUESTIONED  # the columns: no chat form
    assert [s for s, _ in editor._sourced_forms(QUESTIONED)] == [0, 1, 0, 1]  # the chat forms still train δ
    templates = editor.context_templates()
    chats = [chat_form(chat_tokenizer, r) for r in QUESTIONED]
    shared = compute_targets(model, layout, chat_tokenizer, [*QUESTIONED, *chats], templates, editor.config, owners=[0, 1, 0, 1])
    plain_only = compute_targets(model, layout, chat_tokenizer, QUESTIONED, templates, editor.config)
    assert not torch.allclose(shared.z[:2], plain_only.z, atol=1e-3)  # the chat rows move δ
    before = compute_keys(model, layout, chat_tokenizer, QUESTIONED, templates, [2], z_layer=2).z_current
    report = editor.edit(QUESTIONED)[0]
    assert all(len(k) == len(QUESTIONED) for k in editor.batches[-1].keys.values())
    assert report.value_norm == pytest.approx(float(shared.z[:2].norm(dim=-1).mean()), rel=1e-4)
    after = compute_keys(editor.model, layout, chat_tokenizer, QUESTIONED, templates, [2], z_layer=2).z_current
    gaps = ((shared.z[:2] - after).norm(dim=1) / (shared.z[:2] - before).norm(dim=1)).tolist()
    assert max(gaps) < 0.1, gaps  # (the projection and α leave a few per cent unwritten)


def test_trained_chat_values_anchor_only_the_written_values(llama, chat_tokenizer, tmp_path):
    """With NAS, chat_values="trained" anchors the plain forms' values alone: the reference norm μ
    is taken over the values written, not over the chat forms that only trained δ."""
    from alphaedit.anchor import reference_norm
    from alphaedit.residual import mlp_contribution

    model, layout = llama
    editor = _editor(copy.deepcopy(model), layout, chat_tokenizer, tmp_path, chat=True)
    editor.config.chat_values, editor.config.value_anchor = "trained", True
    layer = editor.config.z_layer
    templates = editor.context_templates()
    chats = [chat_form(chat_tokenizer, r) for r in QUESTIONED]
    shared = compute_targets(model, layout, chat_tokenizer, [*QUESTIONED, *chats], templates, editor.config, owners=[0, 1, 0, 1])
    m = mlp_contribution(model, layout, layer, compute_keys(model, layout, chat_tokenizer, QUESTIONED, [PLAIN_TEMPLATE], [layer]).keys[layer])
    expected = reference_norm((m + shared.z[:2] - shared.h0[:2]).norm(dim=-1))
    report = editor.edit(QUESTIONED)[0]
    assert report.value_reference == pytest.approx(float(expected), rel=1e-4)
    assert report.values_dropped <= len(QUESTIONED)
