"""Model-facing evaluation, batched across records: dozens of sequences per forward pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..prompts import batch_rows, bos_prefix, pad_id, target_ids
from ..scoring import continuation_nll
from .datasets import EvalRecord
from .metrics import TfIdf, mean, ngram_entropy, perplexity


def _token_accuracy(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], rows_per_pass: int = 64) -> list[float]:
    """Teacher-forced top-1 accuracy over each answer's tokens (zsRE's metric, §3.4)."""
    device = next(model.parameters()).device
    prefix = bos_prefix(tokenizer)
    scores = []
    for start in range(0, len(prompts), rows_per_pass):
        rows, spans = [], []
        for prompt, answer in zip(prompts[start : start + rows_per_pass], answers[start : start + rows_per_pass]):
            prompt_ids = prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = target_ids(tokenizer, answer)
            rows.append(prompt_ids + ids[:-1])
            spans.append((len(prompt_ids) - 1, ids))
        batch = batch_rows(tokenizer, rows, [0] * len(rows)).to(device)
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        for i, (begin, ids) in enumerate(spans):
            predicted = logits[i, begin : begin + len(ids)].argmax(-1).cpu()
            scores.append((predicted == torch.tensor(ids)).float().mean().item())
    return scores


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
    accuracy = _token_accuracy(model, tokenizer, [p[2] for p in probes], [p[3] for p in probes])
    return _per_record(records, probes, accuracy)


def generative_success(model, tokenizer, records: Sequence[EvalRecord]) -> list[bool]:
    """Does the greedy continuation of the rewrite prompt begin with the new object?"""
    from ..generate import greedy_completions

    prompts = [r.request.text() for r in records]
    lengths = max(len(target_ids(tokenizer, r.request.target_new)) for r in records)
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens=lengths + 1)
    return [c.strip().startswith(r.request.target_new.strip()) for c, r in zip(completions, records)]


def sample_texts(model, tokenizer, prompts: Sequence[str], max_length: int = 100, seed: int = 0, rows_per_pass: int = 16) -> list[str]:
    """Prompt + top-5 sampled continuation, `max_length` tokens in all (ROME's generate_fast), seeded."""
    device = next(model.parameters()).device
    prefix = bos_prefix(tokenizer)
    texts: list[str] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(prompts), rows_per_pass):
            chunk = prompts[start : start + rows_per_pass]
            rows = [prefix + tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(rows):  # left padding
                ids[i, width - len(row) :] = torch.tensor(row)
                mask[i, width - len(row) :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, top_k=5,
                                 top_p=1.0, temperature=1.0, max_new_tokens=max(1, max_length - width), pad_token_id=pad_id(tokenizer))
            texts += [p + tokenizer.decode(row[width:], skip_special_tokens=True) for p, row in zip(chunk, out)]
    return texts


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
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(window) - 1
    return perplexity(total, count)
