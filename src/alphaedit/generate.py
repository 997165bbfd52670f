"""Text generation, in one place: left-padded batches, greedy or sampled, seeded by the caller.

Context templates, the "self" statistics corpus, `alphaedit ask` and the fluency metric all
generate through `generate_rows`; `seeded` makes a sampled sequence reproducible.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .prompts import PLAIN_TEMPLATE, bos_prefix, pad_id

if TYPE_CHECKING:  # annotations only: the CLI imports this module, and transformers takes seconds to import
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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
    total_length: int | None = None,
    end_ids: Sequence[int] | None = None,
    on_pass: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """The new tokens generated after each row of prompt ids (left-padded batches).

    `total_length`: instead of `max_new_tokens` each, every row is continued until it is this many
    tokens long, prompt included, and generation does not stop at the end-of-sequence token (ROME's
    generate_fast, behind the fluency metric). Pass rows sorted by length: a pass runs as long as
    its shortest row needs. `end_ids`: tokens that end a row (default: the model's own end-of-sequence
    ids); a row that ends is padded after its end token. `on_pass(rows done, rows in all)` hears
    each pass end.
    """
    device = next(model.parameters()).device
    options = decoding_options(sampling)
    new_tokens: list[list[int]] = []
    for start in range(0, len(rows), rows_per_pass):
        chunk = rows[start : start + rows_per_pass]
        budgets = [max_new_tokens] * len(chunk) if total_length is None else [max(1, total_length - len(r)) for r in chunk]
        settings = dict(max_new_tokens=max(budgets), pad_token_id=pad_id(tokenizer), **options)
        if end_ids is not None:
            settings["eos_token_id"] = list(end_ids)
        if total_length is not None:  # one generation config, without an end-of-sequence token to stop at
            never_stop = copy.deepcopy(model.generation_config)
            never_stop.update(**settings)
            never_stop.eos_token_id = None
            settings = dict(generation_config=never_stop)
        ids, mask = _left_padded(tokenizer, chunk)
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **settings)
        # a token sampled at step t never depends on later ones: cutting a row at its budget is exact
        new_tokens += [row[ids.shape[1] : ids.shape[1] + budget].tolist() for row, budget in zip(out, budgets)]
        if on_pass is not None:
            on_pass(len(new_tokens), len(rows))
    return new_tokens


def decoding_options(sampling: Sampling | None) -> dict:
    """`model.generate` keywords for greedy decoding (`None`) or for `sampling`."""
    if sampling is None:
        return dict(do_sample=False)
    return dict(do_sample=True, top_k=sampling.top_k, top_p=sampling.top_p, temperature=sampling.temperature)


def until_end(tokens: Sequence[int], ends: Collection[int]) -> tuple[list[int], bool]:
    """The tokens before the first end token, and whether there was one."""
    end = next((k for k, t in enumerate(tokens) if t in ends), None)
    return list(tokens if end is None else tokens[:end]), end is not None


def end_of_turn_ids(model, tokenizer) -> set[int]:
    """Tokens that end an answer: the model's end-of-sequence ids and its chat end-of-turn marker."""
    ids = model.generation_config.eos_token_id
    ends = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ends.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ends.update(vocab[m] for m in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>") if m in vocab)
    return ends


def greedy_rows_and_first_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[list[int]],
    max_new_tokens: int,
    token_ids: Sequence[int],
    rows_per_pass: int = 16,
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy new tokens after each row, and log p(t | row) for each t in `token_ids`, [rows, len(token_ids)].

    The log-probabilities come from the logits of the first generation step: scoring one-token
    answers costs no pass beyond the generation's own.
    """
    device = next(model.parameters()).device
    new_tokens: list[list[int]] = []
    logprobs = []
    for start in range(0, len(rows), rows_per_pass):
        ids, mask = _left_padded(tokenizer, rows[start : start + rows_per_pass])
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_id(tokenizer), do_sample=False, output_logits=True, return_dict_in_generate=True)
        new_tokens += [row[ids.shape[1] :].tolist() for row in out.sequences]
        logprobs.append(out.logits[0].float().log_softmax(-1)[:, list(token_ids)].cpu())
    return new_tokens, torch.cat(logprobs) if logprobs else torch.zeros(0, len(token_ids))


def _left_padded(tokenizer: PreTrainedTokenizerBase, chunk: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids, left-padded so that every row's next token sits at the end; and the attention mask."""
    width = max(map(len, chunk))
    ids = torch.full((len(chunk), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(chunk):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 20,
    on_pass: Callable[[int, int], None] | None = None,
) -> list[str]:
    """The model's greedy continuation of each prompt (special tokens dropped)."""
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    new = generate_rows(model, tokenizer, rows, max_new_tokens, on_pass=on_pass)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in new]


def generate_context_templates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    words: Sequence[str],
    length: int,
    seed: int,
) -> list[str]:
    """["{}", "<sampled text>. {}", ...]: one top-5 sample per seed word, `length` tokens in all.

    Seeded (the reference is not) and decoded without special tokens, so no "<|begin_of_text|>"
    text leaks into the templates.
    """
    templates = [PLAIN_TEMPLATE]
    with seeded(model, seed):
        for word in words:
            ids = prompt_ids(tokenizer, word)
            (new,) = generate_rows(model, tokenizer, [ids], max(1, length - len(ids)), TOP5)
            text = tokenizer.decode(ids + new, skip_special_tokens=True)
            templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates
