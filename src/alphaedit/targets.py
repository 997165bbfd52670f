"""Target values z (v*): what the residual stream at the z layer should carry for each request.

For request i, δ_i is added to the output of block l_m at the subject's last token of all its
prompts, and minimised (ALGORITHM.md §1.4):

    loss_i = mean_prompts NLL(target | template + prompt)
           + kl_factor · KL(p_δ ‖ p_0)  at the last subject token of "{subject} is a"
           + weight_decay · ‖δ_i‖ / ‖h0_i‖²               (unsquared numerator, as the code)

with Adam, at most N iterations, stopping once loss_i < early_stop_loss, never stepping on the
last iteration, and clamping ‖δ_i‖ ≤ clamp·‖h0_i‖ after each step. z_i = h0_i + δ_i.
Optionally (`stop_when_most_probable`, after ENCORE's most-probable early stopping) a request
also stops once its new object is the argmax at every target token of every prompt.

All requests of a batch are optimised together: their rows share each forward/backward pass.
Each request has its own δ_i, loss and early stop, and Adam is elementwise, so the result is
the same as optimising each request alone (tests/test_targets.py checks this). Requests that
have stopped leave the pass, so later iterations only pay for the ones still moving.

Two caches make an iteration cheaper without changing what it computes:
- δ enters at block l_m, so the blocks up to l_m give the same output every iteration: it is
  recorded on the first and replayed after.
- δ enters at the subject's last token, so under causal attention the tokens before it (the
  context template and the start of the subject, most of each row) are the same at every
  layer and iteration: their attention keys and values are computed once, and each pass runs
  only the rest of the row, from δ's position on, against them. Whether the model honours a
  cache and explicit positions is checked on each batch (δ = 0 against a plain pass); if not,
  the passes run whole rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import inspect
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .config import EditConfig
from .hooks import frozen_parameters, replay_blocks, trace
from .layouts import Layout, get_module, output_logits
from .prompts import batch_rows, encode, fill, kl_prompt, target_ids
from .requests import EditRequest


PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: attention keys and values


@dataclass
class TargetRows:
    """The rows of one request: len(templates) rewriting prompts followed by the KL prompt."""

    ids: list[list[int]]
    lookup: list[int]
    target: list[int]  # the new object's token ids
    target_start: list[int]  # per rewriting row: position whose logits predict target[0]


@dataclass
class TargetResult:
    z: torch.Tensor  # [u, d] float32
    loss: list[float] = field(default_factory=list)  # final loss of each request
    steps: list[int] = field(default_factory=list)  # Adam steps taken per request
    target_prob: list[float] = field(default_factory=list)  # mean target-token probability at the end


def request_rows(tokenizer: PreTrainedTokenizerBase, request: EditRequest, templates: Sequence[str]) -> TargetRows:
    target = target_ids(tokenizer, request.target_new)
    ids, lookup, starts = [], [], []
    for template in templates:
        prompt_ids, idx = encode(tokenizer, fill(template, request))
        ids.append(prompt_ids + target[:-1])  # teacher forcing: the last target token is only predicted
        lookup.append(idx)
        starts.append(len(prompt_ids) - 1)
    kl_ids, kl_idx = encode(tokenizer, kl_prompt(request))
    ids.append(kl_ids)
    lookup.append(kl_idx)
    return TargetRows(ids, lookup, target, starts)


@dataclass
class _AdamState:
    """torch.optim.Adam's update (default betas/eps), per row so finished requests can leave."""

    lr: float
    m: torch.Tensor
    v: torch.Tensor
    step: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def update(self, delta: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.step += 1
        self.m[rows] = b1 * self.m[rows] + (1 - b1) * grad[rows]
        self.v[rows] = b2 * self.v[rows] + (1 - b2) * grad[rows] ** 2
        denom = (self.v[rows] / (1 - b2**self.step)).sqrt() + self.eps
        delta[rows] -= self.lr / (1 - b1**self.step) * self.m[rows] / denom


class _Losses:
    """Per-request NLL, KL and weight decay for one forward over a subset of requests.

    Each row is cut at its δ position: the tokens before it (the prefix) never see δ, at any
    layer, so with `split` their attention keys and values come from a cache filled once
    (`prefix_pass`) and every pass computes only the suffix, from δ's position on. Without
    `split` the cut is at 0 and each pass is a plain forward over the whole row.
    """

    def __init__(
        self, rows: list[TargetRows], model: PreTrainedModel, layout: Layout, tokenizer: PreTrainedTokenizerBase, split: bool
    ):
        self.model, self.layout = model, layout
        device = next(model.parameters()).device
        flat_ids = [r for req in rows for r in req.ids]
        flat_lookup = [i for req in rows for i in req.lookup]
        self.cuts = [lookup if split else 0 for lookup in flat_lookup]
        self.prefix = batch_rows(tokenizer, [ids[:cut] for ids, cut in zip(flat_ids, self.cuts)], self.cuts).to(device)
        self.suffix = batch_rows(tokenizer, [ids[cut:] for ids, cut in zip(flat_ids, self.cuts)], [0] * len(flat_ids)).to(device)
        self.suffix.lookup = torch.tensor([lk - cut for lk, cut in zip(flat_lookup, self.cuts)], device=device)
        self.positions = self._positions(flat_ids).to(device)
        self.per_request = len(rows[0].ids)
        self.num_requests = len(rows)
        owner, pos, tok, weight = [], [], [], []
        for r, req in enumerate(rows):
            for j, start in enumerate(req.target_start):
                row = r * self.per_request + j
                for t, token in enumerate(req.target):
                    owner.append(row)
                    pos.append(start + t - self.cuts[row])
                    tok.append(token)
                    # mean over target tokens, then over the rewriting prompts
                    weight.append(1.0 / (len(req.target) * len(req.target_start)))
        self.nll_rows = torch.tensor(owner, device=device)
        self.nll_pos = torch.tensor(pos, device=device)
        self.nll_tok = torch.tensor(tok, device=device)
        self.nll_weight = torch.tensor(weight, device=device)
        self.nll_request = self.nll_rows // self.per_request
        self.kl_rows = torch.arange(self.num_requests, device=device) * self.per_request + self.per_request - 1
        self.plain_rows = torch.arange(self.num_requests, device=device) * self.per_request

    def _positions(self, flat_ids: list[list[int]]) -> torch.Tensor:
        """Each suffix token's position in its whole row (pads repeat the row's last position,
        so they never index past what the model's positions cover)."""
        width = self.suffix.input_ids.shape[1]
        steps = torch.arange(width)
        return torch.stack([cut + steps.clamp(max=len(ids) - cut - 1) for ids, cut in zip(flat_ids, self.cuts)])

    @property
    def prefix_width(self) -> int:
        return max(self.cuts)

    def prefix_pass(self) -> PrefixKV:
        """The prefix's attention keys and values at every layer ([rows, heads, width, head_dim]).

        Pad positions are zeroed: a row whose prefix is empty is all padding, and its fully
        masked attention may leave NaN there, which a 0 attention weight would still spread.
        """
        cache = DynamicCache()
        with torch.no_grad():
            self.model.base_model(
                input_ids=self.prefix.input_ids, attention_mask=self.prefix.attention_mask,
                **{_cache_argument(self.model): cache}, use_cache=True,
            )
        layers = []
        for layer in cache.layers:
            real = self.prefix.attention_mask.to(layer.keys.device)[:, None, :, None].bool()
            layers.append((layer.keys.where(real, 0.0), layer.values.where(real, 0.0)))
        return layers

    def forward(
        self,
        delta: torch.Tensor,
        z_layer: int,
        below: torch.Tensor | None,
        prefix_kv: PrefixKV | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass over the suffixes with δ added at block `z_layer`'s output.

        `below` is that block's output without δ for these suffixes, from an earlier pass: when
        given, the blocks up to z_layer are not run again (they never see δ). `prefix_kv` is
        `prefix_pass()`'s result for these rows (None when nothing was cut).
        Returns (block output without δ [rows, S, d], h0 [u, d], token log-probs of the
        targets [n_tokens], KL-prompt log-probs [u, V]).
        """
        owner = torch.arange(self.suffix.input_ids.shape[0], device=delta.device) // self.per_request
        captured: dict[str, torch.Tensor] = {}

        def add_delta(hidden: torch.Tensor) -> torch.Tensor:
            # with device_map="auto" block l_m may sit on another device than δ
            captured["below"] = hidden.detach()
            shift = delta[owner].to(hidden.device, hidden.dtype)
            where = (self.suffix.rows.to(hidden.device), self.suffix.lookup.to(hidden.device))
            return hidden.index_put(where, shift, accumulate=True)

        inputs = dict(input_ids=self.suffix.input_ids, attention_mask=self.suffix.attention_mask, position_ids=self.positions)
        if prefix_kv is not None:
            # A fresh cache per pass: the pass appends the suffix's keys and values to it.
            inputs.update(
                attention_mask=torch.cat([self.prefix.attention_mask, self.suffix.attention_mask], dim=1),
                **{_cache_argument(self.model): DynamicCache(prefix_kv)}, use_cache=True,
            )
        blocks = [get_module(self.model, self.layout.block(i)) for i in range(z_layer + 1)]
        skip = replay_blocks(blocks, below) if below is not None else nullcontext()
        with trace(self.model, edit_outputs={self.layout.block(z_layer): add_delta}), skip:
            hidden = self.model.base_model(**inputs)[0]
        below = captured["below"]
        h0 = below[self.plain_rows.to(below.device), self.suffix.lookup[self.plain_rows].to(below.device)]
        h0 = h0.to(delta.device, delta.dtype)
        # Logits only where the loss reads them: target positions and the KL position. They are
        # computed on the head's device (the last one under device_map="auto"); the per-token
        # results come back to δ's.
        on = hidden.device
        precision = torch.promote_types(hidden.dtype, torch.float32)
        target_hidden = hidden[self.nll_rows.to(on), self.nll_pos.to(on)]
        target_logits = output_logits(self.model, self.layout, target_hidden).to(precision)
        tokens = self.nll_tok.to(target_logits.device)
        token_logp = target_logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0].to(delta.device)
        self.top1 = (target_logits.detach().argmax(-1) == tokens).float().to(delta.device)
        kl_hidden = hidden[self.kl_rows.to(on), self.suffix.lookup[self.kl_rows].to(on)]
        kl_logp = output_logits(self.model, self.layout, kl_hidden).to(precision).log_softmax(-1).to(delta.device)
        return below, h0, token_logp, kl_logp

    def scatter(self, below: torch.Tensor, chunk: list[int]) -> dict[int, torch.Tensor]:
        """Split a pass's block output into each request's rows (trimmed to their own length)."""
        lengths = self.suffix.attention_mask.sum(-1)
        out = {}
        for k, request in enumerate(chunk):
            rows = slice(k * self.per_request, (k + 1) * self.per_request)
            out[request] = below[rows, : int(lengths[rows].max())]
        return out

    def gather(self, below: dict[int, torch.Tensor], chunk: list[int]) -> torch.Tensor:
        """This chunk's block output, padded to its width (pad positions are never read)."""
        return _pad_cat([below[r] for r in chunk], self.suffix.input_ids.shape[1], dim=1)

    def scatter_prefix(self, layers: PrefixKV, chunk: list[int]) -> dict[int, PrefixKV]:
        """Split the prefix keys and values into each request's rows (trimmed to their own width)."""
        out = {}
        for k, request in enumerate(chunk):
            rows = slice(k * self.per_request, (k + 1) * self.per_request)
            width = max(self.cuts[rows])
            out[request] = [(keys[rows, :, :width], values[rows, :, :width]) for keys, values in layers]
        return out

    def gather_prefix(self, prefix_kv: dict[int, PrefixKV | None], chunk: list[int]) -> PrefixKV | None:
        """This chunk's prefix keys and values, padded to its prefix width (pads are masked).

        None when no row of the chunk has a prefix. A request stored as None (its rows had no
        prefix when it was first seen) contributes width-0 rows.
        """
        if self.prefix_width == 0:
            return None
        shape = next(prefix_kv[r] for r in chunk if prefix_kv[r] is not None)
        empty = [(k[: self.per_request, :, :0], v[: self.per_request, :, :0]) for k, v in shape]
        layers = zip(*(prefix_kv[r] or empty for r in chunk))
        return [
            (_pad_cat([k for k, _ in per_request], self.prefix_width, dim=2), _pad_cat([v for _, v in per_request], self.prefix_width, dim=2))
            for per_request in layers
        ]

    def nll(self, token_logp: torch.Tensor) -> torch.Tensor:
        per_request = torch.zeros(self.num_requests, device=token_logp.device, dtype=token_logp.dtype)
        return per_request.index_add(0, self.nll_request, -token_logp * self.nll_weight)

    def most_probable(self) -> torch.Tensor:
        """Per request: is the new object the argmax at every target token of every prompt?"""
        misses = torch.zeros(self.num_requests, device=self.top1.device).index_add(0, self.nll_request, 1 - self.top1)
        return misses == 0

    def target_prob(self, token_logp: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(self.num_requests, device=token_logp.device, dtype=token_logp.dtype)
        return total.index_add(0, self.nll_request, token_logp.exp() * self.nll_weight)


def _cache_argument(model: PreTrainedModel) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache`; older models still take the old name
    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"


def _pad_cat(parts: list[torch.Tensor], width: int, dim: int) -> torch.Tensor:
    """Concatenate along rows after zero-padding dimension `dim` of each part to `width`."""
    padded = []
    for part in parts:
        pad = [0, 0] * (part.dim() - dim - 1) + [0, width - part.shape[dim]]
        padded.append(torch.nn.functional.pad(part, pad))
    return torch.cat(padded)


def compute_targets(
    model: PreTrainedModel,
    layout: Layout,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    config: EditConfig,
    requests_per_pass: int = 16,
    on_iteration: Callable[[], None] | None = None,
) -> TargetResult:
    """Optimise z for every request of a batch, `requests_per_pass` requests per forward/backward.

    `on_iteration` is called after each iteration (progress reporting).
    """
    with frozen_parameters(model):
        return _optimise(model, layout, tokenizer, requests, templates, config, requests_per_pass, on_iteration)


def _optimise(
    model: PreTrainedModel,
    layout: Layout,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    config: EditConfig,
    requests_per_pass: int,
    on_iteration: Callable[[], None] | None,
) -> TargetResult:
    rows = [request_rows(tokenizer, r, templates) for r in requests]
    split = config.z_prefix_cache and _prefix_cache_is_exact(model, layout, tokenizer, rows, config.z_layer)
    device = next(model.parameters()).device
    u, d = len(requests), layout.hidden_size

    # δ and the optimiser stay float32 under a half-precision model (float64 stays float64).
    dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
    delta = torch.zeros(u, d, device=device, dtype=dtype)
    adam = _AdamState(config.v_lr, torch.zeros_like(delta), torch.zeros_like(delta))
    h0 = torch.zeros_like(delta)
    kl_init: dict[int, torch.Tensor] = {}
    below: dict[int, torch.Tensor] = {}  # request -> block z_layer output of its rows, without δ
    prefix_kv: dict[int, PrefixKV | None] = {}  # request -> attention keys/values of its prefixes
    active = list(range(u))
    final_loss, final_prob = torch.zeros(u, dtype=torch.float64), torch.zeros(u, dtype=torch.float64)
    steps = torch.zeros(u, dtype=torch.long)

    for it in range(config.v_num_grad_steps):
        grad = torch.zeros_like(delta)
        still_active = []
        for start in range(0, len(active), requests_per_pass):
            chunk = active[start : start + requests_per_pass]
            idx = torch.tensor(chunk, device=device)
            loss_fn = _Losses([rows[i] for i in chunk], model, layout, tokenizer, split)
            if it == 0:
                layers = loss_fn.prefix_pass() if loss_fn.prefix_width else None
                prefix_kv.update(loss_fn.scatter_prefix(layers, chunk) if layers else dict.fromkeys(chunk))
            chunk_delta = delta[idx].clone().requires_grad_(True)
            cached = loss_fn.gather(below, chunk) if it > 0 else None
            kv = loss_fn.gather_prefix(prefix_kv, chunk)
            chunk_below, chunk_h0, token_logp, kl_logp = loss_fn.forward(chunk_delta, config.z_layer, cached, kv)
            if it == 0:
                h0[idx] = chunk_h0
                kl_init.update({i: kl_logp[k].detach() for k, i in enumerate(chunk)})
                below.update(loss_fn.scatter(chunk_below, chunk))
            init = torch.stack([kl_init[i] for i in chunk])
            kl = config.kl_factor * (kl_logp.exp() * (kl_logp - init)).sum(-1)
            wd = config.v_weight_decay * chunk_delta.norm(dim=-1) / h0[idx].norm(dim=-1) ** 2
            loss = loss_fn.nll(token_logp) + kl + wd
            final_loss[chunk] = loss.detach().cpu().double()
            final_prob[chunk] = loss_fn.target_prob(token_logp.detach()).cpu().double()
            keep = (loss.detach() >= config.early_stop_loss) & (it < config.v_num_grad_steps - 1)
            if config.stop_when_most_probable:
                keep &= ~loss_fn.most_probable()
            if keep.any():
                (loss * keep).sum().backward()
                grad[idx] = chunk_delta.grad
            still_active += [i for k, i in enumerate(chunk) if keep[k]]
        active = still_active
        if on_iteration is not None:
            on_iteration()
        if not active:
            break
        moving = torch.tensor(active, device=device)
        with torch.no_grad():
            adam.update(delta, grad, moving)
            steps[active] += 1
            _clamp(delta, h0, config.clamp_norm_factor, moving)

    return TargetResult(h0 + delta, final_loss.tolist(), steps.tolist(), final_prob.tolist())


def _prefix_cache_is_exact(
    model: PreTrainedModel, layout: Layout, tokenizer: PreTrainedTokenizerBase, rows: list[TargetRows], z_layer: int
) -> bool:
    """Do passes over cut rows, with the prefixes' keys and values cached, reproduce plain passes?

    Checked once per batch on the request with the longest prefix, at δ = 0, so an architecture
    whose attention ignores the cache or the explicit positions falls back to plain passes
    instead of optimising against a wrong model.
    """
    probe = [max(rows, key=lambda r: max(r.lookup))]
    cut, plain = (_Losses(probe, model, layout, tokenizer, split) for split in (True, False))
    if cut.prefix_width == 0:
        return True  # no row has a prefix: both are the same pass
    dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
    zero = torch.zeros(1, layout.hidden_size, device=next(model.parameters()).device, dtype=dtype)
    with torch.no_grad():
        try:
            _, _, cut_logp, cut_kl = cut.forward(zero, z_layer, None, cut.prefix_pass())
        except (TypeError, ValueError) as error:
            warnings.warn(f"the z optimisation runs full passes: this model cannot take cached prefixes ({error})", stacklevel=3)
            return False
        _, _, plain_logp, plain_kl = plain.forward(zero, z_layer, None, None)
    gap = max((cut_logp - plain_logp).abs().max().item(), (cut_kl - plain_kl).abs().max().item())
    # Measured on SmolLM2 (log-prob units): cut vs whole rows differ by ≤ 6e-5 in float32 and
    # ≤ 0.36 in bf16 from rounding alone; ignoring the positions moves them by 5-12.
    tolerance = {torch.float64: 1e-8, torch.float32: 1e-3}.get(model.dtype, 1.0)
    if not gap <= tolerance:
        warnings.warn(
            f"the z optimisation runs full passes: with cached prefixes this model's log-probabilities moved by "
            f"{gap:.2g} (> {tolerance:g}), so its attention does not honour the cache or the positions",
            stacklevel=3,
        )
        return False
    return True


def _clamp(delta: torch.Tensor, h0: torch.Tensor, factor: float, rows: torch.Tensor) -> None:
    max_norm = factor * h0[rows].norm(dim=-1, keepdim=True)
    norm = delta[rows].norm(dim=-1, keepdim=True)
    delta[rows] = torch.where(norm > max_norm, delta[rows] * max_norm / norm, delta[rows])
