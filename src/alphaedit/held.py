"""Texts an edit must leave alone: their keys in C_p from before the first batch.

The projected solve leaves W_out's output unchanged at the keys in C_p as firmly as at an earlier
edit's (a penalty ‖Δk‖² per key, against α‖Δ‖²). The projection P guards the preserved corpus's
keys only as far as C0 has a gap in its spectrum; SmolLM2's has none, so P leaves a quarter to a
half of ordinary text's key energy in the update's reach (BENCHMARKS.md, "How much the null space
protects"). Conversation is where that shows: an edited model's answers to questions about
subjects nobody edited change at every position (the subject, the question's words, the chat
template, the answer). Holding a sample of such conversations — questions and the unedited model's
own answers — adds Σ w k kᵀ over every token position of them to C_p, so each batch is solved to
leave what the model says there as it was. Not in the paper; off unless asked for.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .layouts import Layout
from .generate import prompt_ids
from .stats.moments import MomentAccumulator, accumulate_batch, token_batches


@dataclass(frozen=True)
class HeldTexts:
    """Texts held before the first batch, each key weighted `weight` (1: as an earlier edit's)."""

    texts: tuple[str, ...]
    weight: float = 1.0

    def __post_init__(self):
        if not self.texts:
            raise ValueError("no texts to hold: give at least one")
        bad = [i for i, t in enumerate(self.texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"held text {bad[0]} is empty or not a string: each must be the text whose outputs should stay")
        if not self.weight > 0:
            raise ValueError(f"held texts' weight {self.weight}: give a positive number (1 weighs each key as an earlier edit's)")

    def to_dict(self) -> dict:
        return {"texts": list(self.texts), "weight": self.weight}

    @classmethod
    def from_dict(cls, data: dict) -> HeldTexts:
        return cls(tuple(data["texts"]), float(data["weight"]))


def held_moments(model, layout: Layout, tokenizer, held: HeldTexts, layers: Sequence[int],
                 devices: dict[int, torch.device], batch_tokens: int = 4096) -> dict[int, torch.Tensor]:
    """w Σ k kᵀ [d0, d0] per layer over every token position of the held texts, keys read on the
    model as it is now (float32, on each layer's device)."""
    acc = MomentAccumulator({layer: devices[layer] for layer in layers}, layout.key_size)
    windows = [prompt_ids(tokenizer, text) for text in held.texts]
    for batch in token_batches(windows, batch_tokens):
        accumulate_batch(model, layout, tokenizer, acc, batch)
    return {layer: (held.weight * total).float() for layer, total in acc.sums.items()}


def read_held_file(path: str | Path) -> tuple[list[str], list[str]]:
    """`--hold FILE` (`alphaedit edit`, `multihop`): a JSON list whose items are texts to hold as they are, or
    {"question": ...} objects, asked in the chat template so that the unedited model's own answer
    is held with them. Returns (texts, questions); a bad file names the item and the fix."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--hold {path}: cannot read it as JSON ({e}); give a JSON list of texts or {{\"question\": ...}} objects") from e
    if not isinstance(items, list) or not items:
        raise ValueError(f"--hold {path}: give a non-empty JSON list of texts or {{\"question\": ...}} objects")
    texts, questions = [], []
    for i, item in enumerate(items, 1):
        if isinstance(item, str) and item.strip():
            texts.append(item)
        elif isinstance(item, dict) and set(item) == {"question"} and isinstance(item["question"], str) and item["question"].strip():
            questions.append(item["question"])
        else:
            raise ValueError(f"--hold {path}: item {i} must be a non-empty text or {{\"question\": \"...\"}} (with nothing else), "
                             f"not {json.dumps(item)[:80]}")
    return texts, questions
