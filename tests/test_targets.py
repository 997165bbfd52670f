"""z optimisation: batched equals one request at a time, and both equal a plain reference."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from transformers import AutoModelForCausalLM, LlamaConfig

from families import FAMILIES, build_family

from alphaedit.config import EditConfig
from alphaedit.layouts import detect_layout
from alphaedit.requests import EditRequest
from alphaedit.rewording import reworded_prompts
from alphaedit.passes import plan_passes
from alphaedit.targets import _flatten, compute_targets, request_rows

pytestmark = pytest.mark.usefixtures("single_thread")

TEMPLATES = ["{}", "The river flows north. {}", "Because of this. {}"]
REQUESTS = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("The valley near {} is", "the river", "green and wide", None),
]


def _config(**overrides) -> EditConfig:
    settings = dict(layers=[1, 2], v_num_grad_steps=10, v_lr=0.5, early_stop_loss=-1.0)
    return EditConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def steerable(vocab_size):
    """A tiny Llama whose δ can steer it: initialised with std 0.3 instead of 0.02.

    At std 0.02, ‖h‖ ≈ 0.1 (the weight decay ‖δ‖/‖h0‖² dwarfs the NLL), logits are nearly
    uniform and attention barely carries the subject position to the last one, so no δ moves
    the prediction; real models have ‖h‖ of tens, peaked logits and working attention.
    """
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=0, pad_token_id=0, initializer_range=0.3,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model, detect_layout(model)


@pytest.fixture(scope="module")
def llama64(steerable):
    model, layout = steerable
    return copy.deepcopy(model).double(), layout


def reference_z(model, layout, tokenizer, request: EditRequest, config: EditConfig, start: torch.Tensor | None = None) -> torch.Tensor:
    """ALGORITHM.md §1.4 written plainly: full logits, torch.optim.Adam, one request; its reworded
    prompts (if the config asks for them) are more prompts, read without a context template. With
    `start` (a warm start, EditConfig.rehearse_warm), the first step sets δ = start − h0 instead of
    Adam's, and Adam's first step is the next one."""
    target = tokenizer(" " + request.target_new, add_special_tokens=False)["input_ids"]
    prompts = [t.format(request.prompt) for t in TEMPLATES]
    prompts += reworded_prompts(request, config.reworded_prompts, config.reword_drop)
    texts = [p.format(request.subject) for p in prompts] + [f"{request.subject} is a"]
    ends = [p.index("{}") + len(request.subject) for p in prompts] + [len(request.subject)]
    rows = [tokenizer(text)["input_ids"] for text in texts]
    lookups = [len(tokenizer(text[:end])["input_ids"]) - 1 for text, end in zip(texts, ends)]
    prompt_lengths = [len(r) for r in rows]
    rows = [r + target[:-1] for r in rows[:-1]] + [rows[-1]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])

    block = model.get_submodule(layout.block(config.z_layer))
    delta = torch.zeros(layout.hidden_size, dtype=torch.float64, requires_grad=True)
    h0 = None

    def hook(_module, _args, output):
        nonlocal h0
        hidden = output[0] if isinstance(output, tuple) else output
        if h0 is None:
            h0 = hidden[0, lookups[0]].detach().clone()
        hidden = hidden.clone()
        for i, idx in enumerate(lookups):
            hidden[i, idx] = hidden[i, idx] + delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(hook)
    optimiser = torch.optim.Adam([delta], lr=config.v_lr)
    kl_init = None
    try:
        for it in range(config.v_num_grad_steps):
            optimiser.zero_grad()
            logp = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
            row_nll = [-sum(logp[i, prompt_lengths[i] - 1 + t, tok] for t, tok in enumerate(target)) / len(target)
                       for i in range(len(prompts))]
            nll = sum(row_nll) / len(prompts)
            asked_nll = sum(row_nll[: len(TEMPLATES)]) / len(TEMPLATES)  # what the nll rule judges: not the copies
            kl_logp = logp[-1, lookups[-1]]
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            kl = config.kl_factor * F.kl_div(kl_init[None], kl_logp[None], log_target=True, reduction="batchmean")
            wd = config.v_weight_decay * delta.norm() / h0.norm() ** 2
            loss = nll + kl + wd
            learnt = asked_nll < config.early_stop_nll if config.early_stop_rule == "nll" else loss < config.early_stop_loss
            if learnt or it == config.v_num_grad_steps - 1:
                break
            loss.backward()
            with torch.no_grad():
                if start is not None and it == 0:
                    delta.copy_(start - h0)
                else:
                    optimiser.step()
                max_norm = config.clamp_norm_factor * h0.norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    finally:
        handle.remove()
    return (h0 + delta).detach()


def test_z_matches_the_plain_reference_in_float64(llama64, tokenizer):
    model, layout = llama64
    config = _config()
    result = compute_targets(model, layout, tokenizer, REQUESTS, TEMPLATES, config)
    for i, request in enumerate(REQUESTS):
        expected = reference_z(model, layout, tokenizer, request, config)
        torch.testing.assert_close(result.z[i], expected, rtol=1e-6, atol=1e-7)
    assert result.steps == [config.v_num_grad_steps - 1] * len(REQUESTS)  # no step on the last iteration


def test_a_warm_start_jumps_to_its_value_then_optimises_as_the_reference(llama64, tokenizer):
    model, layout = llama64
    config = _config()
    cold = compute_targets(model, layout, tokenizer, REQUESTS, TEMPLATES, _config(v_lr=0.2))
    start = cold.z[1] * 1.5  # somewhere else than δ = 0 leads: Adam must take over from the jump
    result = compute_targets(model, layout, tokenizer, REQUESTS, TEMPLATES, config, starts=[None, start, None])
    for i, request in enumerate(REQUESTS):
        expected = reference_z(model, layout, tokenizer, request, config, start if i == 1 else None)
        torch.testing.assert_close(result.z[i], expected, rtol=1e-6, atol=1e-7)
    assert result.steps == [config.v_num_grad_steps - 1] * len(REQUESTS)  # the jump counts as a step
    plain = compute_targets(model, layout, tokenizer, REQUESTS, TEMPLATES, config)
    for i in (0, 2):  # the other requests of the batch are as they would be without it
        torch.testing.assert_close(result.z[i], plain.z[i], rtol=0, atol=0)


def test_a_warm_start_from_a_value_that_works_stops_after_the_jump(llama64, tokenizer):
    model, layout = llama64
    # the nll rule at a level the request reaches only after several steps from δ = 0
    probe = compute_targets(model, layout, tokenizer, REQUESTS[:1], TEMPLATES, _config(v_num_grad_steps=6))
    config = _config(early_stop_rule="nll", early_stop_nll=probe.target_nll[0] + 1e-6, v_num_grad_steps=20)
    cold = compute_targets(model, layout, tokenizer, REQUESTS[:1], TEMPLATES, config)
    assert cold.steps[0] >= 3, cold.steps
    warm = compute_targets(model, layout, tokenizer, REQUESTS[:1], TEMPLATES, config, starts=[cold.z[0]])
    assert warm.steps == [1] and warm.target_nll[0] < config.early_stop_nll
    torch.testing.assert_close(warm.z[0], cold.z[0], rtol=0, atol=1e-12)  # z = h0 + (z_then − h0): the value itself


def test_reworded_prompts_train_delta_as_more_prompts_of_the_reference(llama64, tokenizer):
    model, layout = llama64
    config = _config(reworded_prompts=2, reword_drop=0.5)
    assert all(len(reworded_prompts(r, 2, 0.5)) == 2 for r in REQUESTS)  # the case is meaningful
    result = compute_targets(model, layout, tokenizer, REQUESTS, TEMPLATES, config)
    without = compute_targets(model, layout, tokenizer, REQUESTS, TEMPLATES, _config())
    for i, request in enumerate(REQUESTS):
        expected = reference_z(model, layout, tokenizer, request, config)
        torch.testing.assert_close(result.z[i], expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(result.z[i], without.z[i])  # the copies change what δ learns
    torch.testing.assert_close(result.h0, without.h0)  # h0 is read on the prompt itself, not on a copy


def test_with_reworded_copies_the_nll_rule_judges_the_asked_prompts_alone(llama64, tokenizer):
    model, layout = llama64
    probe = compute_targets(model, layout, tokenizer, REQUESTS, TEMPLATES, _config(v_num_grad_steps=4))
    threshold = sorted(probe.target_nll)[len(REQUESTS) // 2] + 1e-6
    config = _config(early_stop_rule="nll", early_stop_nll=threshold, reworded_prompts=2, reword_drop=0.5)
    result = compute_targets(model, layout, tokenizer, REQUESTS, TEMPLATES, config)
    assert min(result.steps) < config.v_num_grad_steps - 1  # some request stopped early
    for i, request in enumerate(REQUESTS):
        torch.testing.assert_close(result.z[i], reference_z(model, layout, tokenizer, request, config), rtol=1e-6, atol=1e-7)


def test_the_clamp_binds_and_still_matches_the_reference(llama64, tokenizer):
    model, layout = llama64
    config = _config(clamp_norm_factor=0.05, v_num_grad_steps=4)
    result = compute_targets(model, layout, tokenizer, REQUESTS[:1], TEMPLATES, config)
    expected = reference_z(model, layout, tokenizer, REQUESTS[0], config)
    torch.testing.assert_close(result.z[0], expected, rtol=1e-6, atol=1e-7)


def test_the_nll_rule_stops_each_request_when_its_target_is_learnt(llama64, tokenizer):
    model, layout = llama64
    # a threshold between the requests' NLL after a few steps: some stop early, others run on
    probe = compute_targets(model, layout, tokenizer, REQUESTS, TEMPLATES, _config(v_num_grad_steps=4))
    threshold = sorted(probe.target_nll)[len(REQUESTS) // 2] + 1e-6
    config = _config(early_stop_rule="nll", early_stop_nll=threshold, early_stop_loss=1e9)  # the loss rule would stop at once
    result = compute_targets(model, layout, tokenizer, REQUESTS, TEMPLATES, config)
    assert len(set(result.steps)) > 1 and min(result.steps) < config.v_num_grad_steps - 1
    for i, request in enumerate(REQUESTS):
        expected = reference_z(model, layout, tokenizer, request, config)
        torch.testing.assert_close(result.z[i], expected, rtol=1e-6, atol=1e-7)
        if result.steps[i] < config.v_num_grad_steps - 1:
            assert result.target_nll[i] < threshold  # stopped: learnt
    # the final NLL is the loss's first term: the loss adds the non-negative KL and weight decay
    assert all(n <= l + 1e-9 for n, l in zip(result.target_nll, result.loss))


@pytest.mark.parametrize("requests_per_pass", [1, 2, 16])
def test_batched_z_equals_each_request_alone_with_early_stops(llama64, tokenizer, requests_per_pass):
    # float64: in float32, padding to another batch width changes matmul rounding (~1e-6),
    # which Adam's sign-like first steps amplify; the algorithm is the same either way.
    model, layout = llama64
    # An early-stop threshold that the easiest request reaches after a few steps and the others
    # never do, so requests leave the batch at different iterations.
    probe = compute_targets(model, layout, tokenizer, [REQUESTS[2]], TEMPLATES, _config(v_num_grad_steps=5))
    config = _config(early_stop_loss=probe.loss[0] + 1e-4)
    alone = [compute_targets(model, layout, tokenizer, [r], TEMPLATES, config) for r in REQUESTS]
    batched = compute_targets(model, layout, tokenizer, REQUESTS, TEMPLATES, config, requests_per_pass=requests_per_pass)
    assert len({a.steps[0] for a in alone}) > 1  # the case is meaningful: requests stopped at different steps
    assert batched.steps == [a.steps[0] for a in alone]
    for i, a in enumerate(alone):
        torch.testing.assert_close(batched.z[i], a.z[0], rtol=1e-9, atol=1e-9)
        assert batched.loss[i] == pytest.approx(a.loss[0], rel=1e-9)



# --- the cached prefix: passes start at δ's position and reuse the earlier tokens' keys/values ---


def _z(model, layout, tokenizer, requests, config, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cache must be used, not silently abandoned
        return compute_targets(model, layout, tokenizer, requests, TEMPLATES, config, **kwargs)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_cached_prefix_equals_plain_passes_on_every_family(model_type, tokenizer):
    model = build_family(model_type, vocab_size=len(tokenizer), num_hidden_layers=3, n_layer=3)
    layout = detect_layout(model)
    config = _config(layers=[0, 1], v_num_grad_steps=4)
    cached = _z(model, layout, tokenizer, REQUESTS, config)
    plain = _z(model, layout, tokenizer, REQUESTS, dataclasses.replace(config, v_prefix_cache=False))
    # float32: the two passes multiply differently shaped matrices (rounding ~1e-6, which
    # Adam's sign-like steps can amplify a little)
    torch.testing.assert_close(cached.z, plain.z, rtol=1e-4, atol=1e-4)
    assert cached.loss == pytest.approx(plain.loss, rel=1e-4, abs=1e-5)


def test_a_sliding_window_narrower_than_the_rows_falls_back_to_plain_passes(tokenizer):
    """Cached prefixes do not see a sliding window that cuts into the row: the per-batch check
    notices (log-probabilities move), warns, and the z optimisation runs whole rows instead."""
    model = build_family("gemma3_text", vocab_size=len(tokenizer), num_hidden_layers=3, sliding_window=4)
    layout = detect_layout(model)
    config = _config(layers=[0, 1], v_num_grad_steps=4)
    with pytest.warns(UserWarning, match="runs full passes"):
        fallback = compute_targets(model, layout, tokenizer, REQUESTS, TEMPLATES, config)
    plain = _z(model, layout, tokenizer, REQUESTS, dataclasses.replace(config, v_prefix_cache=False))
    torch.testing.assert_close(fallback.z, plain.z, rtol=0, atol=0)


def _single_token_word(tokenizer) -> str:
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2)
    return next(w for w in words if len(tokenizer(w)["input_ids"]) == 1)


@pytest.mark.parametrize("templates", [TEMPLATES, ["{}"]], ids=["context", "plain"])
@pytest.mark.parametrize("requests_per_pass", [1, 2, 16])
def test_rows_without_a_prefix_mix_with_cached_ones(llama64, tokenizer, requests_per_pass, templates):
    # A one-token subject at the very start puts δ at position 0: that request's plain-template
    # and KL rows have nothing before δ, and with the plain template only, none of its rows has.
    # Two per pass, it sits alone in its first chunk (no prefix to cache at all with the plain
    # template) and shares one with a cached request once an early stop reshuffles the chunks.
    model, layout = llama64
    first = EditRequest("{} is a city in", _single_token_word(tokenizer), "Spain", None)
    assert min(request_rows(tokenizer, first, templates).lookup) == 0
    requests = [REQUESTS[1], REQUESTS[0], first]
    config = _config(early_stop_loss=-1.0)
    plain = compute_targets(model, layout, tokenizer, requests, templates, dataclasses.replace(config, v_prefix_cache=False))
    config.early_stop_loss = sorted(plain.loss)[1] + 1e-3  # some requests stop early, another runs on
    plain = compute_targets(model, layout, tokenizer, requests, templates, dataclasses.replace(config, v_prefix_cache=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached = compute_targets(model, layout, tokenizer, requests, templates, config, requests_per_pass=requests_per_pass)
    assert len(set(plain.steps)) > 1
    assert cached.steps == plain.steps
    torch.testing.assert_close(cached.z, plain.z, rtol=1e-9, atol=1e-9)


def test_a_model_that_ignores_positions_falls_back_to_plain_passes(llama64, tokenizer, monkeypatch):
    # Dropping position_ids makes rotary positions follow the cache index instead of each row's
    # own length: the δ = 0 probe sees the difference and the optimisation runs plain passes.
    model, layout = llama64
    config = _config(v_num_grad_steps=3)
    plain = compute_targets(model, layout, tokenizer, REQUESTS, TEMPLATES, dataclasses.replace(config, v_prefix_cache=False))
    forward = model.base_model.forward

    def without_positions(*args, position_ids=None, **kwargs):
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.base_model, "forward", without_positions)
    with pytest.warns(UserWarning, match="runs full passes.*does not honour the cache or the positions"):
        result = compute_targets(model, layout, tokenizer, REQUESTS, TEMPLATES, config)
    torch.testing.assert_close(result.z, plain.z, rtol=1e-9, atol=1e-9)


def test_a_bf16_model_keeps_delta_in_float32_and_its_prefix_cache(steerable, tokenizer):
    # bf16 rounding differs between cut and whole rows; the probe's half-precision tolerance
    # must accept it (no fallback warning), and z must stay close to the float32 model's.
    model, layout = steerable
    config = _config(v_num_grad_steps=4)
    half = _z(copy.deepcopy(model).to(torch.bfloat16), layout, tokenizer, REQUESTS, config)
    full = _z(model, layout, tokenizer, REQUESTS, config)
    assert half.z.dtype == torch.float32
    assert ((half.z - full.z).norm(dim=-1) / full.z.norm(dim=-1)).max() < 0.05


def test_the_optimisation_leaves_no_weight_gradients_and_restores_flags(steerable, tokenizer):
    # Only δ is optimised: weight gradients would double the backward pass and stay on the
    # user's model as a full-size copy.
    model, layout = steerable
    model = copy.deepcopy(model)
    model.lm_head.weight.requires_grad_(False)  # a flag the caller chose survives
    compute_targets(model, layout, tokenizer, REQUESTS, TEMPLATES, _config(v_num_grad_steps=3))
    assert all(p.grad is None for p in model.parameters())
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["lm_head.weight"]


def test_passes_pack_rows_by_length_and_one_request_per_pass_keeps_them_together(tokenizer):
    rows = [row for i, r in enumerate(REQUESTS) for row in _flatten(i, request_rows(tokenizer, r, TEMPLATES))]
    for split in (True, False):
        alone = plan_passes(rows, [0, 2], 1, split)
        assert [{rows[i].owner for i in p} for p in alone] == [{0}, {2}]
        assert sorted(i for p in alone for i in p) == [i for i, r in enumerate(rows) if r.owner in (0, 2)]
        packed = plan_passes(rows, [0, 1, 2], 2, split)
        assert sorted(i for p in packed for i in p) == list(range(len(rows)))
        lengths = [rows[i].suffix_length(split) for p in packed for i in p]
        assert lengths == sorted(lengths)  # so each pass pads its rows to a similar length
        budget = 2 * sum(lengths) / len(REQUESTS)  # two requests' worth of tokens
        assert all(len(p) * max(rows[i].suffix_length(split) for i in p) <= budget for p in packed if len(p) > 1)


def test_shared_stems_are_the_longest_token_prefixes_rows_share():
    from alphaedit.passes import shared_stems

    prefixes = {0: [5, 6, 7, 1], 1: [5, 6, 7, 2, 3], 2: [5, 6, 7, 2, 4], 3: [9, 1], 4: [9, 2, 2], 5: [5, 6]}
    # rows 1 and 2 share four tokens, row 0 three with them, row 5 is its whole prefix shared;
    # rows 3 and 4 share one token, under the minimum: no stem
    assert shared_stems(prefixes) == {0: 3, 1: 4, 2: 4, 3: 0, 4: 0, 5: 2}


@pytest.mark.parametrize("tokens_per_pass", [2048, 24])
def test_prefixes_run_after_shared_stems_give_each_rows_own_keys_and_values(llama64, tokenizer, tokens_per_pass):
    """Every request's row of a template starts with the template's tokens: they run once, and
    each row's rest runs against them. The keys and values equal a plain pass over each whole
    prefix (float64), for rows with and without a stem, in one pass or in many."""
    from alphaedit.passes import prefix_passes, shared_stems

    model, _ = llama64
    requests = [*REQUESTS, EditRequest("{} is a city in", "Madrid", "Spain", None)]
    rows = [row for i, r in enumerate(requests) for row in _flatten(i, request_rows(tokenizer, r, TEMPLATES))]
    prefixes = {i: row.ids[: row.lookup] for i, row in enumerate(rows) if row.lookup > 0}
    stems = shared_stems(prefixes)
    assert sum(stems.values()) > sum(len(p) for p in prefixes.values()) / 3  # the templates are shared
    assert 0 in stems.values()  # and some rows (the KL rows' subjects) share nothing
    seen = []
    for chosen, layers in prefix_passes(rows, model, tokenizer, tokens_per_pass):
        seen += chosen
        for k, i in enumerate(chosen):
            alone = prefix_passes([rows[i]], model, tokenizer)  # one row: no stem to share
            ((_, expected),) = list(alone)
            n = len(prefixes[i])
            for (keys, values), (ek, ev) in zip(layers, expected):
                torch.testing.assert_close(keys[k, :, :n], ek[0, :, :n], rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(values[k, :, :n], ev[0, :, :n], rtol=1e-10, atol=1e-10)
                assert not keys[k, :, n:].any() and not values[k, :, n:].any()  # padding after the prefix is zero
    assert sorted(seen) == sorted(prefixes)
