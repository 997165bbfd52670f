"""CounterFact's per-record scores against a float64, one-prompt-at-a-time reference."""

from __future__ import annotations

import copy

import pytest
import torch

from alphaedit.eval.datasets import EvalRecord
from alphaedit.eval.scoring import counterfact_scores
from alphaedit.requests import EditRequest

pytestmark = pytest.mark.usefixtures("single_thread")

RECORDS = [
    EvalRecord("counterfact", 0, EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English language", "French"),
               paraphrases=["Danielle Darrieux spoke the language", "Danielle Darrieux, a native speaker of"],
               neighbourhood=["The mother tongue of Léon Blum is", "Montesquieu spoke the language"]),
    EvalRecord("counterfact", 1, EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
               paraphrases=["The Eiffel Tower can be found in"], neighbourhood=["The Louvre is located in the city of"]),
]


def _tokens(model, tokenizer, prompt: str, answer: str) -> tuple[float, list[bool]]:
    """Mean token log-probability of " answer" after the prompt, and whether each token is the argmax."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([ids + answer_ids])).logits[0].double().log_softmax(-1)
    rows = [logp[len(ids) + j - 1] for j in range(len(answer_ids))]
    return (sum(r[t].item() for r, t in zip(rows, answer_ids)) / len(answer_ids), [int(r.argmax()) == t for r, t in zip(rows, answer_ids)])


def test_counterfact_scores_equal_one_prompt_at_a_time(llama, tokenizer):
    from alphaedit.generate import greedy_completions

    model, _ = llama
    reference = copy.deepcopy(model).double()
    # a third record whose new object is what the random model predicts, so the accuracies are not all 0
    predicted = greedy_completions(model, tokenizer, ["The Eiffel Tower is located in the city of"], 3)[0].strip()
    records = [*RECORDS, EvalRecord("counterfact", 2, EditRequest("{} is located in the city of", "The Eiffel Tower", predicted, "Paris"),
                                    paraphrases=["The Eiffel Tower is located in the city of", "The Eiffel Tower can be found in"],
                                    neighbourhood=["The Louvre is located in the city of"])]
    scores = counterfact_scores(model, tokenizer, records)
    assert scores[2]["rewrite_acc"] > 0 and 0 < scores[2]["rephrase_acc"] < 1
    for record, row in zip(records, scores):
        new, true = record.request.target_new, record.request.target_true

        def prefers_new(prompt):
            return _tokens(reference, tokenizer, prompt, new)[0] > _tokens(reference, tokenizer, prompt, true)[0]

        def accuracy(prompt):
            hits = _tokens(reference, tokenizer, prompt, new)[1]
            return sum(hits) / len(hits)

        assert row["efficacy"] == float(prefers_new(record.request.text()))
        assert row["generalization"] == pytest.approx(sum(prefers_new(p) for p in record.paraphrases) / len(record.paraphrases))
        assert row["specificity"] == pytest.approx(sum(not prefers_new(p) for p in record.neighbourhood) / len(record.neighbourhood))
        assert row["rewrite_acc"] == pytest.approx(accuracy(record.request.text()))
        assert row["rephrase_acc"] == pytest.approx(sum(accuracy(p) for p in record.paraphrases) / len(record.paraphrases))
    assert len(_tokens(reference, tokenizer, RECORDS[0].request.text(), "English language")[1]) > 1  # a multi-token target is covered
