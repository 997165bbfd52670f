"""Prompt filling/encoding (subject's last token) and template-averaged keys (ALGORITHM.md §1.3, §1.5)."""

from __future__ import annotations

import copy

import pytest
import torch

from alphaedit.generate import generate_context_templates
from alphaedit.keys import KeyReader, compute_keys, template_weights
from alphaedit.layouts import get_module, mlp_out_weight
from alphaedit.prompts import (
    batch_rows,
    encode,
    fill,
    kl_prompt,
    target_ids,
)
from alphaedit.requests import EditRequest

pytestmark = pytest.mark.usefixtures("single_thread")

REQUESTS = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"),
    EditRequest("I went to {}", "Paris", "London"),
]
TEMPLATES = ["{}", "Because the river flows north. {}", "I. {}"]


def _reference_index(tokenizer, text: str, subject_end: int) -> int:
    """As the reference code does: tokenise the text up to the subject's end on its own (with specials)."""
    return len(tokenizer(text[:subject_end])["input_ids"]) - 1


# --------------------------------------------------------------------------- fill / encode


def test_fill_wraps_the_prompt_in_the_template_and_marks_the_subject_end():
    filled = fill("Because the river flows north. {}", REQUESTS[0])
    assert filled.text == "Because the river flows north. The mother tongue of Danielle Darrieux is"
    assert filled.text[: filled.subject_end].endswith("of Danielle Darrieux")
    assert filled.text[filled.subject_end :] == " is"


def test_fill_keeps_braces_in_subject_and_prompt_literal():
    request = EditRequest("In {year}, {} lived in", "{Odd} Subject {}", "Rome")
    filled = fill("A. {}", request)
    assert filled.text == "A. In {year}, {Odd} Subject {} lived in"
    assert filled.text[: filled.subject_end] == "A. In {year}, {Odd} Subject {}"


def test_kl_prompt_is_subject_is_a():
    filled = kl_prompt(REQUESTS[1])
    assert filled.text == "The Eiffel Tower is a" and filled.subject_end == len("The Eiffel Tower")


@pytest.mark.parametrize("request_index", [0, 1, 2], ids=["middle", "start", "end"])
def test_encode_finds_the_subjects_last_token(tokenizer, request_index):
    request = REQUESTS[request_index]
    filled = fill("{}", request)
    ids, index = encode(tokenizer, filled)
    assert ids == tokenizer(filled.text)["input_ids"]
    assert index == _reference_index(tokenizer, filled.text, filled.subject_end)
    assert tokenizer.decode(ids[: index + 1]).endswith(request.subject)
    assert tokenizer.decode(ids[index + 1 :]) == filled.text[filled.subject_end :]
    if request_index == 2:
        assert index == len(ids) - 1


def test_encode_counts_the_bos_token(tokenizer, bos_tokenizer):
    filled = fill("I. {}", REQUESTS[0])
    ids, index = encode(tokenizer, filled)
    bos_ids, bos_index = encode(bos_tokenizer, filled)
    assert bos_ids == [bos_tokenizer.bos_token_id] + ids
    assert bos_index == index + 1 == _reference_index(bos_tokenizer, filled.text, filled.subject_end)


def test_batch_rows_right_pads_with_the_pad_token(tokenizer):
    prompts = [fill("{}", REQUESTS[2]), fill(TEMPLATES[1], REQUESTS[0])]
    short, short_index = encode(tokenizer, prompts[0])
    long_, long_index = encode(tokenizer, prompts[1])
    batch = batch_rows(tokenizer, [short, long_], [len(short) - 1, long_index])
    assert batch.input_ids.shape == (2, len(long_))
    assert batch.input_ids[0, : len(short)].tolist() == short
    assert set(batch.input_ids[0, len(short) :].tolist()) == {tokenizer.pad_token_id}
    assert batch.attention_mask.sum(1).tolist() == [len(short), len(long_)]
    assert batch.lookup.tolist() == [len(short) - 1, long_index]


def test_target_ids_have_a_leading_space_and_no_bos(bos_tokenizer):
    expected = bos_tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert target_ids(bos_tokenizer, "Paris") == target_ids(bos_tokenizer, " Paris") == expected


def test_context_templates_are_seeded_and_wrap_the_prompt(llama, tokenizer):
    model, _ = llama
    words = ["The", "Because"]
    torch.manual_seed(1)
    first = generate_context_templates(model, tokenizer, words, length=6, seed=5)
    torch.manual_seed(2)
    again = generate_context_templates(model, tokenizer, words, length=6, seed=5)
    assert first == again and len(first) == 3 and first[0] == "{}"
    for word, template in zip(words, first[1:]):
        assert template.startswith(word) and template.endswith(". {}") and template.count("{") == 1


# --------------------------------------------------------------------------- keys


def test_template_weights_give_half_to_the_plain_prompt():
    torch.testing.assert_close(template_weights(6), torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1]))
    torch.testing.assert_close(template_weights(1), torch.ones(1))


def _reference_keys(model, layout, tokenizer, layers, z_layer):
    """Per request and template, a separate forward pass; keys at the subject's last token, weighted mean."""
    T = len(TEMPLATES)
    weights = [0.5] + [1 / (2 * (T - 1))] * (T - 1)
    keys = {layer: [] for layer in layers}
    z = []
    for request in REQUESTS:
        per_layer = {layer: torch.zeros(layout.key_size, dtype=torch.float64) for layer in layers}
        for t, (template, weight) in enumerate(zip(TEMPLATES, weights)):
            wrapped = template.format(request.prompt)
            text = wrapped.format(request.subject)
            subject_end = wrapped.index("{}") + len(request.subject)
            ids = tokenizer(text)["input_ids"]
            index = _reference_index(tokenizer, text, subject_end)
            seen, handles = {}, []
            for layer in layers:
                module = get_module(model, layout.mlp_out_path(layer))
                handles.append(module.register_forward_pre_hook(lambda _m, a, layer=layer: seen.__setitem__(layer, a[0])))
            block = get_module(model, layout.block(z_layer))
            handles.append(block.register_forward_hook(lambda _m, _a, out: seen.__setitem__("z", out)))
            try:
                with torch.no_grad():
                    model(input_ids=torch.tensor([ids]))
            finally:
                for handle in handles:
                    handle.remove()
            for layer in layers:
                per_layer[layer] += weight * seen[layer][0, index].double()
            if t == 0:
                z.append(seen["z"][0, index])
        for layer in layers:
            keys[layer].append(per_layer[layer])
    return {layer: torch.stack(k) for layer, k in keys.items()}, torch.stack(z)


@pytest.fixture(params=[("llama", "tokenizer"), ("gpt2", "bos_tokenizer")], ids=["llama", "gpt2-bos"])
def setup(request):
    model_name, tokenizer_name = request.param
    model, layout = request.getfixturevalue(model_name)
    return model, layout, request.getfixturevalue(tokenizer_name)


def test_compute_keys_equals_per_prompt_reference(setup):
    model, layout, tokenizer = setup
    layers = [1, 2]
    result = compute_keys(model, layout, tokenizer, REQUESTS, TEMPLATES, layers, z_layer=2)
    expected_keys, expected_z = _reference_keys(model, layout, tokenizer, layers, z_layer=2)
    for layer in layers:
        assert result.keys[layer].shape == (len(REQUESTS), layout.key_size)
        assert result.keys[layer].dtype == torch.float32
        torch.testing.assert_close(result.keys[layer].double(), expected_keys[layer], rtol=1e-5, atol=1e-6)
    assert result.z_current.shape == (len(REQUESTS), layout.hidden_size)
    torch.testing.assert_close(result.z_current, expected_z, rtol=1e-5, atol=1e-5)


def test_compute_keys_do_not_depend_on_rows_per_pass(setup):
    model, layout, tokenizer = setup
    small = compute_keys(model, layout, tokenizer, REQUESTS, TEMPLATES, [1, 2], z_layer=3, rows_per_pass=1)
    large = compute_keys(model, layout, tokenizer, REQUESTS, TEMPLATES, [1, 2], z_layer=3, rows_per_pass=1000)
    for layer in (1, 2):
        torch.testing.assert_close(small.keys[layer], large.keys[layer], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(small.z_current, large.z_current, rtol=1e-5, atol=1e-6)


def test_compute_keys_without_z_layer_stops_after_the_deepest_w_out(llama, tokenizer):
    model, layout = llama
    calls = []
    handle = get_module(model, layout.block(2)).register_forward_hook(lambda *_: calls.append(1))
    try:
        result = compute_keys(model, layout, tokenizer, REQUESTS, TEMPLATES, [0, 1])
    finally:
        handle.remove()
    assert result.z_current is None and sorted(result.keys) == [0, 1]
    assert calls == []
    expected, _ = _reference_keys(model, layout, tokenizer, [0, 1], z_layer=1)
    torch.testing.assert_close(result.keys[1].double(), expected[1], rtol=1e-5, atol=1e-6)


def test_z_layer_below_the_keys_layers_is_read_in_the_same_pass(llama, tokenizer):
    model, layout = llama
    result = compute_keys(model, layout, tokenizer, REQUESTS, TEMPLATES, [2, 3], z_layer=1)
    _, expected_z = _reference_keys(model, layout, tokenizer, [2], z_layer=1)
    torch.testing.assert_close(result.z_current, expected_z, rtol=1e-5, atol=1e-5)


def test_a_reader_replays_unchanged_blocks_and_reads_what_a_fresh_pass_reads(llama, tokenizer):
    # As the editor does: read layer 1, change W_out of layer 1, read layer 2 saying that blocks
    # below 1 did not change. Block 0 must not run again, and the keys and z must be those of a
    # fresh pass on the changed model.
    model, layout = llama
    model = copy.deepcopy(model)
    reader = KeyReader(model, layout, tokenizer, REQUESTS, TEMPLATES, rows_per_pass=4)
    reader.read([1], z_layer=3)
    with torch.no_grad():
        mlp_out_weight(model, layout, 1).mul_(1.5)
    calls = []
    handle = get_module(model, layout.mlp_out_path(0)).register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        replayed = reader.read([2], z_layer=3, unchanged_below=1)
    finally:
        handle.remove()
    fresh = compute_keys(model, layout, tokenizer, REQUESTS, TEMPLATES, [2], z_layer=3)
    assert calls == []  # block 0 was replayed, not run
    torch.testing.assert_close(replayed.keys[2], fresh.keys[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(replayed.z_current, fresh.z_current, rtol=1e-5, atol=1e-6)
    stale = reader.read([2], z_layer=3, unchanged_below=0)  # nothing promised: runs every block
    torch.testing.assert_close(stale.keys[2], fresh.keys[2], rtol=1e-5, atol=1e-6)
