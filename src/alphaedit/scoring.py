"""Teacher-forced scores of continuations, batched: the measure behind efficacy and specificity.

NLL(c | x) = −(1/|c|) Σ_j log p(c_j | x, c_<j), with c tokenised with a leading space, as
CounterFact's metric does (ALGORITHM.md §3.3).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .prompts import batch_rows, bos_prefix, target_ids


def teacher_forced_logits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    rows_per_pass: int = 64,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each (prompt, continuation): the logits that predict each continuation token
    ([|c|, V]) and the continuation's token ids, from batched teacher-forced passes."""
    device = next(model.parameters()).device
    prefix = bos_prefix(tokenizer)
    for start in range(0, len(prompts), rows_per_pass):
        rows, spans = [], []
        for prompt, cont in zip(prompts[start : start + rows_per_pass], continuations[start : start + rows_per_pass]):
            prompt_ids = prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"]
            cont_ids = target_ids(tokenizer, cont)
            rows.append(prompt_ids + cont_ids)
            spans.append((len(prompt_ids), cont_ids))
        batch = batch_rows(tokenizer, rows, [0] * len(rows)).to(device)
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        for i, (begin, ids) in enumerate(spans):
            yield logits[i, begin - 1 : begin - 1 + len(ids)].float(), torch.tensor(ids, device=device)


def continuation_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
) -> torch.Tensor:
    """Mean token NLL of each continuation after its prompt, [len(prompts)] float32."""
    nll = [
        -logits.log_softmax(-1).gather(1, ids[:, None]).mean()
        for logits, ids in teacher_forced_logits(model, tokenizer, prompts, continuations)
    ]
    return torch.stack(nll).cpu()


def continuation_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
) -> list[float]:
    """Teacher-forced top-1 accuracy over each continuation's tokens (zsRE's metric, §3.4)."""
    return [
        (logits.argmax(-1) == ids).float().mean().item()
        for logits, ids in teacher_forced_logits(model, tokenizer, prompts, continuations)
    ]


def prefers_new(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    new: Sequence[str],
    true: Sequence[str],
) -> torch.Tensor:
    """Per prompt: is the new object more likely than the true one (lower mean token NLL)?"""
    nll = continuation_nll(model, tokenizer, [*prompts, *prompts], [*new, *true])
    return nll[: len(prompts)] < nll[len(prompts) :]
