"""The Editor on tiny models: the batch loop, state save/load, refusals."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

from alphaedit.config import EditConfig
from alphaedit.editor import Editor
from alphaedit.journal import JournalError
from alphaedit.keys import compute_keys
from alphaedit.layouts import detect_layout, mlp_out_weight
from alphaedit.requests import EditRequest, RequestError
from alphaedit.stats import CorpusSpec, StatsCache
from alphaedit.targets import compute_targets
from conftest import WIKITEXT
from families import build_family

pytestmark = pytest.mark.usefixtures("single_thread")

REQUESTS = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("The valley near {} is", "the river", "green", None),
    EditRequest("{} flows through the city of", "The Seine", "Berlin", "Paris"),
]


def _config(method: str = "alphaedit", **overrides) -> EditConfig:
    # A threshold that keeps a real null space for the tiny model's flat spectrum.
    settings = dict(layers=[1, 2], v_num_grad_steps=4, v_lr=0.5, nullspace_threshold=0.5, context_template_length=6)
    return EditConfig(method=method, **{**settings, **overrides})


def _editor(model_and_layout, tokenizer, tmp_path, method="alphaedit", **overrides) -> Editor:
    model, layout = model_and_layout
    corpus = CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64)
    return Editor(model, tokenizer, _config(method, **overrides), layout=layout, corpus=corpus,
                  cache=StatsCache(tmp_path / "home"), show_progress=False)


@pytest.fixture
def fresh_llama(llama):
    model, layout = llama
    return copy.deepcopy(model), layout


@pytest.fixture
def fresh_gpt2(gpt2):
    model, layout = gpt2
    return copy.deepcopy(model), layout


def _post_norm_model(model_type: str, vocab_size: int):
    """A 4-layer family whose blocks normalise the MLP output before the residual add."""
    model = build_family(model_type, vocab_size=vocab_size, num_hidden_layers=4, rms_norm_eps=1e-12)
    return model, detect_layout(model)


def _weights(editor: Editor) -> dict[int, torch.Tensor]:
    return {l: mlp_out_weight(editor.model, editor.layout, l).detach().clone() for l in editor.config.layers}


def _one_layer_edit(model_and_layout, tokenizer, tmp_path) -> tuple[float, float]:
    """‖z − z_current‖ before and after a MEMIT edit that writes the whole residual into layer 2."""
    editor = _editor(model_and_layout, tokenizer, tmp_path, method="memit", layers=[2], mom2_update_weight=1e-3)
    model, layout = model_and_layout
    templates = editor.context_templates()
    z = compute_targets(model, layout, tokenizer, REQUESTS[:2], templates, editor.config).z
    before = compute_keys(model, layout, tokenizer, REQUESTS[:2], templates, [2], z_layer=2).z_current
    editor._edit_batch(REQUESTS[:2])
    after = compute_keys(model, layout, tokenizer, REQUESTS[:2], templates, [2], z_layer=2).z_current
    return float((z - before).norm()), float((z - after).norm())


@pytest.mark.parametrize("family", ["fresh_llama", "fresh_gpt2", "gemma2", "gemma3_text"])
def test_one_layer_edit_moves_the_residual_towards_z(family, tokenizer, vocab_size, tmp_path, request):
    """With a single edited layer the whole residual is written there: z_current approaches z,
    also where the block normalises the MLP output before adding it (Gemma-2/3: residual.py)."""
    model_and_layout = request.getfixturevalue(family) if family.startswith("fresh") else _post_norm_model(family, vocab_size)
    before, after = _one_layer_edit(model_and_layout, tokenizer, tmp_path)
    # a normalised output has a fixed size, so only its direction can move: part of z stays out of reach
    assert after < (0.2 if family.startswith("fresh") else 0.5) * before


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_without_the_post_norm_mapping_the_residual_misses_z(family, tokenizer, vocab_size, tmp_path):
    """The mapping is what makes the edit land: asked for the residual change itself, W_out's
    output takes it whole, and the norm rescales that to a vector of the layer's fixed size."""
    model, layout = _post_norm_model(family, vocab_size)
    before, after = _one_layer_edit((model, dataclasses.replace(layout, mlp_out_norm=None)), tokenizer, tmp_path)
    assert after > before  # the raw residual swamps the small output: the norm turns it far past z


def test_alphaedit_keeps_each_update_in_the_null_space(fresh_llama, tokenizer, tmp_path):
    probe = _editor(fresh_llama, tokenizer, tmp_path, method="memit")
    # the tiny model's spectrum is its own: put the threshold at the median eigenvalue
    threshold = min(torch.linalg.eigvalsh(s.second_moment.double()).median().item() for s in probe.statistics().values())
    editor = _editor(fresh_llama, tokenizer, tmp_path, nullspace_threshold=threshold)
    before = _weights(editor)
    editor.edit(REQUESTS[:2])
    for layer, weight in _weights(editor).items():
        delta = weight - before[layer]
        projector = editor.statistics()[layer].projector
        assert delta.norm() > 0
        torch.testing.assert_close(delta @ projector, delta, atol=1e-5, rtol=1e-4)
        assert 0 < editor.projector_rank[layer] < editor.layout.key_size


def test_preserved_keys_accumulate_only_for_methods_that_use_them(tokenizer, tmp_path, llama):
    for method, accumulates in (("alphaedit", True), ("memit-seq", True), ("memit", False)):
        model, layout = llama
        editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, method=method)
        editor.edit(REQUESTS[:2])
        assert all((c.abs().sum() > 0) == accumulates for c in editor.preserved.values()), method


def test_preserved_keys_are_the_keys_of_the_edited_model(llama, tokenizer, tmp_path):
    # C_p must hold Σ k kᵀ of the batch's keys read on the model after the edit (the reference
    # recomputes them in a final pass; the editor reuses the per-layer keys, which are the same).
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path)
    editor.edit(REQUESTS)
    after = compute_keys(editor.model, layout, tokenizer, REQUESTS, editor.context_templates(), editor.config.layers).keys
    for layer, keys in after.items():
        torch.testing.assert_close(editor.preserved[layer], keys.T @ keys, rtol=1e-4, atol=1e-6)


def test_a_conflicting_batch_changes_nothing(fresh_llama, tokenizer, tmp_path):
    editor = _editor(fresh_llama, tokenizer, tmp_path)
    before = _weights(editor)
    clash = EditRequest(REQUESTS[0].prompt, REQUESTS[0].subject, "German", "French")
    with pytest.raises(RequestError, match="target"):
        editor.edit([REQUESTS[1], REQUESTS[2], REQUESTS[0], clash], batch_size=2)  # the clash is in batch 2
    assert all(torch.equal(before[l], w) for l, w in _weights(editor).items())
    assert editor.history == []


def test_layers_outside_the_model_are_refused(fresh_llama, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="do not exist"):
        _editor(fresh_llama, tokenizer, tmp_path, layers=[3, 4])


def test_saved_state_continues_exactly_like_an_uninterrupted_sequence(llama, tokenizer, tmp_path):
    model, layout = llama
    straight = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path)
    straight.edit(REQUESTS, batch_size=2)

    first = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path)
    first.edit(REQUESTS[:2])
    first.save_state(tmp_path / "state")
    resumed = Editor.load_state(tmp_path / "state", copy.deepcopy(model), tokenizer, cache=StatsCache(tmp_path / "home"), show_progress=False)
    assert resumed.templates == first.templates and len(resumed.history) == 1
    resumed.edit(REQUESTS[2:])

    for layer, weight in _weights(straight).items():
        torch.testing.assert_close(_weights(resumed)[layer], weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(resumed.preserved[layer], straight.preserved[layer], rtol=1e-6, atol=1e-6)
    assert [r.index for r in resumed.history] == [0, 1]


def test_a_state_from_another_base_model_is_refused(llama, tokenizer, tmp_path):
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path)
    editor.edit(REQUESTS[:1])
    editor.save_state(tmp_path / "state")
    other = copy.deepcopy(model)
    with torch.no_grad():
        mlp_out_weight(other, layout, 1).add_(0.01)
    with pytest.raises(ValueError, match="another base model"):
        Editor.load_state(tmp_path / "state", other, tokenizer, show_progress=False)


def test_a_corrupted_state_is_refused(llama, tokenizer, tmp_path):
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path)
    editor.edit(REQUESTS[:1])
    editor.save_state(tmp_path / "state")
    update = tmp_path / "state" / "batches" / "000000" / "update.safetensors"
    data = bytearray(update.read_bytes())
    data[-1] ^= 0xFF
    update.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="checksum"):
        Editor.load_state(tmp_path / "state", copy.deepcopy(model), tokenizer, show_progress=False)


def test_the_efficacy_probe_uses_the_editors_layout_not_a_fresh_detection(fresh_llama, tokenizer, tmp_path, monkeypatch):
    """A model that needs --layout must not fail in the post-edit check (audit finding 3)."""
    import alphaedit.teacher_forcing

    editor = _editor(fresh_llama, tokenizer, tmp_path)

    def undetectable(model, *args, **kwargs):
        raise AssertionError("the layout was detected again instead of using the editor's")

    monkeypatch.setattr(alphaedit.teacher_forcing, "detect_layout", undetectable)
    (report,) = editor.edit(REQUESTS[:2])
    assert report.efficacy is not None


def _room_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "null space leaves" in str(w.message)]


def test_a_batch_wider_than_the_null_space_is_told_once_and_still_applied(fresh_llama, tokenizer, tmp_path):
    # P keeps exactly two directions per layer (the "rank" rule), so a projected update can write
    # at most two independent columns: a third cannot all take
    editor = _editor(fresh_llama, tokenizer, tmp_path, projector_rule="rank", nullspace_threshold=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        editor.edit(REQUESTS[:2])
    assert editor.projector_rank == {1: 2, 2: 2} and _room_warnings(caught) == []
    before = _weights(editor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        editor.edit(REQUESTS[:3])
        editor.edit(REQUESTS[1:4])  # said once per editor
    said = _room_warnings(caught)
    assert len(said) == 1 and "3 columns" in said[0] and "the 2 directions layer 1's" in said[0] and "smaller batches" in said[0]
    assert len(editor.batches) == 3 and not torch.equal(_weights(editor)[1], before[1])  # a warning, not a refusal


def test_memit_has_no_null_space_to_outgrow(fresh_llama, tokenizer, tmp_path):
    editor = _editor(fresh_llama, tokenizer, tmp_path, method="memit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        editor.edit(REQUESTS)
    assert editor.projector_rank == {} and _room_warnings(caught) == []
