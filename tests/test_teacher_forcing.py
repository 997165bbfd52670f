"""Teacher-forced scores, batched and length-sorted, against one pair at a time with full logits."""

from __future__ import annotations

import pytest
import torch

from alphaedit.teacher_forcing import continuation_accuracy, continuation_nll, new_margin, prefers_new

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["The Eiffel Tower is located in the city of", "Paris is", "The river flows north, and the valley near the river is", "A"]
CONTINUATIONS = ["Rome", "a city of light", "green", "Paris"]


def _reference(model, tokenizer, prompt: str, continuation: str) -> tuple[float, float]:
    prompt_ids = tokenizer(prompt)["input_ids"]
    cont_ids = tokenizer(" " + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + cont_ids])).logits[0].double()
    predicting = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(cont_ids)]
    logp = predicting.log_softmax(-1)[torch.arange(len(cont_ids)), torch.tensor(cont_ids)]
    top1 = (predicting.argmax(-1) == torch.tensor(cont_ids)).double().mean()
    return float(-logp.mean()), float(top1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("which_tokenizer", ["tokenizer", "bos_tokenizer"])
def test_batched_scores_equal_one_pair_at_a_time(family, which_tokenizer, request):
    model, _ = request.getfixturevalue(family)
    tokenizer = request.getfixturevalue(which_tokenizer)
    expected = [_reference(model, tokenizer, p, c) for p, c in zip(PROMPTS, CONTINUATIONS)]
    nll = continuation_nll(model, tokenizer, PROMPTS, CONTINUATIONS)
    accuracy = continuation_accuracy(model, tokenizer, PROMPTS, CONTINUATIONS)
    for i, (ref_nll, ref_acc) in enumerate(expected):
        assert nll[i].item() == pytest.approx(ref_nll, rel=1e-4, abs=1e-5)
        assert accuracy[i] == pytest.approx(ref_acc)


def test_prefers_new_compares_mean_token_nll(llama, tokenizer):
    model, _ = llama
    nll_new = continuation_nll(model, tokenizer, PROMPTS, CONTINUATIONS)
    nll_true = continuation_nll(model, tokenizer, PROMPTS, list(reversed(CONTINUATIONS)))
    wins = prefers_new(model, tokenizer, PROMPTS, CONTINUATIONS, list(reversed(CONTINUATIONS)))
    assert wins.tolist() == (nll_new < nll_true).tolist()


def test_new_margin_is_the_true_objects_nll_minus_the_new_ones(llama, tokenizer):
    """The margin prefers_new thresholds at 0, against one pair at a time with full logits."""
    model, _ = llama
    true = list(reversed(CONTINUATIONS))
    margin = new_margin(model, tokenizer, PROMPTS, CONTINUATIONS, true)
    for i, prompt in enumerate(PROMPTS):
        expected = _reference(model, tokenizer, prompt, true[i])[0] - _reference(model, tokenizer, prompt, CONTINUATIONS[i])[0]
        assert margin[i].item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert prefers_new(model, tokenizer, PROMPTS, CONTINUATIONS, true).tolist() == (margin > 0).tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pairs_after_one_prompt_share_rows_and_score_as_one_pair_at_a_time(family, request, tokenizer):
    """CounterFact's layout: every prompt scored with two objects, one- and several-token ones,
    a continuation that extends another, and a repeated pair. Rows are shared (fewer rows than
    pairs reach the model), and every pair still scores as its own full-logits pass."""
    model, _ = request.getfixturevalue(family)
    objects = [("Rome", "Paris"), ("a city of light", "a city"), ("green", "green"), ("Paris", "a city of light")]
    prompts = [p for p in PROMPTS for _ in range(2)] + [PROMPTS[0]]
    continuations = [c for pair in objects for c in pair] + ["Rome"]
    rows_seen = []
    handle = model.base_model.register_forward_pre_hook(lambda m, a, kw: rows_seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        nll = continuation_nll(model, tokenizer, prompts, continuations)
        accuracy = continuation_accuracy(model, tokenizer, prompts, continuations)
    finally:
        handle.remove()
    assert sum(rows_seen) < 2 * len(prompts)  # two calls, each fewer rows than pairs
    for i, (prompt, cont) in enumerate(zip(prompts, continuations)):
        ref_nll, ref_acc = _reference(model, tokenizer, prompt, cont)
        assert nll[i].item() == pytest.approx(ref_nll, rel=1e-4, abs=1e-5), (prompt, cont)
        assert accuracy[i] == pytest.approx(ref_acc), (prompt, cont)
