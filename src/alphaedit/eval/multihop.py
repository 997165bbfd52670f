"""Portability: after an edit, does the model reason with the new fact? (MQuAKE, issue 15)

An MQuAKE case edits one to three single-hop facts ("Ellie Kemper is a citizen of Croatia") and
asks multi-hop questions whose answer changes with them ("Who is the head of state of the country
where Ellie Kemper holds a citizenship?" → Croatia's, not the United States'). Each case is
edited on its own, from the same weights: its rewrites as one batch, its questions asked by
free generation (scoring.chat_answers: the chat template where the model has one), then the
batch reverted (Editor.revert), as MQuAKE evaluates a case with only its own edits.

Per case: `multihop` = one of its questions is answered with the new answer (or an alias, as
questions.states reads an answer); `multihop_old` = with the old one; `edited` = the share of its
rewrites whose own question is answered with the new object (the single hops took).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..editor import Editor
from ..requests import EditRequest, parse_requests
from .metrics import mean
from .questions import states
from .scoring import chat_answers


@dataclass
class MultiHopCase:
    case_id: int | str
    requests: list[EditRequest]  # the single-hop rewrites, each with its question
    questions: list[str]  # multi-hop questions about the edited chain
    old_answers: list[str]  # the answer before the edits, and its aliases
    new_answers: list[str]  # the answer after them, and its aliases


def load_mquake(path: str | Path, n: int | None = None) -> list[MultiHopCase]:
    """MQuAKE records (`requested_rewrite` list, `questions`, `answer`/`new_answer` with aliases)."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, list) or not raw or "questions" not in raw[0] or "new_answer" not in raw[0]:
        raise ValueError(f"{path}: expected MQuAKE records (requested_rewrite, questions, answer, new_answer)")
    cases = []
    for index, rec in enumerate(raw[:n] if n else raw, 1):
        rewrites = [{"case_id": rec.get("case_id", index), "requested_rewrite": rw} for rw in rec["requested_rewrite"]]
        cases.append(MultiHopCase(
            rec.get("case_id", index),
            parse_requests(rewrites, f"{path}, case {rec.get('case_id', index)}"),
            list(rec["questions"]),
            [rec["answer"], *rec.get("answer_alias", [])],
            [rec["new_answer"], *rec.get("new_answer_alias", [])],
        ))
    return cases


def _states_any(answer: str, objects: list[str]) -> bool:
    return any(states(answer, o) for o in objects)


def _case_scores(case: MultiHopCase, answers: list[str]) -> dict:
    multi, single = answers[: len(case.questions)], answers[len(case.questions) :]
    return {
        "multihop": float(any(_states_any(a, case.new_answers) for a in multi)),
        "multihop_old": float(any(_states_any(a, case.old_answers) for a in multi)),
        "edited": mean(float(states(a, r.target_new)) for a, r in zip(single, case.requests)),
        "answers": multi,
    }


def _asked(case: MultiHopCase) -> list[str]:
    return [*case.questions, *(r.question_text() or r.text() for r in case.requests)]


def run_multihop(editor: Editor, cases: list[MultiHopCase], max_new_tokens: int = 32,
                 on_case: Callable[[int], None] | None = None) -> dict:
    """Each case edited alone and reverted; returns {"pre": summary, "post": summary, "cases": rows}."""
    model, tokenizer = editor.model, editor.tokenizer
    asked = [_asked(c) for c in cases]
    flat = chat_answers(model, tokenizer, [q for qs in asked for q in qs], max_new_tokens)
    pre, k = [], 0
    for case, qs in zip(cases, asked):
        pre.append(_case_scores(case, flat[k : k + len(qs)]))
        k += len(qs)
    post = []
    started = time.perf_counter()
    for i, (case, qs) in enumerate(zip(cases, asked)):
        report = editor.edit(case.requests)[-1]
        post.append(_case_scores(case, chat_answers(model, tokenizer, qs, max_new_tokens)))
        editor.revert(report.index)
        if on_case is not None:
            on_case(i + 1)

    def summary(rows: list[dict]) -> dict:
        return {m: 100 * mean(r[m] for r in rows if r[m] is not None) for m in ("multihop", "multihop_old", "edited")}

    return {
        "pre": summary(pre),
        "post": summary(post),
        "cases": [{"case_id": c.case_id, "pre": p, "post": q} for c, p, q in zip(cases, pre, post)],
        "seconds_per_case": (time.perf_counter() - started) / max(1, len(cases)),
    }
