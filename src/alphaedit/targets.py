"""Target values z (v*): what the residual stream at the z layer should carry for each request.

For request i, δ_i is added to the output of block l_m at the subject's last token of all its
prompts, and minimised (ALGORITHM.md §1.4):

    loss_i = mean_prompts NLL(target | template + prompt)   (and reworded prompts, rewording.py)
           + kl_factor · KL(p_δ ‖ p_0)  at the last subject token of "{subject} is a"
           + weight_decay · ‖δ_i‖ / ‖h0_i‖²               (unsquared numerator, as the code)

with Adam, at most N iterations, never stepping on the last iteration, and clamping
‖δ_i‖ ≤ clamp·‖h0_i‖ after each step. z_i = h0_i + δ_i. A request stops early
- under `early_stop_rule="loss"` (the authors' code) once loss_i < early_stop_loss;
- under `early_stop_rule="nll"` once its target NLL alone (the first term) < early_stop_nll:
  the target is learnt, whatever the weight decay and KL terms say;
- and, with `stop_when_most_probable` (after ENCORE's most-probable early stopping), once its
  new object is the argmax at every target token of every prompt.
Reworded copies of the prompt train δ like the others, but the `nll` and most-probable stops
judge the prompt as asked (its context templates' rows): the copies shape what δ learns, not how
long it trains (on one-token CounterFact targets, judging the copies too cost 40% more steps).

All requests of a batch are optimised together: their prompts (rows) are packed by length
into shared forward/backward passes. Each request has its own δ_i, loss and early stop, and
Adam is elementwise, so the result is the same as optimising each request alone
(tests/test_targets.py checks this). Requests that have stopped leave the passes, so later
iterations only pay for the ones still moving.

Two caches make an iteration cheaper without changing what it computes (passes.py):
- δ enters at block l_m, so the blocks up to l_m give the same output every iteration: it is
  recorded on the first and replayed after.
- δ enters at the subject's last token, so under causal attention the tokens before it (the
  context template and the start of the subject, most of each row) are the same at every
  layer and iteration: their attention keys and values are computed once, and each pass runs
  only the rest of the row against them. Whether the model honours a cache and explicit
  positions is checked on each batch (δ = 0 against a plain pass); if not, passes run whole rows.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .config import EditConfig
from .hooks import frozen_parameters
from .layouts import Layout
from .passes import Pass, PassOutput, Row, RowCache, delta_dtype, plan_passes, prefix_cache_gap, prefix_passes, row_prefixes, shared_stems
from .prompts import PLAIN_TEMPLATE, encode, fill, kl_prompt, target_ids, templates_for
from .requests import EditRequest
from .rewording import reworded_prompts


@dataclass
class TargetRows:
    """The rows of one request: one rewriting prompt per context template (the plain one first),
    its reworded prompts (EditConfig.reworded_prompts) if any, then the KL prompt."""

    ids: list[list[int]]
    lookup: list[int]
    target: list[int]  # the new object's token ids
    target_start: list[int]  # per rewriting row: position whose logits predict target[0]
    asked: int  # the rewriting rows of the prompt itself (the rest are reworded copies)


@dataclass
class TargetResult:
    z: torch.Tensor  # [u, d] float32
    loss: list[float] = field(default_factory=list)  # final loss of each request
    steps: list[int] = field(default_factory=list)  # Adam steps taken per request
    target_prob: list[float] = field(default_factory=list)  # mean target-token probability at the end
    target_nll: list[float] = field(default_factory=list)  # final NLL of the target tokens (the loss's first term)
    value_shift: list[float] = field(default_factory=list)  # ‖δ_i‖ / ‖h0_i‖: how far each target value moved
    h0: torch.Tensor | None = None  # [u, d] the residual at the z layer before δ (z = h0 + δ)


def request_rows(tokenizer: PreTrainedTokenizerBase, request: EditRequest, templates: Sequence[str],
                 reworded: Sequence[str] = ()) -> TargetRows:
    """The prompt under every context template, then each reworded prompt (rewording.py) alone."""
    target = target_ids(tokenizer, request.target_new, leading_space=not request.chat_turn)
    ids, lookup, starts = [], [], []
    filled = [fill(template, request) for template in templates_for(request, templates)]
    asked = len(filled)
    filled += [fill(PLAIN_TEMPLATE, dataclasses.replace(request, prompt=prompt)) for prompt in reworded]
    for prompt in filled:
        prompt_ids, idx = encode(tokenizer, prompt)
        ids.append(prompt_ids + target[:-1])  # teacher forcing: the last target token is only predicted
        lookup.append(idx)
        starts.append(len(prompt_ids) - 1)
    kl_ids, kl_idx = encode(tokenizer, kl_prompt(request))
    ids.append(kl_ids)
    lookup.append(kl_idx)
    return TargetRows(ids, lookup, target, starts, asked)


def _flatten(form: int, rows: TargetRows, owner: int | None = None, share: float = 1.0) -> list[Row]:
    """One Row per prompt; the NLL is a mean over target tokens, then over rewriting prompts,
    weighted by `share` when two forms train one δ (owner: the form whose δ these rows add)."""
    owner = form if owner is None else owner
    weight = share / (len(rows.target) * len(rows.target_start))
    asked_scale = len(rows.target_start) / rows.asked  # the stop's NLL: the asked rows' mean
    flat = [
        Row(owner, ids, lookup, [(start + t, token, weight) for t, token in enumerate(rows.target)], is_plain=j == 0,
            h0_form=None if owner == form else form, stop_scale=asked_scale if j < rows.asked else 0.0)
        for j, (ids, lookup, start) in enumerate(zip(rows.ids, rows.lookup, rows.target_start))
    ]
    if owner != form:  # the owner's KL row already keeps the subject's essence
        return flat
    # The KL is read at the subject's last token: under causal attention " is a" after it
    # cannot change it, so the row ends there.
    return flat + [Row(owner, rows.ids[-1][: rows.lookup[-1] + 1], rows.lookup[-1], [], is_kl=True)]


@dataclass
class _AdamState:
    """torch.optim.Adam's update (default betas/eps), per row so finished requests can leave."""

    lr: float
    m: torch.Tensor
    v: torch.Tensor
    # [u] steps each row has taken: the same for every row still moving, except one that skipped
    # Adam on a warm start's jump and so takes its first Adam step later
    step: torch.Tensor
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def update(self, delta: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.step[rows] += 1
        t = self.step[rows, None].double()  # the bias corrections in float64, as Python floats would be
        self.m[rows] = b1 * self.m[rows] + (1 - b1) * grad[rows]
        self.v[rows] = b2 * self.v[rows] + (1 - b2) * grad[rows] ** 2
        denom = (self.v[rows] / (1 - b2**t).to(delta.dtype)).sqrt() + self.eps
        delta[rows] -= (self.lr / (1 - b1**t)).to(delta.dtype) * self.m[rows] / denom


@dataclass
class _Totals:
    """One iteration's per-request sums over the passes (detached)."""

    nll: torch.Tensor
    kl: torch.Tensor
    prob: torch.Tensor  # mean target-token probability
    misses: torch.Tensor  # target tokens of the asked prompts that are not the top-1 prediction
    asked_nll: torch.Tensor  # the NLL over the asked prompts alone (without reworded copies): what the stop judges

    def add(self, batch: Pass, out: PassOutput, row_kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one pass; returns its per-request NLL and KL, still differentiable."""
        nll = torch.zeros_like(self.nll).index_add(0, batch.read_owner, -out.token_logp * batch.read_weight)
        kl = torch.zeros_like(self.kl).index_add(0, batch.kl_owner, row_kl)
        self.nll += nll.detach()
        self.kl += kl.detach()
        self.prob.index_add_(0, batch.read_owner, out.token_logp.detach().exp() * batch.read_weight)
        self.misses.index_add_(0, batch.read_owner, (~out.top1 & (batch.read_stop_scale > 0)).to(self.misses.dtype))
        self.asked_nll.index_add_(0, batch.read_owner, -out.token_logp.detach() * batch.read_weight * batch.read_stop_scale)
        return nll, kl


def compute_targets(
    model: PreTrainedModel,
    layout: Layout,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    config: EditConfig,
    requests_per_pass: int | None = None,
    on_iteration: Callable[[], None] | None = None,
    owners: Sequence[int] | None = None,
    starts: Sequence[torch.Tensor | None] | None = None,
) -> TargetResult:
    """Optimise z for every request of a batch, `requests_per_pass` requests' rows per pass
    (default: config.v_requests_per_pass).

    `on_iteration` is called after each iteration (progress reporting). `owners[j]`: the request
    whose δ request j shares (j itself, or an earlier request: chat-aware editing's shared values).
    A request and the forms that share its δ train it together, each form an equal share of the
    NLL (half each for a request and its chat form); each keeps its own h0, so z_j = h0_j + δ_owner.
    `starts[j]` (EditConfig.rehearse_warm): a value [d] to start request j from, or None. h0 is
    only known after the first iteration, so that iteration runs at δ = 0 as usual, and its
    step is a jump to δ_j = starts[j] − h0_j (clamped) instead of Adam's; Adam takes over after.
    """
    owners = list(range(len(requests))) if owners is None else list(owners)
    requests_per_pass = requests_per_pass or config.v_requests_per_pass
    if any(owners[o] != o for o in owners):
        raise ValueError("a request that lends its δ must own it")
    sharing = Counter(owners)  # the forms training each δ, each an equal share of its NLL
    with frozen_parameters(model):
        rows = [row for i, r in enumerate(requests)
                for row in _flatten(i, request_rows(tokenizer, r, templates, reworded_prompts(r, config.reworded_prompts, config.reword_drop)), owners[i], 1 / sharing[owners[i]])]
        split = config.v_prefix_cache and _prefix_cache_is_exact(model, layout, tokenizer, rows, config.z_layer)
        cache = RowCache(len(rows), max(r.suffix_length(split) for r in rows), max(r.cut(split) for r in rows))
        device = next(model.parameters()).device
        u, d = len(requests), layout.hidden_size

        dtype = delta_dtype(model)
        delta = torch.zeros(u, d, device=device, dtype=dtype)
        adam = _AdamState(config.v_lr, torch.zeros_like(delta), torch.zeros_like(delta), torch.zeros(u, dtype=torch.long, device=device))
        warm = set() if starts is None else {i for i, start in enumerate(starts) if start is not None and owners[i] == i}
        h0 = torch.zeros_like(delta)
        kl_init: dict[int, torch.Tensor] = {}  # KL row -> its log-probs before any δ
        active = sorted(set(owners))  # only the owners' δ move
        final_loss, final_prob, final_nll = (torch.zeros(u, dtype=torch.float64) for _ in range(3))
        steps = torch.zeros(u, dtype=torch.long)

        if split:
            for chosen, kv in prefix_passes(rows, model, tokenizer):
                cache.store_prefix(chosen, kv)
        for it in range(config.v_num_grad_steps):
            last = it == config.v_num_grad_steps - 1  # the reference never steps on its last iteration
            leaf = delta.clone().requires_grad_(not last)
            totals = _Totals(*(torch.zeros(u, device=device, dtype=dtype) for _ in dataclasses.fields(_Totals)))
            for chosen in plan_passes(rows, active, requests_per_pass, split):
                batch = Pass([rows[i] for i in chosen], model, layout, tokenizer, split)
                below = cache.gather_below(chosen, batch.suffix_width) if it > 0 else None
                with torch.set_grad_enabled(not last):
                    out = batch.forward(leaf, config.z_layer, below, cache.gather_prefix(chosen, batch.prefix_width))
                kl_rows, kl_logp = [i for i in chosen if rows[i].is_kl], out.kl_logp
                if it == 0:
                    cache.store_below(chosen, out.below)
                    h0[batch.plain_form] = batch.plain_outputs(out.below).to(device, dtype)
                    kl_init.update({i: kl_logp[k].detach() for k, i in enumerate(kl_rows)})
                init = torch.stack([kl_init[i] for i in kl_rows]) if kl_rows else kl_logp.detach()
                nll, kl = totals.add(batch, out, config.kl_factor * (kl_logp.exp() * (kl_logp - init)).sum(-1))
                if not last:
                    (nll.sum() + kl.sum()).backward()
            moving = torch.tensor(active, device=device)
            wd = config.v_weight_decay * leaf[moving].norm(dim=-1) / h0[moving].norm(dim=-1) ** 2
            if not last:
                wd.sum().backward()
            loss = totals.nll[moving] + totals.kl[moving] + wd.detach()
            final_loss[active] = loss.cpu().double()
            final_prob[active] = totals.prob[moving].cpu().double()
            final_nll[active] = totals.nll[moving].cpu().double()
            if config.early_stop_rule == "nll":
                learnt = totals.asked_nll[moving] < config.early_stop_nll
            else:
                learnt = loss < config.early_stop_loss
            if config.stop_when_most_probable:
                learnt |= totals.misses[moving] == 0
            keep = ~learnt & (not last)
            active = [i for k, i in enumerate(active) if keep[k]]
            if on_iteration is not None:
                on_iteration()
            if not active:
                break
            jumping = [i for i in active if i in warm] if it == 0 else []  # their first step is the jump, not Adam's
            moving = torch.tensor(active, device=device)
            with torch.no_grad():
                adam.update(delta, leaf.grad, torch.tensor([i for i in active if i not in jumping], device=device, dtype=torch.long))
                if jumping:
                    delta[jumping] = torch.stack([starts[i].to(device, dtype) for i in jumping]) - h0[jumping]
                steps[active] += 1
                _clamp(delta, h0, config.clamp_norm_factor, moving)

        owner = torch.tensor(owners, device=device)
        delta = delta[owner]  # a form that shares δ takes its owner's, and its numbers
        final_loss, final_prob, final_nll, steps = (t[owner.cpu()] for t in (final_loss, final_prob, final_nll, steps))
        shift = (delta.norm(dim=-1) / h0.norm(dim=-1)).tolist()
        return TargetResult(h0 + delta, final_loss.tolist(), steps.tolist(), final_prob.tolist(), final_nll.tolist(), shift, h0.detach().clone())


def _prefix_cache_is_exact(model: PreTrainedModel, layout: Layout, tokenizer: PreTrainedTokenizerBase, rows: list[Row], z_layer: int) -> bool:
    """Do passes over cut rows, with the prefixes' keys and values cached, reproduce plain passes?

    Checked once per batch, at δ = 0, on the rows of the request with the longest prefix and
    one row of another request that shares a stem with one of them (so that prefixes computed
    after a shared stem are checked too), so an architecture whose attention ignores the cache or
    the explicit positions falls back to plain passes instead of optimising against a wrong model.
    """
    longest = max(rows, key=lambda r: r.lookup).owner
    probed = [r for r in rows if r.owner == longest]
    prefixes = row_prefixes(rows)
    stems = shared_stems(prefixes)
    own = {tuple(prefixes[i][: stems[i]]) for i in stems if rows[i].owner == longest and stems[i]}
    probed += [rows[i] for i in stems if rows[i].owner != longest and stems[i] and tuple(prefixes[i][: stems[i]]) in own][:1]
    try:
        gap = prefix_cache_gap(model, layout, tokenizer, probed, z_layer)
    except (TypeError, ValueError) as error:
        warnings.warn(f"the z optimisation runs full passes: this model cannot take cached prefixes ({error})", stacklevel=3)
        return False
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
