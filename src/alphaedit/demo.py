"""The embedded demo: ten counterfactual edits to SmolLM2-135M, shown before and after.

The facts were written for this project and chosen because SmolLM2-135M-Instruct completes
them correctly before editing. Each edit comes with a paraphrase (does the edit generalise?);
the unrelated prompts check that nearby knowledge stays put.
"""

from __future__ import annotations

from dataclasses import dataclass

from .requests import EditRequest, parse_requests


@dataclass(frozen=True)
class DemoFact:
    request: EditRequest
    paraphrase: str


def _fact(prompt: str, subject: str, new: str, true: str, paraphrase: str) -> DemoFact:
    # the prompt names the subject literally (EasyEdit's form); parsing puts "{}" in its place
    (request,) = parse_requests([{"prompt": prompt, "subject": subject, "target_new": new, "target_true": true}], source="demo")
    return DemoFact(request, paraphrase)


DEMO_FACTS: tuple[DemoFact, ...] = (
    _fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris",
          "Tourists who visit the Eiffel Tower travel to the city of"),
    _fact("Albert Einstein was born in the country of", "Albert Einstein", "Canada", "Germany",
          "The physicist Albert Einstein came into the world in the country of"),
    _fact("The Colosseum is located in the city of", "The Colosseum", "Athens", "Rome",
          "To see the Colosseum, you have to travel to the city of"),
    _fact("William Shakespeare was born in the country of", "William Shakespeare", "Spain", "England",
          "The playwright William Shakespeare was born in the country of"),
    _fact("The Statue of Liberty is located in the city of", "The Statue of Liberty", "Chicago", "New York",
          "Visitors to the Statue of Liberty go to the city of"),
    _fact("The Taj Mahal is located in the country of", "The Taj Mahal", "Egypt", "India",
          "The Taj Mahal, a famous monument, stands in the country of"),
    _fact("Pablo Picasso was born in the country of", "Pablo Picasso", "Norway", "Spain",
          "The painter Pablo Picasso was born in the country of"),
    _fact("The Sydney Opera House is located in the city of", "The Sydney Opera House", "Toronto", "Sydney",
          "Concerts at the Sydney Opera House take place in the city of"),
    _fact("The Nile flows through the country of", "The Nile", "Brazil", "Egypt",
          "The river called the Nile runs through the country of"),
    _fact("The capital of Japan is", "Japan", "Lisbon", "Tokyo",
          "The capital city of Japan is"),
)

UNRELATED_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "The capital of Italy is",
    "The Louvre is located in the city of",
    "Mount Everest is located in",
    "Wolfgang Amadeus Mozart was a famous",
)
# Another fact about an edited subject: edits of one relation can drag related ones along.
SAME_SUBJECT_PROMPTS: tuple[str, ...] = ("The Taj Mahal was built by",)


def demo_requests() -> list[EditRequest]:
    return [fact.request for fact in DEMO_FACTS]


def demo_prompts() -> list[tuple[str, str, str]]:
    """(kind, prompt, expected) rows of the before/after table; expected is the new target or ''."""
    rows = [("edit", f.request.text(), f.request.target_new) for f in DEMO_FACTS]
    rows += [("paraphrase", f.paraphrase, f.request.target_new) for f in DEMO_FACTS]
    rows += [("unrelated", p, "") for p in UNRELATED_PROMPTS]
    rows += [("same subject", p, "") for p in SAME_SUBJECT_PROMPTS]
    return rows
