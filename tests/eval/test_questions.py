"""Questions for chat-aware editing and the generation-based evaluation (eval/questions.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alphaedit.eval.datasets import load_dataset, with_questions
from alphaedit.eval.questions import QUESTIONS, cloze_subject, counterfact_probes, normalise, states

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
COUNTERFACT = DATA / "counterfact" / "counterfact_test.json"
ZSRE = DATA / "zsre" / "zsre_mend_eval_portability_gpt4.json"


def test_every_counterfact_relation_has_two_question_forms_with_one_subject_slot():
    relations = {r["requested_rewrite"]["relation_id"] for r in json.loads(COUNTERFACT.read_text())}
    assert relations <= set(QUESTIONS)
    for forms in QUESTIONS.values():
        assert len(forms) == 2 and forms[0] != forms[1]
        assert all(f.count("{}") == 1 and f.endswith("?") for f in forms)


def test_the_subject_of_a_cloze_is_found_by_its_most_specific_template():
    templates = ["{}, in", "{} is located in", "{}, which is located in"]
    assert cloze_subject("Kenya, which is located in", templates) == "Kenya"
    assert cloze_subject("Mount Kenya is located in", templates) == "Mount Kenya"
    assert cloze_subject("The capital of Kenya is", templates) is None


@pytest.mark.parametrize("answer, obj, expected", [
    ("It is in Rome, Italy.", "Rome", True),
    ("Romania is its home.", "Rome", False),  # whole words only
    ("São Paulo!", "Sao Paulo", True),  # accents and punctuation do not count
    ("the UNITED states of America", "United States", True),
    ("", "Rome", False),
    ("anything", "", False),
])
def test_an_answer_states_an_object_by_its_normalised_words(answer, obj, expected):
    assert states(answer, obj) is expected


def test_normalise_keeps_letters_and_digits_only():
    assert normalise("  Émile  Zola's  1898 ") == "emile zola s 1898"


def test_counterfact_records_get_questions_for_themselves_their_paraphrase_and_their_neighbours():
    records = load_dataset(f"counterfact:{COUNTERFACT}")[:200]
    assert all(r.chat is not None for r in records)
    first = records[0]  # Angola, P30 (continent), Africa -> Antarctica
    assert first.chat.question == "Which continent is Angola on?"
    assert first.chat.paraphrases == ["On what continent is Angola located?"]
    assert set(first.chat.neighbour_answers) == {"Africa"}
    found = sum(len(r.chat.neighbours) for r in records)
    assert found >= 0.99 * sum(len(r.neighbourhood) for r in records)
    # a neighbour's subject is a real name from its prompt, not the prompt itself
    assert all(q.count("{}") == 0 and len(q) < 200 for r in records for q in r.chat.neighbours)


def test_without_a_true_object_there_are_no_neighbour_questions():
    probes = counterfact_probes("P30", "Angola", ["Kenya is located in"], None, ["{} is located in"])
    assert probes.neighbours == [] and probes.neighbour_answers == []
    assert counterfact_probes("P9999", "Angola", [], "Africa", []) is None


def test_with_questions_gives_counterfact_its_relation_form_and_zsre_its_own_prompt():
    cf = with_questions(load_dataset(f"counterfact:{COUNTERFACT}")[:3])
    assert cf[0].request.question == "Which continent is {} on?" and cf[0].request.question_text() == "Which continent is Angola on?"
    zsre = with_questions(load_dataset(f"zsre:{ZSRE}")[:3])
    assert all(r.request.question == r.request.prompt for r in zsre)
    assert zsre[0].chat.question == zsre[0].request.text()


def test_free_answers_are_tallied_per_record_with_the_leak_to_neighbours():
    """score_chat_answers, given the answers: success and paraphrase count the new object, locality
    the neighbour's own, and chat_leak the neighbours whose answer states the edit's new object."""
    from alphaedit.eval.datasets import EvalRecord
    from alphaedit.eval.scoring import score_chat_answers
    from alphaedit.requests import EditRequest

    toko = EvalRecord("counterfact", 1, EditRequest("{} plays the", "Toko Yasuda", "piano", "guitar"))
    other = EvalRecord("counterfact", 2, EditRequest("{} is in", "Lyon", "Italy", "France"))
    asked = [
        (0, "chat_success", "What instrument does Toko Yasuda play?", "piano"),
        (0, "chat_paraphrase", "Which musical instrument does Toko Yasuda play?", "piano"),
        (0, "chat_locality", "What instrument does Eric Clapton play?", "guitar"),
        (0, "chat_locality", "What instrument does Slash play?", "guitar"),
        (0, "chat_locality", "What instrument does Prince play?", "guitar"),
        (0, "chat_locality", "What instrument does Jimi Hendrix play?", "guitar"),
        (1, "chat_success", "Which country is Lyon in?", "Italy"),
    ]
    answers = ["She plays the piano.", "The guitar.", "Eric Clapton plays the guitar.", "Slash plays the piano.",
               "He plays the piano and the guitar.", "Drums.", "Lyon is in France."]
    rows = score_chat_answers([toko, other], asked, answers)
    assert rows[0]["chat_success"] == 1.0 and rows[0]["chat_paraphrase"] == 0.0
    assert rows[0]["chat_locality"] == 0.5  # Clapton's and Prince's answers still say guitar
    assert rows[0]["chat_leak"] == 0.5  # Slash's and Prince's say piano
    assert rows[0]["chat_answer"] == "She plays the piano."
    assert rows[0]["chat_neighbour_answers"] == answers[2:6]
    assert rows[1] == {"chat_success": 0.0, "chat_answer": "Lyon is in France."}  # no neighbours asked: no locality, no leak
