"""Context templates and the tokenised prompt batches that keys and target values read.

Every pass over edit prompts needs the same three things: the text (a context template wrapped
around the request's prompt, the subject filled in), its token ids, and the index of the
subject's last token. `encode` computes all three in one place, from character offsets,
so the index is exact for any tokenizer (with or without a BOS token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .requests import EditRequest, RequestError

if TYPE_CHECKING:  # annotations only: the CLI imports this module, and transformers takes seconds to import
    from transformers import PreTrainedTokenizerBase

PLAIN_TEMPLATE = "{}"
_SUBJECT_MARK = "\ue000"  # a private-use character: stands for the subject while the chat template renders


@dataclass(frozen=True)
class FilledPrompt:
    """A prompt as text, with the character offset where the subject ends."""

    text: str
    subject_end: int


def fill(template: str, request: EditRequest) -> FilledPrompt:
    """template.format(prompt).format(subject), by slicing, so braces inside a subject are safe."""
    slot = template.index(PLAIN_TEMPLATE)
    prompt = template[:slot] + request.prompt + template[slot + 2 :]
    at = prompt.index(PLAIN_TEMPLATE)
    return FilledPrompt(prompt[:at] + request.subject + prompt[at + 2 :], at + len(request.subject))


def templates_for(request: EditRequest, templates: Sequence[str]) -> list[str]:
    """The context templates a request's prompt is read under: a chat turn is already a whole
    context (a system prompt may open it), so only the plain one."""
    return [PLAIN_TEMPLATE] if request.chat_turn else list(templates)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The text a chat model sees before answering `question`: the chat template's rendering of
    one user turn and the assistant's header, without a BOS token the tokenizer adds itself."""
    return chat_text(tokenizer, [{"role": "user", "content": question}])


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> str:
    """A conversation ({"role", "content"} turns) as the model sees it before its answer: the
    tokenizer's chat template, or "User: ...\nAssistant:" lines for a model without one."""
    if not has_chat_template(tokenizer):
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines + ["Assistant:"])
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token
    if bos and bos_prefix(tokenizer) and text.startswith(bos):
        text = text[len(bos) :]  # encode() and prompt_ids() put the tokenizer's own BOS back
    return text


def chat_form(tokenizer: PreTrainedTokenizerBase, request: EditRequest) -> EditRequest:
    """`request` asked in the tokenizer's chat template: its question as the user's turn, its
    new object as the start of the answer. The editor writes this form beside the plain one
    (EditConfig.chat), so that the edit holds when the model is asked in conversation."""
    if request.question is None:
        raise ValueError("chat_form needs a request with a question")
    text = chat_prompt(tokenizer, request.question.replace(PLAIN_TEMPLATE, _SUBJECT_MARK, 1))
    if text.count(_SUBJECT_MARK) != 1 or PLAIN_TEMPLATE in text:
        raise RequestError(f"the chat template of this tokenizer does not keep the question {request.question!r} intact")
    return EditRequest(text.replace(_SUBJECT_MARK, PLAIN_TEMPLATE), request.subject, request.target_new.strip(),
                       request.target_true, request.case_id, chat_turn=True)


def kl_prompt(request: EditRequest) -> FilledPrompt:
    """The essence prompt "{subject} is a" whose next-token distribution the KL term preserves."""
    return FilledPrompt(f"{request.subject} is a", len(request.subject))


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The BOS id the tokenizer adds by itself, if it adds one (Llama-3 does, SmolLM2 and GPT-2 don't)."""
    bos = tokenizer.bos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and probe[:1] == [bos] else []


def encode(tokenizer: PreTrainedTokenizerBase, prompt: FilledPrompt) -> tuple[list[int], int]:
    """Token ids of the prompt and the index of the token holding the subject's last character."""
    encoded = tokenizer(prompt.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    last = max(i for i, (start, end) in enumerate(offsets) if start < prompt.subject_end and end > start)
    prefix = bos_prefix(tokenizer)
    return prefix + list(ids), len(prefix) + last


@dataclass
class PromptBatch:
    """Right-padded token ids (the reference code's padding side) and per-row lookup indices."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lookup: torch.Tensor  # [rows] index of the subject's last token

    def to(self, device: torch.device) -> PromptBatch:
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device), self.lookup.to(device))

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.input_ids.shape[0], device=self.input_ids.device)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def batch_rows(tokenizer: PreTrainedTokenizerBase, rows: Sequence[list[int]], lookup: Sequence[int]) -> PromptBatch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return PromptBatch(ids, mask, torch.tensor(list(lookup), dtype=torch.long))


def target_ids(tokenizer: PreTrainedTokenizerBase, target: str, leading_space: bool = True) -> list[int]:
    """The new object's tokens, with a leading space (ALGORITHM.md §1.4; not after a chat turn's
    header, where an answer starts a line) and without BOS."""
    text = target.strip() if not leading_space else target if target.startswith(" ") else " " + target
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return list(ids)
