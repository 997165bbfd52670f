"""The evaluation of a fixed list of records on whatever state the model is in: teacher-forced
scores (CounterFact's NLL comparisons or zsRE's token accuracies), generative success, fluency and
consistency on a sample, optionally the chat answers, and WikiText perplexity (ALGORITHM.md §3).
The sequential protocol (protocol.py) calls it before, during and after a run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..stats.corpus import documents, file_windows
from .consistency import load_rome
from .datasets import EvalRecord
from .metrics import TfIdf, mean
from .judge import AnswerJudge
from .scoring import chat_scores, counterfact_scores, generation_scores, generative_success, wikitext_perplexity, zsre_scores

SUCCESS_METRICS = ("efficacy", "generalization", "specificity", "generative_success")
CHAT_METRICS = ("chat_success", "chat_paraphrase", "chat_locality", "chat_leak")  # generation-based (scoring.chat_scores)
# the same answers as an optional judge model counts them, and how often it agrees with the match (judge.py)
JUDGED_METRICS = ("chat_success_judged", "chat_paraphrase_judged", "chat_locality_judged", "judge_agreement")
EASYEDIT_METRICS = ("rewrite_acc", "rephrase_acc")  # EasyEdit's token accuracies, under EasyEdit's names
GENERAL_PHASE = "general check"  # the phase name the general check is timed under


@dataclass
class EvalSettings:
    generation_every: int = 1  # fluency/consistency on every k-th record (generation is slow)
    sample_seed: int = 0
    perplexity_corpus: str | None = None  # held-out text; None skips perplexity
    perplexity_tokens: int = 4096
    idf_corpus: str | None = None  # text the local stand-in's TF-IDF idf is built from
    consistency: str = "local"  # or "rome" / "rome:DIR": ROME's idf and attribute snippets (consistency.py)
    chat_eval: bool = False  # the generation-based evaluation: free answers to questions (scoring.chat_scores)
    chat_max_tokens: int = 32
    chat_neighbours: int | None = 4  # neighbour questions per record (None: all)
    chat_judge: str | None = None  # the judge model's name (--chat-judge; the Evaluator is given the loaded judge)


@dataclass
class Evaluation:
    records: list[dict]
    summary: dict[str, float | None]


class Evaluator:
    """Evaluates a fixed list of records on whatever state the model is in."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[EvalRecord], settings: EvalSettings,
                 on_phase: Callable[[str], None] | None = None, judge: AnswerJudge | None = None):
        self.model, self.tokenizer, self.records, self.settings = model, tokenizer, records, settings
        if (judge is None) != (settings.chat_judge is None) or (judge is not None and not settings.chat_eval):
            raise ValueError("a judge goes with --chat-eval and with settings.chat_judge naming it")
        self.judge = judge
        kinds = {r.kind for r in records}
        if len(kinds) > 1:  # one kind's metrics score a run: NLL comparisons and token accuracies do not average
            raise ValueError(f"records of one kind only, not {' and '.join(sorted(kinds))}: evaluate them as separate runs")
        self.kind = kinds.pop() if kinds else "counterfact"
        # An evaluation of thousands of records takes minutes per phase on a CPU: `on_phase` hears
        # each phase start (with the time it took the last time, as an estimate) and end.
        self.on_phase = on_phase
        self.took: dict[str, float] = {}  # seconds, per phase, of its latest run
        # a running phase tells its share done and ETA at most this often (seconds): the pre-edit
        # evaluation of a 10,000-record stream runs for minutes per phase with no earlier pace to go by
        self.tick_seconds = 60.0
        # seconds per record of the phases that score records one by one, from their latest run: a
        # curve point over a sample (or a grown run's new records) says little about all of them
        self.pace: dict[str, float] = {}
        self.rome = load_rome(settings.consistency) if settings.consistency != "local" else None
        if self.rome is not None:
            self.tfidf = self.rome.tfidf
        else:
            self.tfidf = TfIdf(documents(settings.idf_corpus)) if settings.idf_corpus else None
        self.windows = (
            file_windows(settings.perplexity_corpus, tokenizer, settings.perplexity_tokens, 256) if settings.perplexity_corpus else []
        )

    def announce(self, what: str) -> None:
        if self.on_phase is not None:
            self.on_phase(what)

    def evaluation_seconds(self) -> float:
        """About how long `evaluate` of all records takes, from the timed phases' latest runs (0
        before any): a per-record phase at its pace, the others as long as they took. The general
        check, which runs on its own schedule, is not part of it."""
        return sum(self.pace[p] * len(self.records) if p in self.pace else t for p, t in self.took.items() if p != GENERAL_PHASE)

    @contextmanager
    def phase(self, name: str, size: str, records: int | None = None) -> Iterator[Callable[[int, int], None]]:
        """Time one phase and tell `on_phase` when it starts (what it does, and an estimate from its
        last run: scaled to `records` for a phase that scores them one by one) and ends. Yields
        `tick(done, in all)` for the phase's passes to call: every `tick_seconds` at most, it tells
        the share done and the time left at the pace so far."""
        if records and name in self.pace:
            before = f", about {_duration(self.pace[name] * records)} at the last pace"
        else:
            before = f", took {_duration(self.took[name])} last time" if name in self.took else ""
        self.announce(f"{name} ({size}{before}) …")
        start = time.perf_counter()
        told = [start]

        def tick(done: int, total: int) -> None:
            now = time.perf_counter()
            if 0 < done < total and now - told[0] >= self.tick_seconds:
                told[0] = now
                left = (now - start) * (total - done) / done
                self.announce(f"{name}: {100 * done / total:.0f}% · ETA {time.strftime('%H:%M:%S', time.gmtime(left))}")

        yield tick
        self.took[name] = time.perf_counter() - start
        if records:
            self.pace[name] = self.took[name] / records
        self.announce(f"{name}: done in {_duration(self.took[name])}")

    def scores(self, start: int = 0, indices: Sequence[int] | None = None) -> list[dict]:
        """Per-record scores of records[start:], or of the records at `indices`."""
        records = self.records[start:] if indices is None else [self.records[i] for i in indices]
        with self.phase("teacher-forced scores", f"{len(records)} records", len(records)) as tick:
            per_record = (counterfact_scores if self.kind == "counterfact" else zsre_scores)(self.model, self.tokenizer, records, tick)
        with self.phase("generative success", f"{len(records)} records", len(records)) as tick:
            success = generative_success(self.model, self.tokenizer, records, tick)
        rows = [{**r, "generative_success": float(s)} for r, s in zip(per_record, success)]
        if self.settings.chat_eval:
            with self.phase("chat answers", f"{len(records)} records", len(records)) as tick:
                chat = chat_scores(self.model, self.tokenizer, records, self.settings.chat_max_tokens, self.settings.chat_neighbours,
                                   self.judge, tick)
            for row, answers in zip(rows, chat):
                row.update(answers)
        return rows

    def evaluate(self, with_generation: bool = True, start: int = 0) -> Evaluation:
        """Every record's scores and their summary (with the perplexity, which is the model's, not a
        record's). `start`: only records[start:], without the perplexity — the new records of a grown
        run, sampled for fluency as they would be in an evaluation of all records."""
        per_record = self.scores(start)
        sampled = [i for i, r in enumerate(self.records) if r.generation_prompts][:: self.settings.generation_every]
        sampled = [i for i in sampled if i >= start]
        if with_generation and sampled and self.tfidf is not None:
            chosen = [self.records[i] for i in sampled]
            references = [self.rome.texts(r.relation_id, r.target_new_id) if self.rome else r.reference_texts for r in chosen]
            texts = sum(len(r.generation_prompts) for r in chosen)
            with self.phase("fluency and consistency", f"{texts} texts of {len(chosen)} records") as tick:
                generated = generation_scores(self.model, self.tokenizer, chosen, self.tfidf, self.settings.sample_seed, references, tick)
            for i, g in zip(sampled, generated):
                per_record[i - start].update(g)
        for rec, row in zip(self.records[start:], per_record):
            row["case_id"] = rec.case_id
        summary = summarise(per_record)
        if self.windows and start == 0:
            with self.phase("perplexity", f"{len(self.windows)} windows") as tick:
                summary["perplexity"] = wikitext_perplexity(self.model, self.tokenizer, self.windows, tick)
        return Evaluation(per_record, summary)


def _duration(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds >= 60 else f"{seconds:.0f} s"


def summarise(per_record: list[dict]) -> dict[str, float | None]:
    """Means over records, ×100 as the paper reports (fluency too: ≈600 for fluent text)."""
    summary: dict[str, float | None] = {}
    for metric in (*SUCCESS_METRICS, "fluency", "consistency", *EASYEDIT_METRICS, *CHAT_METRICS, *JUDGED_METRICS):
        value = mean(r[metric] for r in per_record if r.get(metric) is not None)
        summary[metric] = None if value is None else 100 * value
    return summary
