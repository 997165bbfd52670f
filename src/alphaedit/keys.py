"""Key vectors: the input of W_out at the subject's last token, averaged over context templates.

k_i^l = 1/2 · k(plain prompt) + 1/2 · mean_j k(prefix_j + prompt)       (ALGORITHM.md §1.3)

One forward pass serves every requested layer (and, optionally, reads the residual stream at
the z layer for the same rows), and stops after the deepest module it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .hooks import run_forward, trace
from .layouts import Layout
from .prompts import PromptBatch, batch_rows, encode, fill
from .requests import EditRequest


@dataclass
class KeyPass:
    keys: dict[int, torch.Tensor]  # layer -> [u, d0] float32
    z_current: torch.Tensor | None  # [u, d] block output at the z layer, plain prompt, float32


def template_weights(num_templates: int) -> torch.Tensor:
    """Weight of each template in the key average: the plain prompt 1/2, the prefixes share 1/2."""
    if num_templates == 1:
        return torch.ones(1)
    prefix = 0.5 / (num_templates - 1)
    return torch.tensor([0.5] + [prefix] * (num_templates - 1))


def _rows_for(requests: Sequence[EditRequest], templates: Sequence[str]) -> list:
    # Row order: request-major, template-minor, so row i*T + j is request i under template j.
    return [fill(t, r) for r in requests for t in templates]


def _gather(values: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
    # values sit on their layer's device, which under device_map="auto" need not be the batch's
    return values[batch.rows.to(values.device), batch.lookup.to(values.device)].float()


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
    """Template-averaged keys at `layers` and, if `z_layer` is given, the current z at that layer.

    Everything is read at the subject's last token, so each row is run only up to it (causal
    attention: later tokens cannot change it), and rows are sorted by length into passes so
    that little of a pass is padding.
    """
    num_templates = len(templates)
    weights = template_weights(num_templates)
    mlp_paths = {layout.mlp_out_path(layer): layer for layer in layers}
    z_path = layout.block(z_layer) if z_layer is not None else None
    deepest = max(layers) if z_layer is None else max(max(layers), z_layer)
    stop = layout.block(deepest) if z_layer is not None and z_layer >= max(layers) else layout.mlp_out_path(deepest)

    encoded = [encode(tokenizer, prompt) for prompt in _rows_for(requests, templates)]
    rows = [ids[: lookup + 1] for ids, lookup in encoded]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    collected: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    z_rows: list[torch.Tensor] = []
    device = next(model.parameters()).device
    for start in range(0, len(order), rows_per_pass):
        chosen = order[start : start + rows_per_pass]
        batch = batch_rows(tokenizer, [rows[i] for i in chosen], [len(rows[i]) - 1 for i in chosen]).to(device)
        with torch.no_grad(), trace(model, inputs_of=list(mlp_paths), outputs_of=[z_path] if z_path else [], stop_after=stop) as rec:
            run_forward(model.base_model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        for path, layer in mlp_paths.items():
            collected[layer].append(_gather(rec.inputs[path], batch).cpu())
        if z_path:
            z_rows.append(_gather(rec.outputs[z_path], batch).cpu())

    restore = torch.argsort(torch.tensor(order))  # back to request-major, template-minor rows
    keys = {}
    for layer, chunks in collected.items():
        per_template = torch.cat(chunks)[restore].view(len(requests), num_templates, -1)
        keys[layer] = torch.einsum("utd,t->ud", per_template, weights)
    z_current = None
    if z_path:
        z_current = torch.cat(z_rows)[restore].view(len(requests), num_templates, -1)[:, 0]
    return KeyPass(keys, z_current)
