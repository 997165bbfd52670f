"""Teacher-forced scores, batched and length-sorted, against one pair at a time with full logits."""

from __future__ import annotations

import pytest
import torch

from alphaedit.teacher_forcing import continuation_accuracy, continuation_nll, prefers_new

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
