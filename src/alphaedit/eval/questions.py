"""Questions for chat-aware editing and for the generation-based evaluation (issue 15).

A CounterFact record is a cloze ("The mother tongue of {} is"); a chat model is asked questions.
`QUESTIONS` gives each CounterFact relation two question forms, written for this project: the
first is what chat-aware editing writes into the model (`--chat`), the second is never edited and
asks the same fact in other words (the generation-based paraphrase). `counterfact_aux/
counterfact_qna.json` (954 rewrites of the full CounterFact with a question each) uses one
question per cloze prompt; tests/eval/test_questions.py checks that every relation of that file and
of the test file has a form here.

Neighbours: a CounterFact neighbourhood prompt is a cloze of the record's relation about another
subject, without the subject marked. `cloze_subject` finds it by matching the prompt against the
relation's cloze templates (the rewrite prompts of all records of that relation in the file):
99.8% of the first 2,000 test records' neighbourhood prompts match one.

An answer *states* an object when the object's normalised words (lower case, accents and
punctuation removed) appear, as whole words, in the answer's.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

QUESTIONS: dict[str, tuple[str, str]] = {
    "P17": ("Which country is {} in?", "In what country is {} located?"),
    "P19": ("Where was {} born?", "What is the birthplace of {}?"),
    "P20": ("Where did {} die?", "In which city did {} pass away?"),
    "P27": ("Which country is {} a citizen of?", "What is the citizenship of {}?"),
    "P30": ("Which continent is {} on?", "On what continent is {} located?"),
    "P36": ("What is the capital of {}?", "Which city is the capital of {}?"),
    "P37": ("What is the official language of {}?", "Which language is official in {}?"),
    "P39": ("What position does {} hold?", "Which office does {} hold?"),
    "P101": ("What field does {} work in?", "What is the area of expertise of {}?"),
    "P103": ("What is the native language of {}?", "Which language did {} grow up speaking?"),
    "P106": ("What is the profession of {}?", "What does {} do for a living?"),
    "P108": ("Who is the employer of {}?", "Which company does {} work for?"),
    "P127": ("Who owns {}?", "Who is the owner of {}?"),
    "P131": ("Where is {} located?", "In which region can {} be found?"),
    "P136": ("What kind of music does {} play?", "Which musical genre is {} associated with?"),
    "P138": ("What is {} named after?", "Who or what was {} named for?"),
    "P140": ("What is the religion of {}?", "Which religion does {} follow?"),
    "P159": ("Where is the headquarters of {}?", "In which city is {} based?"),
    "P176": ("Which company makes {}?", "Who is the manufacturer of {}?"),
    "P178": ("Who developed {}?", "Which company created {}?"),
    "P190": ("What is the twin city of {}?", "Which city is twinned with {}?"),
    "P264": ("Which record label is {} signed to?", "What is the record label of {}?"),
    "P276": ("Where is {}?", "What is the location of {}?"),
    "P364": ("What is the original language of {}?", "In which language was {} originally made?"),
    "P407": ("What language is {} written in?", "In which language was {} written?"),
    "P413": ("What position does {} play?", "Which position does {} play in?"),
    "P449": ("Which network did {} first air on?", "Where did {} premiere?"),
    "P463": ("What organisation is {} a member of?", "Which group is {} affiliated with?"),
    "P495": ("Which country does {} come from?", "What is the country of origin of {}?"),
    "P641": ("What sport does {} play?", "Which sport is {} known for?"),
    "P740": ("Where was {} founded?", "In which city was {} formed?"),
    "P937": ("Where did {} work?", "In which city did {} work?"),
    "P1303": ("What instrument does {} play?", "Which musical instrument does {} play?"),
    "P1412": ("What language does {} speak?", "In which language does {} communicate?"),
}


@dataclass
class ChatProbes:
    """What the generation-based evaluation asks about one record (questions with the subject
    filled in) and what a right answer states."""

    question: str  # the edited fact as a question: the answer should state the new object
    paraphrases: list[str] = field(default_factory=list)  # the same fact, other words
    neighbours: list[str] = field(default_factory=list)  # the same relation, other subjects
    neighbour_answers: list[str] = field(default_factory=list)  # what each neighbour's answer should still state


def relation_question(relation_id: str | None, form: int = 0) -> str | None:
    """The relation's question form with '{}' for the subject, or None for an unknown relation."""
    forms = QUESTIONS.get(relation_id or "")
    return None if forms is None else forms[form]


def cloze_subject(prompt: str, templates: Iterable[str]) -> str | None:
    """The subject of a cloze `prompt` written with one of `templates` ('{}' for the subject);
    the most specific (longest) matching template wins. None when no template matches."""
    best: tuple[int, str] | None = None
    for template in templates:
        before, _, after = template.partition("{}")
        if len(prompt) > len(before) + len(after) and prompt.startswith(before) and prompt.endswith(after):
            subject = prompt[len(before) : len(prompt) - len(after)].strip()
            if subject and (best is None or len(template) > best[0]):
                best = (len(template), subject)
    return None if best is None else best[1]


def normalise(text: str) -> str:
    """Lower case, accents and punctuation removed, words separated by single spaces."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def states(answer: str, obj: str) -> bool:
    """Does `answer` state `obj` (its normalised words, as whole words)?"""
    wanted = normalise(obj)
    return bool(wanted) and f" {wanted} " in f" {normalise(answer)} "


def fill_subject(question: str, subject: str) -> str:
    return question.replace("{}", subject, 1)


def counterfact_probes(relation_id: str | None, subject: str, neighbourhood: Sequence[str], true_object: str | None,
                       templates: Iterable[str]) -> ChatProbes | None:
    """A CounterFact record's questions, from QUESTIONS and its relation's cloze templates."""
    ask, other = relation_question(relation_id, 0), relation_question(relation_id, 1)
    if ask is None or other is None:
        return None
    templates = list(templates)
    # a neighbour keeps its true object, which is the record's (CounterFact picks neighbours so)
    neighbours = [s for s in (cloze_subject(p, templates) for p in neighbourhood) if s is not None] if true_object else []
    return ChatProbes(
        fill_subject(ask, subject),
        [fill_subject(other, subject)],
        [fill_subject(ask, s) for s in neighbours],
        [true_object] * len(neighbours) if true_object else [],
    )
