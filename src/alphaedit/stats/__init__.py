"""Preserved-knowledge statistics: corpus → one forward pass → cached second moments.

The pass is resumable (an atomic checkpoint every N tokens; a killed run continues where the
last checkpoint left off and ends with the same sums) and can be split over the processes of
a `torchrun` job, each taking every K-th batch, with the sums all-reduced at the end.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..layouts import Layout, mlp_out_weight
from ..progress import progress_bar
from .cache import StatsCache, config_digest, statistic_description, tokenizer_digest
from .corpus import SELF, CorpusSpec, document_windows, file_windows, self_windows
from .moments import MomentAccumulator, SecondMoment, accumulate_batch, token_batches

__all__ = ["CorpusSpec", "SecondMoment", "StatsCache", "second_moments", "statistic_description", "Workers"]


@dataclass(frozen=True)
class Workers:
    """This process's share of a multi-process pass: it takes batches rank, rank + size, ..."""

    rank: int = 0
    size: int = 1

    @classmethod
    def from_torch_distributed(cls) -> Workers:
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return cls()
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())

    def takes(self, batch_index: int) -> bool:
        return batch_index % self.size == self.rank

    def all_reduce(self, acc: MomentAccumulator) -> None:
        if self.size == 1:
            return
        for total in acc.sums.values():
            torch.distributed.all_reduce(total)
        count = torch.tensor([acc.count], dtype=torch.float64, device=next(iter(acc.sums.values())).device)
        torch.distributed.all_reduce(count)
        acc.count = int(count.item())


def _windows(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: CorpusSpec, cache: StatsCache | None, show_progress: bool
) -> list[list[int]]:
    if spec.corpus != SELF and spec.sampling == "documents":
        return document_windows(spec.corpus, tokenizer, spec.tokens, spec.max_length, spec.seed)
    if spec.corpus != SELF:
        return file_windows(spec.corpus, tokenizer, spec.tokens, spec.max_length)
    key = {"config": config_digest(model), "tokenizer": tokenizer_digest(tokenizer), **spec.description()}
    if cache is not None and (stored := cache.load_corpus(key)) is not None:
        return stored
    windows: list[list[int]] = []
    with progress_bar("sampling the 'self' corpus", total=spec.tokens, enabled=show_progress) as advance:
        for sampled in self_windows(model, tokenizer, spec.tokens, spec.max_length, spec.seed):
            windows += sampled
            advance(sum(map(len, sampled)))
    if cache is not None:
        cache.save_corpus(key, windows)
    return windows


def _pass_key(descriptions: dict[int, dict[str, str]], workers: Workers) -> str:
    text = json.dumps({"layers": descriptions, "rank": workers.rank, "size": workers.size}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def second_moments(
    model: PreTrainedModel,
    layout: Layout,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int],
    spec: CorpusSpec,
    cache: StatsCache | None = None,
    show_progress: bool = True,
    checkpoint_every: int = 1_000_000,
    workers: Workers | None = None,
    restart: bool = False,
) -> dict[int, SecondMoment]:
    """C0 for each layer, from the cache where present; the missing layers share one pass.

    `restart` discards this pass's checkpoint (and only this pass's: other corpora, layers or
    workers keep theirs) instead of resuming from it.
    """
    workers = workers or Workers.from_torch_distributed()
    descriptions = {layer: statistic_description(model, layout, tokenizer, layer, spec) for layer in layers}
    found: dict[int, SecondMoment] = {}
    if cache is not None:
        for layer, description in descriptions.items():
            hit = cache.load(description)
            if hit is not None:
                found[layer] = SecondMoment(*hit)
    missing = [layer for layer in layers if layer not in found]
    if not missing:
        return found
    if spec.imported is not None:
        raise ValueError(f"no statistics imported from {spec.imported} for layers {missing}: run `alphaedit stats --import FILE --layers ...` first")
    if cache is not None and workers.rank == 0:  # whatever the progress setting: a pass can take hours
        _say_why_a_pass_starts(cache, descriptions[missing[0]], missing, spec)
    pass_key = _pass_key({l: descriptions[l] for l in missing}, workers)
    if restart and cache is not None:
        cache.drop_checkpoint(pass_key)
    acc = _accumulate(model, layout, tokenizer, missing, spec, cache, show_progress, checkpoint_every, workers, pass_key)
    workers.all_reduce(acc)
    computed = acc.result()
    if cache is not None:
        if workers.rank == 0:
            for layer, stat in computed.items():
                cache.save(descriptions[layer], stat.moment, stat.count)
        cache.drop_checkpoint(pass_key)  # only once the result is safely stored
    return {**found, **computed}


def _say_why_a_pass_starts(cache: StatsCache, description: dict[str, str], missing: list[int], spec: CorpusSpec) -> None:
    """Before a (possibly hours-long) pass: what was asked for, and why no cached statistic fits."""
    wanted = f"corpus {spec.corpus}, {spec.tokens} tokens, windows of {spec.max_length}" + (f", seed {spec.seed}" if spec.corpus == SELF else "")
    if spec.sampling == "documents" and spec.corpus != SELF:
        wanted += f", documents sampled with seed {spec.seed}"
    lines = [f"computing statistics for layers {missing} ({wanted}): none cached for these settings"]
    for path, differs in cache.near_misses(description)[:5]:
        detail = "; ".join(f"{k} {a} (wanted {b})" for k, (a, b) in differs.items())
        lines.append(f"  cached but different: {path.name}: {detail}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _accumulate(model, layout, tokenizer, layers, spec, cache, show_progress, checkpoint_every, workers, pass_key) -> MomentAccumulator:
    acc = MomentAccumulator({l: mlp_out_weight(model, layout, l).device for l in layers}, layout.key_size)
    done_batches, since_checkpoint = 0, 0
    if cache is not None and (saved := cache.load_checkpoint(pass_key)) is not None:
        done_batches = acc.restore(saved)
    windows = _windows(model, tokenizer, spec, cache, show_progress)
    batches = list(token_batches(windows, spec.batch_tokens))
    total = sum(len(w) for i, b in enumerate(batches) if workers.takes(i) for w in b)
    # the corpus by its file name: a long path would squeeze the count and the ETA out of the line
    shown = spec.corpus.rstrip("/").rsplit("/", 1)[-1] if "/" in spec.corpus and not spec.corpus.startswith("hf:") else spec.corpus
    with progress_bar(f"statistics ({shown})", total=total, enabled=show_progress) as advance:
        advance(sum(len(w) for i, b in enumerate(batches[:done_batches]) if workers.takes(i) for w in b))
        for index in range(done_batches, len(batches)):
            if workers.takes(index):
                counted = accumulate_batch(model, layout, tokenizer, acc, batches[index])
                advance(counted)
                since_checkpoint += counted
            if cache is not None and since_checkpoint >= checkpoint_every and index + 1 < len(batches):
                cache.save_checkpoint(pass_key, acc.snapshot(index + 1))
                since_checkpoint = 0
    return acc
