"""The paper's sequential protocol (ALGORITHM.md §3.1), on any model and either method.

N records are edited in sequential batches of B by one Editor; every record is evaluated
before the first batch and after the last (optionally also every K batches, for curves).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..editor import Editor
from ..layouts import mlp_out_weight
from ..stats.corpus import documents, file_windows
from .datasets import EvalRecord
from .metrics import TfIdf, mean
from .scoring import counterfact_scores, generation_scores, generative_success, wikitext_perplexity, zsre_scores

SUCCESS_METRICS = ("efficacy", "generalization", "specificity", "generative_success")
EASYEDIT_NAMES = {"efficacy": "rewrite_acc", "generalization": "rephrase_acc", "specificity": "locality"}


@dataclass
class EvalSettings:
    generation_every: int = 1  # fluency/consistency on every k-th record (generation is slow)
    sample_seed: int = 0
    perplexity_corpus: str | None = None  # held-out text; None skips perplexity
    perplexity_tokens: int = 4096
    idf_corpus: str | None = None  # text the TF-IDF idf is built from (ROME's idf.npy is not offline)


@dataclass
class Evaluation:
    records: list[dict]
    summary: dict[str, float | None]


@dataclass
class ProtocolResult:
    pre: Evaluation
    post: Evaluation
    curve: list[dict] = field(default_factory=list)  # {"edits": n, metric: value, ...}
    norms: list[dict] = field(default_factory=list)  # {"edits": n, "layer": ‖W‖_F, ...}
    seconds_editing: float = 0.0
    notes: list[str] = field(default_factory=list)


class Evaluator:
    """Evaluates a fixed list of records on whatever state the model is in."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[EvalRecord], settings: EvalSettings):
        self.model, self.tokenizer, self.records, self.settings = model, tokenizer, records, settings
        self.tfidf = TfIdf(documents(settings.idf_corpus)) if settings.idf_corpus else None
        self.windows = (
            file_windows(settings.perplexity_corpus, tokenizer, settings.perplexity_tokens, 256) if settings.perplexity_corpus else []
        )

    def scores(self) -> list[dict]:
        kind = self.records[0].kind
        per_record = (counterfact_scores if kind == "counterfact" else zsre_scores)(self.model, self.tokenizer, self.records)
        success = generative_success(self.model, self.tokenizer, self.records)
        return [{**r, "generative_success": float(s)} for r, s in zip(per_record, success)]

    def evaluate(self, with_generation: bool = True) -> Evaluation:
        per_record = self.scores()
        sampled = [i for i, r in enumerate(self.records) if r.generation_prompts][:: self.settings.generation_every]
        if with_generation and sampled and self.tfidf is not None:
            generated = generation_scores(self.model, self.tokenizer, [self.records[i] for i in sampled], self.tfidf, self.settings.sample_seed)
            for i, g in zip(sampled, generated):
                per_record[i].update(g)
        for rec, row in zip(self.records, per_record):
            row["case_id"] = rec.case_id
        summary = summarise(per_record)
        if self.windows:
            summary["perplexity"] = wikitext_perplexity(self.model, self.tokenizer, self.windows)
        return Evaluation(per_record, summary)


def summarise(per_record: list[dict]) -> dict[str, float | None]:
    """Means over records, ×100 as the paper reports (fluency too: ≈600 for fluent text)."""
    summary: dict[str, float | None] = {}
    for metric in (*SUCCESS_METRICS, "fluency", "consistency"):
        value = mean(r[metric] for r in per_record if r.get(metric) is not None)
        summary[metric] = None if value is None else 100 * value
    for metric, alias in EASYEDIT_NAMES.items():
        summary[alias] = summary[metric]
    return summary


def weight_norms(editor: Editor) -> dict[str, float]:
    return {str(l): float(mlp_out_weight(editor.model, editor.layout, l).detach().float().norm()) for l in editor.config.layers}


def run_protocol(
    editor: Editor,
    evaluator: Evaluator,
    batch_size: int,
    every: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ProtocolResult:
    requests = [r.request for r in evaluator.records]
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    pre = evaluator.evaluate()
    norms = [{"edits": 0, **weight_norms(editor)}]
    curve = [{"edits": 0, **{k: pre.summary[k] for k in SUCCESS_METRICS}}]
    editing = 0.0
    done = 0
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        editor.edit(batch)
        editing += time.perf_counter() - start
        done += len(batch)
        norms.append({"edits": done, **weight_norms(editor)})
        if every and (index + 1) % every == 0 and index + 1 < len(batches):
            point = summarise(evaluator.scores())
            curve.append({"edits": done, **{k: point[k] for k in SUCCESS_METRICS}})
        if on_batch is not None:
            on_batch(done)
    post = evaluator.evaluate()
    curve.append({"edits": done, **{k: post.summary[k] for k in SUCCESS_METRICS}})
    return ProtocolResult(pre, post, curve, norms, editing)

