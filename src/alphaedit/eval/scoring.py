"""Model-facing evaluation, batched across records: dozens of sequences per forward pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..generate import TOP5, generate_rows, greedy_completions, prompt_ids, seeded
from ..prompts import target_ids
from ..scoring import continuation_accuracy, continuation_nll
from .datasets import EvalRecord
from .metrics import TfIdf, mean, ngram_entropy, perplexity


ROLES = ("rewrite", "paraphrase", "neighbourhood")


def _probes(records: Sequence[EvalRecord]) -> list[tuple[int, str, str, str]]:
    """(record index, role, prompt, expected answer) for every prompt of every record.

    Rewrite and paraphrase prompts expect the new object; neighbourhood prompts their own
    answer when the dataset gives one (zsRE), else the record's true object (CounterFact).
    """
    probes = []
    for i, rec in enumerate(records):
        probes.append((i, "rewrite", rec.request.text(), rec.request.target_new))
        probes += [(i, "paraphrase", text, rec.request.target_new) for text in rec.paraphrases]
        answers = rec.neighbourhood_answers or [rec.request.target_true or ""] * len(rec.neighbourhood)
        probes += [(i, "neighbourhood", text, answer) for text, answer in zip(rec.neighbourhood, answers)]
    return probes


def _per_record(records: Sequence[EvalRecord], probes, values) -> list[dict]:
    grouped = [{role: [] for role in ROLES} for _ in records]
    for (i, role, _, _), value in zip(probes, values):
        grouped[i][role].append(value)
    names = {"rewrite": "efficacy", "paraphrase": "generalization", "neighbourhood": "specificity"}
    return [{names[role]: mean(g[role]) for role in ROLES} for g in grouped]


def counterfact_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Sequence[EvalRecord]) -> list[dict]:
    """Per record: efficacy, generalization, specificity (CounterFact, §3.3), batched.

    Each prompt compares the mean token NLL of the new and the true object; rewrite and
    paraphrase prompts succeed when the new one wins, neighbourhood prompts when it loses.
    """
    probes = [p for p in _probes(records) if records[p[0]].request.target_true]
    prompts = [p[2] for p in probes]
    new = [records[p[0]].request.target_new for p in probes]
    true = [records[p[0]].request.target_true for p in probes]
    nll = continuation_nll(model, tokenizer, prompts + prompts, new + true)
    new_wins = (nll[: len(prompts)] < nll[len(prompts) :]).tolist()
    values = [float(w if p[1] != "neighbourhood" else not w) for p, w in zip(probes, new_wins)]
    return _per_record(records, probes, values)


def zsre_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Sequence[EvalRecord]) -> list[dict]:
    """Per record: teacher-forced token accuracy of each prompt's expected answer (§3.4)."""
    probes = _probes(records)
    accuracy = continuation_accuracy(model, tokenizer, [p[2] for p in probes], [p[3] for p in probes])
    return _per_record(records, probes, accuracy)


def generative_success(model, tokenizer, records: Sequence[EvalRecord]) -> list[bool]:
    """Does the greedy continuation of the rewrite prompt begin with the new object?"""
    prompts = [r.request.text() for r in records]
    lengths = max(len(target_ids(tokenizer, r.request.target_new)) for r in records)
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens=lengths + 1)
    return [c.strip().startswith(r.request.target_new.strip()) for c, r in zip(completions, records)]


def sample_texts(model, tokenizer, prompts: Sequence[str], max_length: int = 100, seed: int = 0) -> list[str]:
    """Prompt + top-5 sampled continuation, `max_length` tokens in all (ROME's generate_fast), seeded."""
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    with seeded(model, seed):
        new = generate_rows(model, tokenizer, rows, max(1, max_length - max(map(len, rows))), TOP5, rows_per_pass=16)
    return [p + tokenizer.decode(t, skip_special_tokens=True) for p, t in zip(prompts, new)]


def generation_scores(model, tokenizer, records: Sequence[EvalRecord], tfidf: TfIdf, seed: int = 0) -> list[dict]:
    """Fluency (n-gram entropy ×1, scaled later) and consistency (TF-IDF cosine) per record."""
    prompts = [p for r in records for p in r.generation_prompts]
    texts = sample_texts(model, tokenizer, prompts, seed=seed)
    out, k = [], 0
    for rec in records:
        own = texts[k : k + len(rec.generation_prompts)]
        k += len(rec.generation_prompts)
        out.append({
            "fluency": mean(ngram_entropy(t) for t in own),
            "consistency": tfidf.cosine(" ".join(own), " ".join(rec.reference_texts)) if rec.reference_texts else None,
        })
    return out


def wikitext_perplexity(model, tokenizer, windows: Sequence[list[int]]) -> float:
    """exp(mean token NLL) over held-out token windows."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()  # on the head's device
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:].to(logits.device), reduction="sum").item()
            count += len(window) - 1
    return perplexity(total, count)
