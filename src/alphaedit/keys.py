"""Key vectors: the input of W_out at the subject's last token, averaged over context templates.

k_i^l = 1/2 · k(plain prompt) + 1/2 · mean_j k(prefix_j + prompt)       (ALGORITHM.md §1.3)

One forward pass serves every requested layer (and, optionally, reads the residual stream at
the z layer for the same rows), and stops after the deepest module it needs. Everything is read
at the subject's last token, so each row runs only up to it (causal attention: later tokens
cannot change it), and rows are sorted by length into passes so that little is padding.

The editor reads keys once per edited layer, updating that layer's W_out in between, bottom-up.
A `KeyReader` keeps the output of the block below the last key layer it read; told that the
blocks below some index have not changed since, the next read replays them from that record.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .hooks import replay_blocks, run_forward, trace
from .layouts import Layout, get_module
from .prompts import PromptBatch, batch_rows, encode, fill, templates_for
from .requests import EditRequest


@dataclass
class KeyPass:
    keys: dict[int, torch.Tensor]  # layer -> [u, d0] float32
    plain_keys: dict[int, torch.Tensor]  # layer -> [u, d0]: the plain prompt's key alone (template 0)
    z_current: torch.Tensor | None  # [u, d] block output at the z layer, plain prompt, float32


def template_weights(num_templates: int) -> torch.Tensor:
    """Weight of each template in the key average: the plain prompt 1/2, the prefixes share 1/2."""
    if num_templates == 1:
        return torch.ones(1)
    prefix = 0.5 / (num_templates - 1)
    return torch.tensor([0.5] + [prefix] * (num_templates - 1))


def _rows_for(requests: Sequence[EditRequest], templates: Sequence[str]) -> list:
    # Row order: request-major, template-minor; each request's plain prompt first.
    return [fill(t, r) for r in requests for t in templates_for(r, templates)]


def _average(per_row: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[rows, d] request-major rows -> [u, d] template-weighted averages."""
    if len(set(counts)) == 1:  # every request under every template: one einsum
        per_template = per_row.view(len(counts), counts[0], -1)
        return torch.einsum("utd,t->ud", per_template, template_weights(counts[0]))
    return torch.stack([template_weights(n) @ rows for rows, n in zip(per_row.split(counts), counts)])


def _gather(values: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
    # values sit on their layer's device, which under device_map="auto" need not be the batch's
    return values[batch.rows.to(values.device), batch.lookup.to(values.device)].float()


class KeyReader:
    """Keys of one batch's rows, read pass after pass as the editor updates layers bottom-up."""

    def __init__(
        self,
        model: PreTrainedModel,
        layout: Layout,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        templates: Sequence[str],
        rows_per_pass: int = 64,
    ):
        self.model, self.layout = model, layout
        self.counts = [len(templates_for(r, templates)) for r in requests]  # rows per request
        encoded = [encode(tokenizer, prompt) for prompt in _rows_for(requests, templates)]
        rows = [ids[: lookup + 1] for ids, lookup in encoded]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        device = next(model.parameters()).device
        chunks = [order[start : start + rows_per_pass] for start in range(0, len(order), rows_per_pass)]
        self.batches = [batch_rows(tokenizer, [rows[i] for i in c], [len(rows[i]) - 1 for i in c]).to(device) for c in chunks]
        self.restore = torch.argsort(torch.tensor(order))  # back to request-major, template-minor rows
        self.recorded: tuple[int, list[torch.Tensor]] | None = None  # (block, its output per pass)

    def read(self, layers: Sequence[int], z_layer: int | None = None, unchanged_below: int = 0) -> KeyPass:
        """Template-averaged keys at `layers` and, if `z_layer` is given, the current z there.

        `unchanged_below`: blocks with a lower index have the same weights as at the previous read.
        """
        mlp_paths = {self.layout.mlp_out_path(layer): layer for layer in layers}
        z_path = self.layout.block(z_layer) if z_layer is not None else None
        lowest = min(min(layers), z_layer) if z_layer is not None else min(layers)
        deepest = max(layers) if z_layer is None else max(max(layers), z_layer)
        stop = self.layout.block(deepest) if z_layer is not None and z_layer >= max(layers) else self.layout.mlp_out_path(deepest)
        replay = self.recorded if self.recorded and self.recorded[0] < min(unchanged_below, lowest) else None
        record = self.layout.block(min(layers) - 1) if min(layers) > 0 else None
        outputs = [p for p in (z_path, record) if p is not None]

        collected: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        z_rows, recorded = [], []
        for k, batch in enumerate(self.batches):
            skip = replay_blocks(self._blocks(replay[0]), replay[1][k]) if replay else nullcontext()
            with torch.no_grad(), trace(self.model, inputs_of=list(mlp_paths), outputs_of=outputs, stop_after=stop) as rec, skip:
                run_forward(self.model.base_model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            for path, layer in mlp_paths.items():
                collected[layer].append(_gather(rec.inputs[path], batch).cpu())
            if z_path:
                z_rows.append(_gather(rec.outputs[z_path], batch).cpu())
            if record:
                recorded.append(rec.outputs[record])
        self.recorded = (min(layers) - 1, recorded) if record else None

        keys, plain = {}, {}
        first = torch.tensor([0, *self.counts[:-1]]).cumsum(0)  # each request's plain row
        for layer, chunks in collected.items():
            per_row = torch.cat(chunks)[self.restore]
            keys[layer], plain[layer] = _average(per_row, self.counts), per_row[first]
        z_current = torch.cat(z_rows)[self.restore][first] if z_path else None
        return KeyPass(keys, plain, z_current)

    def _blocks(self, last: int) -> list[torch.nn.Module]:
        return [get_module(self.model, self.layout.block(i)) for i in range(last + 1)]


def compute_keys(
    model: PreTrainedModel,
    layout: Layout,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    layers: Sequence[int],
    z_layer: int | None = None,
    rows_per_pass: int = 64,
) -> KeyPass:
    """Template-averaged keys at `layers` and, if `z_layer` is given, the current z at that layer."""
    return KeyReader(model, layout, tokenizer, requests, templates, rows_per_pass).read(layers, z_layer)
