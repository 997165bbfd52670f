"""Teacher-forced scores of continuations, batched: the measure behind efficacy and specificity.

NLL(c | x) = −(1/|c|) Σ_j log p(c_j | x, c_<j), with c tokenised with a leading space, as
CounterFact's metric does (ALGORITHM.md §3.3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .layouts import Layout, detect_layout, output_logits
from .prompts import batch_rows, bos_prefix, target_ids


def teacher_forced(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    tokens_per_pass: int = 2048,
    layout: Layout | None = None,
    on_pass: Callable[[int, int], None] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each (prompt, continuation): the log-probability of each continuation token and
    whether it is the top-1 prediction, from batched teacher-forced passes.

    Pairs share a row where they can: continuation c after prompt x is read off any row x + d
    whose tokens begin with c minus its last token, since the logits at those positions predict
    every token of c. CounterFact scores the new and the true object after the same prompt, and
    most objects are one token, so most prompts need one row where a row per pair took two.
    Rows are sorted by length so that a pass wastes little on padding, and the output head
    runs only at the continuation positions. `layout` is the caller's (an editor's may come
    from --layout); detected from the model when not given. `on_pass(tokens done, tokens in all)`
    hears each pass end (an evaluation of thousands of records shows its progress by it).
    """
    layout = layout or detect_layout(model)
    device = next(model.parameters()).device
    prefix = bos_prefix(tokenizer)
    encoded: dict[str, list[int]] = {}
    pairs = []  # (prompt ids, continuation ids) per pair
    for prompt, cont in zip(prompts, continuations):
        if prompt not in encoded:
            encoded[prompt] = prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        pairs.append((encoded[prompt], target_ids(tokenizer, cont)))
    rows: list[list[int]] = []
    row_of = [0] * len(pairs)
    rows_after: dict[tuple[int, ...], list[int]] = {}  # a prompt's rows
    for i in sorted(range(len(pairs)), key=lambda i: -len(pairs[i][1])):  # longest first: they cover the rest
        prompt_ids, cont_ids = pairs[i]
        candidates = rows_after.setdefault(tuple(prompt_ids), [])
        start, need = len(prompt_ids), cont_ids[:-1]
        row_of[i] = next((r for r in candidates if rows[r][start : start + len(need)] == need), len(rows))
        if row_of[i] == len(rows):
            candidates.append(len(rows))
            rows.append(prompt_ids + cont_ids)
    readers: list[list[int]] = [[] for _ in rows]
    for i, r in enumerate(row_of):
        readers[r].append(i)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(pairs)
    total_tokens, tokens_done = sum(len(r) for r in rows), 0
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(rows[order[end]]) <= tokens_per_pass:
            end += 1
        chunk = order[start:end]
        batch = batch_rows(tokenizer, [rows[r] for r in chunk], [0] * len(chunk)).to(device)
        reads = [(k, i) for k, r in enumerate(chunk) for i in readers[r]]  # (row in the pass, pair)
        with torch.no_grad():
            hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
            # the last block's output: on the last device when the model is spread over several
            row_index = torch.tensor([k for k, i in reads for _ in pairs[i][1]], device=hidden.device)
            positions = torch.tensor([len(pairs[i][0]) - 1 + t for _, i in reads for t in range(len(pairs[i][1]))], device=hidden.device)
            logits = output_logits(model, layout, hidden[row_index, positions]).float()
        targets = torch.tensor([tok for _, i in reads for tok in pairs[i][1]], device=logits.device)
        token_logp = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0].cpu()
        top1 = (logits.argmax(-1) == targets).cpu()
        offset = 0
        for _, i in reads:
            n = len(pairs[i][1])
            results[i] = (token_logp[offset : offset + n], top1[offset : offset + n])
            offset += n
        start = end
        if on_pass is not None:
            tokens_done += sum(len(rows[r]) for r in chunk)
            on_pass(tokens_done, total_tokens)
    return results  # type: ignore[return-value]


def continuation_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    layout: Layout | None = None,
) -> torch.Tensor:
    """Mean token NLL of each continuation after its prompt, [len(prompts)] float32."""
    return torch.stack([-logp.mean() for logp, _ in teacher_forced(model, tokenizer, prompts, continuations, layout=layout)])


def continuation_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    layout: Layout | None = None,
    on_pass: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Teacher-forced top-1 accuracy over each continuation's tokens (zsRE's metric, §3.4)."""
    scored = teacher_forced(model, tokenizer, prompts, continuations, layout=layout, on_pass=on_pass)
    return [top1.float().mean().item() for _, top1 in scored]


def prefers_new(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    new: Sequence[str],
    true: Sequence[str],
    layout: Layout | None = None,
) -> torch.Tensor:
    """Per prompt: is the new object more likely than the true one (lower mean token NLL)?"""
    return new_margin(model, tokenizer, prompts, new, true, layout=layout) > 0


def new_margin(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    new: Sequence[str],
    true: Sequence[str],
    layout: Layout | None = None,
) -> torch.Tensor:
    """Per prompt: mean token NLL of the true object minus that of the new one, in nats: how far
    past the line prefers_new draws (> 0) an edit is, [len(prompts)] float32."""
    nll = continuation_nll(model, tokenizer, [*prompts, *prompts], [*new, *true], layout=layout)
    return nll[len(prompts) :] - nll[: len(prompts)]
