"""Second moments of W_out's input over a corpus: C0 = (1/N) Σ_tokens k kᵀ (ALGORITHM.md §1.6).

One forward pass collects every edited layer and stops after the deepest one; each batch's
outer products are summed in float32 on the model's device and added into float64 totals;
padding positions are never counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..hooks import run_forward, trace
from ..layouts import Layout
from ..prompts import pad_id


@dataclass
class SecondMoment:
    """Uncentred second moment of one layer's keys, normalised by token count."""

    moment: torch.Tensor  # [d0, d0] float64
    count: int


class MomentAccumulator:
    """Running Σ k kᵀ per layer, each on its layer's device (`devices`: layer -> device)."""

    def __init__(self, devices: Mapping[int, torch.device], key_size: int):
        self.sums = {layer: torch.zeros(key_size, key_size, dtype=torch.float64, device=d) for layer, d in devices.items()}
        self.count = 0

    def add(self, layer: int, keys: torch.Tensor) -> None:
        keys = keys.float()
        self.sums[layer] += (keys.T @ keys).double().to(self.sums[layer].device)

    def snapshot(self, batches_done: int) -> dict[str, torch.Tensor]:
        """The running sums and position, for a checkpoint."""
        state = {f"sum.{layer}": total for layer, total in self.sums.items()}
        state["count"] = torch.tensor([self.count], dtype=torch.int64)
        state["batches_done"] = torch.tensor([batches_done], dtype=torch.int64)
        return state

    def restore(self, state: dict[str, torch.Tensor]) -> int:
        """Continue from a checkpoint; returns the number of batches it had consumed."""
        for layer, total in self.sums.items():
            total.copy_(state[f"sum.{layer}"])
        self.count = int(state["count"].item())
        return int(state["batches_done"].item())

    def result(self) -> dict[int, SecondMoment]:
        if self.count == 0:
            raise ValueError("the corpus gave no tokens; check --corpus and --tokens")
        return {layer: SecondMoment((s / self.count).cpu(), self.count) for layer, s in self.sums.items()}


def token_batches(windows: Iterable[list[int]], batch_tokens: int) -> Iterable[list[list[int]]]:
    """Group windows into batches of about `batch_tokens` padded tokens."""
    batch: list[list[int]] = []
    for window in windows:
        if batch and (len(batch) + 1) * max(map(len, [*batch, window])) > batch_tokens:
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def accumulate_batch(
    model: PreTrainedModel,
    layout: Layout,
    tokenizer: PreTrainedTokenizerBase,
    acc: MomentAccumulator,
    windows: list[list[int]],
) -> int:
    """Add one batch of token windows to the accumulator; returns the number of tokens counted."""
    device = next(model.parameters()).device
    width = max(map(len, windows))
    ids = torch.full((len(windows), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, window in enumerate(windows):
        ids[i, : len(window)] = torch.tensor(window)
        mask[i, : len(window)] = 1
    ids, mask = ids.to(device), mask.to(device)
    paths = {layout.mlp_out_path(layer): layer for layer in acc.sums}
    with torch.no_grad(), trace(model, inputs_of=list(paths), stop_after=layout.mlp_out_path(max(acc.sums))) as rec:
        run_forward(model.base_model, input_ids=ids, attention_mask=mask)
    real = mask.bool()
    for path, layer in paths.items():
        keys = rec.inputs[path]
        acc.add(layer, keys[real.to(keys.device)])
    counted = int(real.sum())
    acc.count += counted
    return counted
