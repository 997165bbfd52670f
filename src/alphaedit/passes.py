"""The forward passes of the z optimisation: rows of many requests, δ added at block l_m.

A row is one prompt of one request (a rewriting prompt with the target teacher-forced, or the
KL prompt). Rows are independent of each other, so a pass may hold any rows of any requests:
`plan_passes` packs the active ones by length, so little of a pass is padding.

Each row is cut at δ's position (the subject's last token). Under causal attention nothing
before the cut ever sees δ, so those tokens' attention keys and values are computed once
(`prefix_passes`, rows grouped by prefix length, not by the suffix grouping of the optimisation's
passes) and kept in a `RowCache`; every later pass runs only the suffix, from the cut on, against
them, with explicit positions. The cache also keeps block l_m's output of each
suffix, so after the first iteration the blocks up to l_m are replayed instead of run.
`targets._prefix_cache_is_exact` checks that a model honours both (δ = 0 against a plain pass).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .hooks import replay_blocks, trace
from .layouts import Layout, get_module, output_logits
from .prompts import PromptBatch, batch_rows

PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: attention keys and values
# Of a pass's token budget: a longer row that would pad the rows already in the pass by more
# than this starts a new pass. An eighth was fastest on SmolLM2 over a quarter and a sixteenth.
PADDING_ALLOWANCE = 0.125


def delta_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of δ, the optimiser and the loss weights: float32 under a half-precision model
    (Adam's small steps vanish in bfloat16), float64 under a float64 one (the reference tests)."""
    return torch.float64 if model.dtype == torch.float64 else torch.float32


@dataclass
class Row:
    """One prompt of one request, and what the loss reads from it."""

    owner: int  # the request whose δ this row adds (and trains)
    ids: list[int]
    lookup: int  # δ's position: the subject's last token
    reads: list[tuple[int, int, float]]  # NLL terms: (position whose logits predict, token, weight)
    is_kl: bool = False  # the "{subject} is a" row: KL at `lookup`
    is_plain: bool = False  # the plain-template row: h0 is block l_m's output at `lookup`
    # the form whose h0 a plain row gives, when it is not `owner` (a chat form that shares its
    # request's δ: its rows add and train that δ, its h0 is its own)
    h0_form: int | None = None
    # what this row's NLL counts for in the early stop, relative to the loss: 0 for a reworded copy
    # (it trains δ, but the stop judges the prompts that were asked), n_rows / n_asked for an asked
    # row, so that the asked rows' weights sum to what all rows' do
    stop_scale: float = 1.0

    def cut(self, split: bool) -> int:
        return self.lookup if split else 0

    def suffix_length(self, split: bool) -> int:
        return len(self.ids) - self.cut(split)


def plan_passes(rows: Sequence[Row], active: Sequence[int], requests_per_pass: int, split: bool) -> list[list[int]]:
    """Indices of the active requests' rows, grouped into passes.

    One request per pass: its own rows, as the authors' loop. More: all active rows sorted by
    suffix length and cut greedily into passes of at most `requests_per_pass` requests' worth
    of tokens (padding included); a pass also ends where the next, longer row would add more
    than PADDING_ALLOWANCE of that budget in padding to the rows already in it, since a
    separate pass then costs less than the padding (_by_budget, the same packer as the prefixes').
    """
    wanted = set(active)
    chosen = [i for i, row in enumerate(rows) if row.owner in wanted]
    if requests_per_pass == 1:
        by_request: dict[int, list[int]] = {}
        for i in chosen:
            by_request.setdefault(rows[i].owner, []).append(i)
        return list(by_request.values())
    width = {i: rows[i].suffix_length(split) for i in chosen}
    budget = requests_per_pass * sum(width.values()) / len(wanted)
    return list(_by_budget(sorted(chosen, key=width.__getitem__), width.__getitem__, budget, padding="added"))


class RowCache:
    """What the first iteration computed that later ones reuse, per row: block l_m's output
    over the suffix, and the prefix's attention keys and values at every layer. Each is one
    tensor over all rows, padded to the longest suffix / prefix, allocated on first store."""

    def __init__(self, num_rows: int, suffix_width: int, prefix_width: int):
        self.num_rows, self.suffix_width, self.prefix_width = num_rows, suffix_width, prefix_width
        self.below: torch.Tensor | None = None  # [rows, suffix width, d]
        self.prefix: PrefixKV | None = None  # per layer: keys, values [rows, heads, prefix width, head_dim]

    def store_below(self, rows: list[int], below: torch.Tensor) -> None:
        if self.below is None:
            self.below = below.new_zeros(self.num_rows, self.suffix_width, below.shape[-1])
        self.below[torch.tensor(rows, device=below.device), : below.shape[1]] = below

    def store_prefix(self, rows: list[int], layers: PrefixKV) -> None:
        if self.prefix is None:
            n, width = self.num_rows, self.prefix_width
            self.prefix = [
                (k.new_zeros(n, k.shape[1], width, k.shape[3]), v.new_zeros(n, v.shape[1], width, v.shape[3])) for k, v in layers
            ]
        index = _row_index(rows)
        for (keys, values), (k, v) in zip(self.prefix, layers):
            keys[index(keys.device), :, : k.shape[2]] = k
            values[index(keys.device), :, : v.shape[2]] = v

    def gather_below(self, rows: list[int], width: int) -> torch.Tensor:
        return self.below[torch.tensor(rows, device=self.below.device), :width]

    def gather_prefix(self, rows: list[int], width: int) -> PrefixKV | None:
        if width == 0 or self.prefix is None:
            return None
        index = _row_index(rows)
        return [(keys[index(keys.device), :, :width], values[index(keys.device), :, :width]) for keys, values in self.prefix]


def _row_index(rows: list[int]) -> Callable[[torch.device], torch.Tensor]:
    """`rows` as an index tensor on a given device, made once per device (every layer asks;
    under device_map="auto" the layers sit on a few devices)."""
    made: dict[torch.device, torch.Tensor] = {}

    def on(device: torch.device) -> torch.Tensor:
        if device not in made:
            made[device] = torch.tensor(rows, device=device)
        return made[device]

    return on


class PassOutput(NamedTuple):
    below: torch.Tensor  # [rows, S, d] block l_m's output without δ over the suffixes
    token_logp: torch.Tensor  # [reads] log-probs of the read (target) tokens
    top1: torch.Tensor  # [reads] whether each read token is the argmax
    kl_logp: torch.Tensor  # [KL rows, V] log-probs at the KL rows' δ position


class Pass:
    """One forward over some rows, cut at δ's position when `split` (else whole rows)."""

    def __init__(self, rows: Sequence[Row], model: PreTrainedModel, layout: Layout, tokenizer: PreTrainedTokenizerBase, split: bool):
        self.model, self.layout = model, layout
        device = next(model.parameters()).device
        self.cuts = [row.cut(split) for row in rows]
        self.prefix = batch_rows(tokenizer, [row.ids[:cut] for row, cut in zip(rows, self.cuts)], self.cuts).to(device)
        self.suffix = batch_rows(tokenizer, [row.ids[cut:] for row, cut in zip(rows, self.cuts)], [0] * len(rows)).to(device)
        self.suffix.lookup = torch.tensor([row.lookup - cut for row, cut in zip(rows, self.cuts)], device=device)
        self.widths = [len(row.ids) - cut for row, cut in zip(rows, self.cuts)]
        steps = torch.arange(self.suffix.input_ids.shape[1])
        # each suffix token's position in its whole row; pads repeat the row's last position
        self.positions = torch.stack([cut + steps.clamp(max=w - 1) for cut, w in zip(self.cuts, self.widths)]).to(device)
        self.row_owner = torch.tensor([row.owner for row in rows], device=device)
        # the NLL terms of these rows (a pass of short rows may hold only KL rows, and none)
        reads = [(k, pos - cut, token, row.owner) for k, (row, cut) in enumerate(zip(rows, self.cuts)) for pos, token, _ in row.reads]
        columns = list(zip(*reads)) or [(), (), (), ()]
        self.read_row, self.read_pos, self.read_token, self.read_owner = (torch.tensor(c, dtype=torch.long, device=device) for c in columns)
        self.read_weight = torch.tensor([w for row in rows for _, _, w in row.reads], dtype=delta_dtype(model), device=device)
        self.read_stop_scale = torch.tensor([row.stop_scale for row in rows for _ in row.reads], dtype=delta_dtype(model), device=device)
        self.kl_rows = torch.tensor([k for k, row in enumerate(rows) if row.is_kl], dtype=torch.long, device=device)
        self.kl_owner = self.row_owner[self.kl_rows]
        self.plain_rows = torch.tensor([k for k, row in enumerate(rows) if row.is_plain], dtype=torch.long, device=device)
        self.plain_form = torch.tensor([row.owner if row.h0_form is None else row.h0_form for row in rows if row.is_plain],
                                       dtype=torch.long, device=device)

    @property
    def prefix_width(self) -> int:
        return max(self.cuts)

    @property
    def suffix_width(self) -> int:
        return self.suffix.input_ids.shape[1]

    def forward(self, delta: torch.Tensor, z_layer: int, below: torch.Tensor | None, prefix_kv: PrefixKV | None) -> PassOutput:
        """δ[owner] added at block `z_layer`'s output at each row's δ position.

        `below`: that block's output without δ over these suffixes, from an earlier pass; when
        given, the blocks up to z_layer are replayed, not run. `prefix_kv`: the prefixes' keys
        and values (None when nothing was cut).
        """
        captured: dict[str, torch.Tensor] = {}

        def add_delta(hidden: torch.Tensor) -> torch.Tensor:
            # with device_map="auto" block l_m may sit on another device than δ
            captured["below"] = hidden.detach()
            shift = delta[self.row_owner.to(delta.device)].to(hidden.device, hidden.dtype)
            where = (self.suffix.rows.to(hidden.device), self.suffix.lookup.to(hidden.device))
            return hidden.index_put(where, shift, accumulate=True)

        inputs = dict(input_ids=self.suffix.input_ids, attention_mask=self.suffix.attention_mask, position_ids=self.positions)
        if prefix_kv is not None:
            # a fresh cache per pass: the pass appends the suffix's keys and values to it
            inputs.update(
                attention_mask=torch.cat([self.prefix.attention_mask, self.suffix.attention_mask], dim=1),
                **{cache_argument(self.model): DynamicCache(prefix_kv)}, use_cache=True,
            )
        blocks = [get_module(self.model, self.layout.block(i)) for i in range(z_layer + 1)]
        skip = replay_blocks(blocks, below) if below is not None else nullcontext()
        with trace(self.model, edit_outputs={self.layout.block(z_layer): add_delta}), skip:
            hidden = self.model.base_model(**inputs)[0]
        # Logits only where the loss reads them, on the head's device (the last one under
        # device_map="auto"); the per-token results come back to δ's.
        on = hidden.device
        precision = torch.promote_types(hidden.dtype, torch.float32)
        read_logits = output_logits(self.model, self.layout, hidden[self.read_row.to(on), self.read_pos.to(on)]).to(precision)
        tokens = self.read_token.to(read_logits.device)
        token_logp = read_logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0].to(delta.device)
        top1 = (read_logits.detach().argmax(-1) == tokens).to(delta.device)
        kl_hidden = hidden[self.kl_rows.to(on), self.suffix.lookup[self.kl_rows].to(on)]
        kl_logp = output_logits(self.model, self.layout, kl_hidden).to(precision).log_softmax(-1).to(delta.device)
        return PassOutput(captured["below"], token_logp, top1, kl_logp)

    def plain_outputs(self, below: torch.Tensor) -> torch.Tensor:
        """h0 of the forms whose plain-template row is in this pass (in `plain_form` order)."""
        rows = self.plain_rows.to(below.device)
        return below[rows, self.suffix.lookup[self.plain_rows].to(below.device)]


def prefix_kv(model: PreTrainedModel, prefix: PromptBatch) -> PrefixKV:
    """The attention keys and values of right-padded prefixes at every layer ([rows, heads, width, head_dim]).

    Pad positions are zeroed: a row whose prefix is empty is all padding, and its fully
    masked attention may leave NaN there, which a 0 attention weight would still spread.
    """
    cache = DynamicCache()
    with torch.no_grad():
        model.base_model(input_ids=prefix.input_ids, attention_mask=prefix.attention_mask, **{cache_argument(model): cache}, use_cache=True)
    layers = []
    for layer in cache.layers:
        real = prefix.attention_mask.to(layer.keys.device)[:, None, :, None].bool()
        layers.append((layer.keys.where(real, 0.0), layer.values.where(real, 0.0)))
    return layers


def prefix_passes(rows: Sequence[Row], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  tokens_per_pass: int = 2048) -> Iterator[tuple[list[int], PrefixKV]]:
    """(row indices, their prefixes' attention keys and values) for every row with a prefix.

    A prefix is a context template and the subject's first tokens. Every request's row of one
    template starts with the same tokens, its stem (shared_stems): the stems run once, in one
    pass, and each row then runs only the rest of its prefix against its stem's keys and
    values, at explicit positions. On CounterFact with the paper's five templates the rests are
    a quarter of the prefix tokens. Rows run sorted by the length of their rest, so that a pass
    is little padding (the optimisation's passes group rows by suffix length instead).
    """
    device = next(model.parameters()).device
    prefixes = row_prefixes(rows)
    stem_length = shared_stems(prefixes)
    stems = sorted({tuple(prefixes[i][:n]) for i, n in stem_length.items() if n})
    stem_of = {stem: g for g, stem in enumerate(stems)}
    stem_kv = prefix_kv(model, batch_rows(tokenizer, [list(t) for t in stems], [0] * len(stems)).to(device)) if stems else None
    order = sorted(prefixes, key=lambda i: len(prefixes[i]) - stem_length[i])
    for chosen in _by_budget(order, lambda i: len(prefixes[i]) - stem_length[i], tokens_per_pass):
        rests = batch_rows(tokenizer, [prefixes[i][stem_length[i] :] for i in chosen], [0] * len(chosen)).to(device)
        if stem_kv is None or not any(stem_length[i] for i in chosen):
            yield chosen, prefix_kv(model, rests)
            continue
        groups = [stem_of.get(tuple(prefixes[i][: stem_length[i]])) for i in chosen]
        yield chosen, _after_stems(model, rests, stem_kv, groups, [stem_length[i] for i in chosen])


def row_prefixes(rows: Sequence[Row]) -> dict[int, list[int]]:
    """Each row's tokens before δ's position, by row index, for the rows that have any."""
    return {i: row.ids[: row.lookup] for i, row in enumerate(rows) if row.lookup > 0}


def shared_stems(prefixes: dict[int, list[int]], min_length: int = 2) -> dict[int, int]:
    """Per row, the length of the longest token prefix it shares with another row, 0 when that
    is shorter than `min_length` (a shared first word saves nothing). Neighbours in sorted order
    share the longest prefixes, so one sort finds them without knowing the templates."""
    order = sorted(prefixes, key=lambda i: prefixes[i])
    stem = dict.fromkeys(prefixes, 0)
    for a, b in zip(order, order[1:]):
        x, y = prefixes[a], prefixes[b]
        common = next((k for k, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        stem[a], stem[b] = max(stem[a], common), max(stem[b], common)
    return {i: length if length >= min_length else 0 for i, length in stem.items()}


def _by_budget(members: list[int], width: Callable[[int], int], tokens_per_pass: float, padding: str = "total") -> Iterator[list[int]]:
    """Consecutive runs of `members` (sorted by width) whose padded size fits the budget and whose
    padding stays within PADDING_ALLOWANCE of it: all of a run's padding ("total": a prefix pass
    runs once, so a pass more costs little, unlike padding), or what the next, wider member would
    add to the members already in the run ("added": the optimisation's passes run every step)."""
    if padding not in ("total", "added"):
        raise ValueError(f"padding must be total or added, not {padding!r}")
    start = 0
    while start < len(members):
        end, real = start + 1, width(members[start])
        while end < len(members):
            wider, count = width(members[end]), end - start
            padded = (count + 1) * wider
            excess = padded - (real + wider) if padding == "total" else count * (wider - width(members[end - 1]))
            if padded > tokens_per_pass or excess > tokens_per_pass * PADDING_ALLOWANCE:
                break
            end, real = end + 1, real + wider
        yield members[start:end]
        start = end


def _after_stems(model: PreTrainedModel, rests: PromptBatch, stem_kv: PrefixKV, groups: list[int | None],
                 lengths: list[int]) -> PrefixKV:
    """Each row's stem (`groups[k]` of `stem_kv`, `lengths[k]` tokens, or none) and rest as one
    prefix's keys and values, [rows, heads, stem + rest, head_dim], padded after.

    The rests run with their stems as a cache laid out [stem | padding | rest]: masked padding
    in the middle is invisible to attention, and positions are explicit, so each rest token
    sees exactly what it sees in a whole-prefix pass. The result is packed to [stem | rest].
    """
    device = rests.input_ids.device
    rows, width, stem_width = rests.input_ids.shape[0], rests.input_ids.shape[1], stem_kv[0][0].shape[2]
    length = torch.tensor(lengths, device=device)
    stem_mask = (torch.arange(stem_width, device=device) < length[:, None]).to(rests.attention_mask.dtype)
    pick = torch.tensor([g if g is not None else 0 for g in groups], device=device)  # a row without a stem masks all of it
    cached = [(k[pick.to(k.device)], v[pick.to(v.device)]) for k, v in stem_kv]
    total = length + rests.attention_mask.sum(1)  # each row's prefix length
    if width == 0:  # every prefix is its stem
        return [(k[:, :, : int(total.max())], v[:, :, : int(total.max())]) for k, v in cached]
    cache = DynamicCache(cached)
    mask = torch.cat([stem_mask, rests.attention_mask], dim=1)
    positions = length[:, None] + torch.arange(width, device=device)
    with torch.no_grad():
        model.base_model(input_ids=rests.input_ids, attention_mask=mask, position_ids=positions,
                         **{cache_argument(model): cache}, use_cache=True)
    # where each packed position [0, stem + rest) sits in the [stem | padding | rest] layout
    j = torch.arange(int(total.max()), device=device).expand(rows, -1)
    source = torch.where(j < length[:, None], j, stem_width + j - length[:, None]).clamp(max=stem_width + width - 1)
    real = j < total[:, None]
    layers = []
    for layer in cache.layers:
        at = source.to(layer.keys.device)[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        keep = real.to(layer.keys.device)[:, None, :, None]
        layers.append((layer.keys.gather(2, at).where(keep, 0.0), layer.values.gather(2, at).where(keep, 0.0)))
    return layers


def cache_argument(model: PreTrainedModel) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache`; older models still take the old name
    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"


def prefix_cache_gap(model: PreTrainedModel, layout: Layout, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Row], z_layer: int) -> float:
    """Largest log-prob difference between cut rows with cached prefixes and whole rows, at δ = 0."""
    cut, plain = (Pass(rows, model, layout, tokenizer, split) for split in (True, False))
    if cut.prefix_width == 0:
        return 0.0  # nothing is cut: both are the same pass
    cache = RowCache(len(rows), cut.suffix_width, cut.prefix_width)
    for chosen, kv in prefix_passes(rows, model, tokenizer):  # as the optimisation computes them, stems shared
        cache.store_prefix(chosen, kv)
    zero = torch.zeros(max(r.owner for r in rows) + 1, layout.hidden_size, device=next(model.parameters()).device, dtype=delta_dtype(model))
    with torch.no_grad():
        cut_out = cut.forward(zero, z_layer, None, cache.gather_prefix(list(range(len(rows))), cut.prefix_width))
        plain_out = plain.forward(zero, z_layer, None, None)
    return max((cut_out.token_logp - plain_out.token_logp).abs().max().item(), (cut_out.kl_logp - plain_out.kl_logp).abs().max().item())
