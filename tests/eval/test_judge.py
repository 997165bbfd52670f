"""The optional answer judge of the generation-based evaluation (issue 15; eval/judge.py)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from alphaedit.eval.evaluator import EvalSettings, Evaluator, summarise
from alphaedit.eval.judge import AnswerJudge, reply_tokens
from alphaedit.eval.scoring import score_chat_answers
from alphaedit.generate import prompt_ids

pytestmark = pytest.mark.usefixtures("single_thread")

ITEMS = [
    ("Where is the Eiffel Tower?", "The Eiffel Tower is in Rome.", "Rome"),
    ("Where is the Eiffel Tower?", "It stands in Paris, France, by the Seine.", "Rome"),
    ("What is the mother tongue of Danielle Darrieux?", "English", "English"),
    ("Who developed Google Patents?", "Google Patents was made by a team at a large company in California in 2006.", "Microsoft"),
    ("Which sport does Messi play?", "football", "cricket"),
]


def _reference_log_odds(model, tokenizer, judge: AnswerJudge, item) -> float:
    """One triple alone, unpadded, in float64: log Σ p(yes tokens) − log Σ p(no tokens)."""
    ids = torch.tensor([prompt_ids(tokenizer, judge.prompt(*item))])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, -1].double().log_softmax(-1)
    return float(torch.logsumexp(logp[judge.yes], 0) - torch.logsumexp(logp[judge.no], 0))


def test_batched_verdicts_equal_one_triple_at_a_time_in_float64(llama, tokenizer):
    model, _ = llama
    judge = AnswerJudge(model, tokenizer, "tiny", rows_per_pass=2)  # answers of different lengths share passes, right-padded
    batched = judge.log_odds(ITEMS)
    reference = copy.deepcopy(model).double()
    expected = torch.tensor([_reference_log_odds(reference, tokenizer, judge, item) for item in ITEMS], dtype=torch.float64)
    torch.testing.assert_close(batched.double(), expected, rtol=1e-4, atol=1e-4)
    assert judge.verdicts(ITEMS) == [bool(v > 0) for v in expected] and judge.verdicts([]) == []


def test_the_judge_reads_the_question_the_answer_and_the_object(tokenizer):
    judge = AnswerJudge(None, tokenizer, "tiny")
    text = judge.prompt(*ITEMS[0])
    assert "Question: Where is the Eiffel Tower?\nAnswer: The Eiffel Tower is in Rome." in text
    assert '"Rome"' in text and text.endswith("Reply with yes or no.\nReply:")  # no chat template: plain text
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    assert AnswerJudge(None, chat, "tiny").prompt(*ITEMS[0]).startswith("<user>Question: Where is")
    # every casing of the reply's first word, with and without a space, and none shared
    assert len(judge.yes) >= 2 and not set(judge.yes) & set(judge.no)
    assert reply_tokens(tokenizer, ["yes"]) == sorted({tokenizer("yes")["input_ids"][0], tokenizer(" yes")["input_ids"][0]})


class _OneTokenTokenizer:
    """A tokenizer that starts every text with the same token: no way to tell yes from no."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [7, 8]}


def test_a_judge_whose_yes_and_no_share_a_token_is_refused():
    with pytest.raises(ValueError, match="cannot tell its verdicts apart"):
        AnswerJudge(None, _OneTokenTokenizer(), "odd")


def test_judged_metrics_and_agreement_by_hand():
    """Two records: the match and the judge's verdicts give the …_judged means and the share of
    answers where they agree."""
    from alphaedit.eval.datasets import EvalRecord
    from alphaedit.eval.questions import ChatProbes
    from alphaedit.requests import EditRequest

    records = [EvalRecord("counterfact", i, EditRequest("{} is in", s, "Rome", "Paris"), chat=ChatProbes(f"Where is {s}?"))
               for i, s in enumerate("AB")]
    asked = [(0, "chat_success", "Where is A?", "Rome"), (0, "chat_locality", "Where is C?", "Paris"),
             (0, "chat_locality", "Where is D?", "Paris"), (1, "chat_success", "Where is B?", "Rome")]
    answers = ["Rome.", "It is in Paris.", "Lyon", "Apple Apple Apple"]
    rows = score_chat_answers(records, asked, answers, verdicts=[True, False, False, True])
    assert rows[0]["chat_success"] == 1 and rows[0]["chat_success_judged"] == 1
    assert rows[0]["chat_locality"] == 0.5 and rows[0]["chat_locality_judged"] == 0  # the judge denied "It is in Paris."
    assert rows[0]["judge_agreement"] == pytest.approx(2 / 3) and rows[1]["judge_agreement"] == 0  # it said yes to a non-answer
    summary = summarise(rows)
    assert summary["chat_success_judged"] == 100 and summary["judge_agreement"] == pytest.approx(100 * (2 / 3 + 0) / 2)
    assert "chat_success_judged" not in score_chat_answers(records, asked, answers)[0]  # no judge, no judged columns


def test_the_evaluator_takes_a_judge_only_with_the_chat_evaluation_that_names_it(llama, tokenizer):
    model, _ = llama
    judge = AnswerJudge(model, tokenizer, "tiny")
    with pytest.raises(ValueError, match="judge goes with --chat-eval"):
        Evaluator(model, tokenizer, [], EvalSettings(chat_eval=False, chat_judge="tiny"), judge=judge)
    with pytest.raises(ValueError, match="judge goes with --chat-eval"):
        Evaluator(model, tokenizer, [], EvalSettings(chat_eval=True), judge=judge)
    assert Evaluator(model, tokenizer, [], EvalSettings(chat_eval=True, chat_judge="tiny"), judge=judge).judge is judge


def test_eval_refuses_a_judge_without_the_chat_evaluation_before_loading(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "alphaedit", "eval", "--dataset", "counterfact:nowhere.json", "--n", "2",
                             "--chat-judge", "smollm2-135m", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--chat-judge smollm2-135m" in result.stderr and "add --chat-eval" in result.stderr
    assert not out.exists()
