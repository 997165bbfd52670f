"""Greedy completions of a list of prompts, batched with left padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .prompts import bos_prefix, pad_id


def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 20,
    rows_per_pass: int = 32,
) -> list[str]:
    """The model's greedy continuation of each prompt (special tokens dropped)."""
    device = next(model.parameters()).device
    prefix = bos_prefix(tokenizer)
    completions: list[str] = []
    for start in range(0, len(prompts), rows_per_pass):
        rows = [prefix + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start : start + rows_per_pass]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):  # left padding: every row's next token sits at the end
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id(tokenizer),
            )
        completions += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
    return completions
