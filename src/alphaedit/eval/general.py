"""General capability: the authors' six downstream tasks, scored on whatever state the model is in.

The AlphaEdit paper (Fig. 4) checks that sequential editing leaves the model able to do things
other than recall the edited facts: SST-2, MRPC, CoLA, RTE, MMLU and NLI, on fixed subsets,
zero-shot, before the first batch and every few batches. This follows the authors' harness
(`glue_eval/*_eval.py` in jianghoucheng/AlphaEdit, from unified-model-editing) task by task,
as specified in docs/GENERAL.md:

- records: the first 10 lines of each file are the few-shot pool (unused, zero-shot), the next
  `tests` are scored;
- the generated answer: greedy, `gen_len` = 5 new tokens (their driver's value for every task),
  parsed by looking for label words in the text after the prompt's answer cue; an answer with no
  label word is "invalid" and counts as its own class (-1) in the F1 and MCC;
- the most probable label: each label word, with a leading space, scored by its mean token
  log-probability after the prompt; the F1 of that choice is `f1_label` (their `f1_new`). On a
  small model that rarely says a label word unprompted, this is the informative number.

Two deliberate differences, both documented in README: RTE uses GLUE's label coding
(0 = entailment, answered "True"); the authors' code reads label 1 as "True", which inverts
the task. And a label word's tokens are those of " word" on its own, after the prompt's (their code also
tokenises the suffix alone, but reads the logits at positions of the joint string's tokenisation
and strips a Llama BOS by model name; the two agree wherever the joint tokenisation splits at the
space, as for these prompts).

Everything is batched: prompts sorted by length, left-padded generation, teacher-forced passes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..generate import generate_rows, greedy_rows_and_first_logprobs, prompt_ids
from ..layouts import Layout
from ..prompts import target_ids
from ..teacher_forcing import continuation_nll

FEW_SHOT_POOL = 10  # the first records of every file; the harness never scores them
GEN_LEN = 5  # new tokens generated per prompt, as their driver passes to every task
INVALID = -1


def _first_label(text: str, words: Sequence[tuple[str, int]]) -> int:
    """The class of the first word of `words` (checked in that order) found in the lower-cased text."""
    lowered = text.lower()
    for word, label in words:
        if word in lowered:
            return label
    return INVALID


@dataclass(frozen=True)
class Task:
    """One downstream task: how its records become prompts, labels and parsed answers."""

    name: str
    prompt: Callable[[dict], str]
    label: Callable[[dict], int]
    cue: str | None  # the answer is read after the last occurrence of this cue (None: the whole continuation)
    words: tuple[tuple[str, int], ...]  # substrings of the generated answer, checked in order, and their class
    choices: tuple[tuple[str, int], ...]  # label words scored by probability, and their class
    strict: bool = False  # most probable label: ties (and non-unique maxima) are invalid, as their MMLU

    def parse(self, continuation: str) -> int:
        text = continuation if self.cue is None else (self.cue + continuation).split(self.cue)[-1]
        return _first_label(text, self.words)  # not stripped: MMLU's words end in a newline

    def most_probable(self, mean_logp: Sequence[float]) -> int:
        best = max(mean_logp)
        winners = [c for (_, c), lp in zip(self.choices, mean_logp) if lp == best]
        if self.strict:
            return winners[0] if len(winners) == 1 else INVALID
        # binary tasks: their code picks the first choice only when strictly more probable
        return self.choices[0][1] if mean_logp[0] > mean_logp[1] else self.choices[1][1]


def _mmlu_prompt(r: dict) -> str:
    options = "".join(f"({letter}) {choice}\n" for letter, choice in zip("ABCD", r["choices"]))
    return f"Question: {r['question']}\n{options}Answer:"


TASKS: dict[str, Task] = {
    "sst2": Task(
        "sst2",
        prompt=lambda r: f"Review :{r['sentence']}\nSentiment :",
        label=lambda r: int(r["label"]),
        cue="Sentiment :",
        words=(("positive", 1), ("negative", 0)),
        choices=(("positive", 1), ("negative", 0)),
    ),
    "mrpc": Task(
        "mrpc",
        prompt=lambda r: f"Are the sentences paraphrases of each other.\nSentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\nAnswer:",
        label=lambda r: int(r["label"]),
        cue="Answer:",
        words=(("yes", 1), ("no", 0)),
        choices=(("Yes", 1), ("No", 0)),
    ),
    "cola": Task(
        "cola",
        prompt=lambda r: f"Is this sentence linguistically acceptable?\nSentence: {r['sentence']}\nAnswer: ",
        label=lambda r: int(r["label"]),
        cue="Answer:",
        words=(("yes", 1), ("no", 0)),
        choices=(("Yes", 1), ("No", 0)),
    ),
    "rte": Task(  # GLUE: 0 = entailment ("True"), 1 = not entailment ("False"); "false" is looked for first
        "rte",
        prompt=lambda r: f"{r['sentence1']}\nquestion: {r['sentence2']} True or False?\nanswer:",
        label=lambda r: int(r["label"]),
        cue="answer:",
        words=(("false", 1), ("true", 0)),
        choices=(("True", 0), ("False", 1)),
    ),
    "mmlu": Task(
        "mmlu",
        prompt=_mmlu_prompt,
        label=lambda r: int(r["answer"]),
        cue=None,
        words=(("a\n", 0), ("b\n", 1), ("c\n", 2), ("d\n", 3)),
        choices=(("A", 0), ("B", 1), ("C", 2), ("D", 3)),
        strict=True,
    ),
    "nli": Task(
        "nli",
        prompt=lambda r: f"{r['sentence1']} entails the {r['sentence2']} True or False? Answer:",
        label=lambda r: 1 if r["label"] == "entailment" else 0,
        cue="True or False? Answer:",
        words=(("true", 1), ("false", 0)),
        choices=(("True", 1), ("False", 0)),
    ),
}


# --- metrics (sklearn's definitions; an invalid answer -1 is a class of its own) --------------


def weighted_f1(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """F1 of each class present in `labels`, weighted by its support (sklearn average='weighted').

    Classes that only occur among the predictions (e.g. -1) have no support and weigh nothing,
    but their predictions still count as false positives of nobody and misses of the true class."""
    total = len(labels)
    score = 0.0
    for c in sorted(set(labels)):
        tp = sum(1 for y, p in zip(labels, predictions) if y == c and p == c)
        fp = sum(1 for y, p in zip(labels, predictions) if y != c and p == c)
        fn = sum(1 for y, p in zip(labels, predictions) if y == c and p != c)
        f1 = 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
        score += f1 * sum(1 for y in labels if y == c) / total
    return score


def matthews(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K, as sklearn's); 0 when undefined."""
    classes = sorted(set(labels) | set(predictions))
    n = len(labels)
    correct = sum(1 for y, p in zip(labels, predictions) if y == p)
    t = {c: sum(1 for y in labels if y == c) for c in classes}
    p = {c: sum(1 for x in predictions if x == c) for c in classes}
    cov_yp = correct * n - sum(t[c] * p[c] for c in classes)
    cov_pp = n * n - sum(p[c] ** 2 for c in classes)
    cov_yy = n * n - sum(t[c] ** 2 for c in classes)
    if cov_pp == 0 or cov_yy == 0:
        return 0.0
    return cov_yp / math.sqrt(cov_pp * cov_yy)


# --- the check ------------------------------------------------------------------------------


def load_task_records(folder: Path, task: str, tests: int) -> list[dict]:
    """The scored records of one task: lines FEW_SHOT_POOL .. FEW_SHOT_POOL + tests of its file."""
    path = Path(folder) / f"{task}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"--general {folder}: {path.name} is missing; the folder must hold the six files "
            f"{', '.join(t + '.jsonl' for t in TASKS)} (the authors' glue_eval subsets as JSON lines)"
        )
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if number <= FEW_SHOT_POOL or not line.strip():
                continue
            if len(records) == tests:
                break
            try:
                record = json.loads(line)
                TASKS[task].label(record), TASKS[task].prompt(record)  # every field the task reads
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}, line {number}: not a {task} record ({type(e).__name__}: {e}); "
                                 "expected the fields of docs/GENERAL.md") from None
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records after the {FEW_SHOT_POOL}-record few-shot pool")
    return records


@dataclass
class GeneralCheck:
    """The six tasks' records, loaded once; `run()` scores the model as it is now."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    folder: Path
    tests: int = 100
    tasks: Sequence[str] = tuple(TASKS)
    layout: Layout | None = None
    gen_len: int = GEN_LEN
    teacher_forced_labels: bool = False  # score label words in their own passes even when each is one token

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"--general-tasks: unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
        self.records = {t: load_task_records(self.folder, t, self.tests) for t in self.tasks}

    def run(self, on_task: Callable[[int, int], None] | None = None) -> tuple[dict[str, dict], dict[str, list[dict]]]:
        """Per task: {f1, f1_label, mcc, accuracy, invalid, total}; and per-record rows (prompt
        excluded) with the generated text, the parsed answer and each label's mean log-probability.
        `on_task(tasks done, tasks in all)` hears each task end."""
        scores, rows = {}, {}
        for done, name in enumerate(self.tasks, 1):
            task, records = TASKS[name], self.records[name]
            prompts = [task.prompt(r) for r in records]
            labels = [task.label(r) for r in records]
            words = [w for w, _ in task.choices]
            generated, mean_logp = self._generate_and_score(prompts, words)
            answers = [task.parse(g) for g in generated]
            chosen = [task.most_probable(lp) for lp in mean_logp]
            scores[name] = {
                "f1": weighted_f1(labels, answers),
                "f1_label": weighted_f1(labels, chosen),
                "mcc": matthews(labels, answers),
                "accuracy": sum(a == y for a, y in zip(answers, labels)) / len(labels),
                "invalid": sum(a == INVALID for a in answers),
                "total": len(labels),
            }
            rows[name] = [
                {"label": y, "generated": g, "answer": a, "most_probable": c, "mean_logp": dict(zip(words, lp))}
                for y, g, a, c, lp in zip(labels, generated, answers, chosen, mean_logp)
            ]
            if on_task is not None:
                on_task(done, len(self.tasks))
        return scores, rows

    def _generate_and_score(self, prompts: list[str], words: list[str]) -> tuple[list[str], list[list[float]]]:
        """Greedy continuations, and each label word's mean token log-probability after each prompt.

        Rows run sorted by length, so that a batch wastes little on padding. When every label word
        is one token (SmolLM2, Gemma, Llama: " Yes", " A", ...) its log-probability is read off the
        first generation step; otherwise it takes a teacher-forced pass per word.
        """
        ids = [prompt_ids(self.tokenizer, p) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        word_ids = [target_ids(self.tokenizer, w) for w in words]
        one_token = all(len(t) == 1 for t in word_ids) and not self.teacher_forced_labels
        if one_token:
            new, first = greedy_rows_and_first_logprobs(self.model, self.tokenizer, [ids[i] for i in order], self.gen_len, [t[0] for t in word_ids])
        else:
            new = generate_rows(self.model, self.tokenizer, [ids[i] for i in order], self.gen_len, rows_per_pass=16)
        texts: list[str] = [""] * len(ids)
        mean_logp: list[list[float]] = [[]] * len(ids)
        for k, i in enumerate(order):
            texts[i] = self.tokenizer.decode(new[k], skip_special_tokens=True)
            if one_token:
                mean_logp[i] = first[k].tolist()
        if not one_token:
            nll = continuation_nll(self.model, self.tokenizer, [p for p in prompts for _ in words], words * len(prompts), layout=self.layout).tolist()
            mean_logp = [[-x for x in nll[i * len(words) : (i + 1) * len(words)]] for i in range(len(prompts))]
        return texts, mean_logp


def mean_f1(scores: dict[str, dict], key: str = "f1_label") -> float:
    """The tasks' mean of one score (a one-number summary for curves and tables)."""
    return sum(s[key] for s in scores.values()) / len(scores)
