"""Text generation, in one place: left-padded batches, greedy or sampled, seeded by the caller.

Context templates, the "self" statistics corpus, `alphaedit ask` and the fluency metric all
generate through `generate_rows`; `seeded` makes a sampled sequence reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .prompts import bos_prefix, pad_id


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; `None` means greedy."""

    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0


TOP5 = Sampling(top_k=5)  # the reference code's generate_fast


@contextmanager
def seeded(model: PreTrainedModel, seed: int) -> Iterator[None]:
    """Fix the RNG for the enclosed sampling without disturbing the caller's RNG state."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt, with the BOS the tokenizer adds by itself, if any."""
    return bos_prefix(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


def generate_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[list[int]],
    max_new_tokens: int,
    sampling: Sampling | None = None,
    rows_per_pass: int = 32,
) -> list[list[int]]:
    """The new tokens generated after each row of prompt ids (left-padded batches)."""
    device = next(model.parameters()).device
    options = dict(do_sample=False) if sampling is None else dict(
        do_sample=True, top_k=sampling.top_k, top_p=sampling.top_p, temperature=sampling.temperature
    )
    new_tokens: list[list[int]] = []
    for start in range(0, len(rows), rows_per_pass):
        chunk = rows[start : start + rows_per_pass]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad_id(tokenizer), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(chunk):  # left padding: every row's next token sits at the end
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_id(tokenizer), **options)
        new_tokens += [row[width:].tolist() for row in out]
    return new_tokens


def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 20,
) -> list[str]:
    """The model's greedy continuation of each prompt (special tokens dropped)."""
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    return [tokenizer.decode(t, skip_special_tokens=True) for t in generate_rows(model, tokenizer, rows, max_new_tokens)]
