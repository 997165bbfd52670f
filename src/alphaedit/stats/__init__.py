"""Preserved-knowledge statistics: corpus → one forward pass → cached second moments."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..layouts import Layout
from ..progress import progress_bar
from .cache import FORMAT_VERSION, StatsCache, model_identity, tokenizer_digest
from .corpus import SELF, describe, file_windows, self_windows
from .moments import MomentAccumulator, SecondMoment, accumulate_batch, token_batches

__all__ = ["CorpusSpec", "SecondMoment", "StatsCache", "second_moments"]


@dataclass(frozen=True)
class CorpusSpec:
    """Where the statistics' text comes from and how much of it to use."""

    corpus: str = SELF
    tokens: int = 20_000
    max_length: int = 256
    seed: int = 0
    batch_tokens: int = 4096

    def description(self) -> dict[str, str]:
        return {
            "corpus": describe(self.corpus),
            "tokens": str(self.tokens),
            "max_length": str(self.max_length),
            "seed": str(self.seed) if self.corpus == SELF else "-",
        }


def _windows(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: CorpusSpec) -> Iterable[list[list[int]]]:
    if spec.corpus == SELF:
        for sampled in self_windows(model, tokenizer, spec.tokens, spec.max_length, spec.seed):
            yield from token_batches(sampled, spec.batch_tokens)
    else:
        yield from token_batches(file_windows(spec.corpus, tokenizer, spec.tokens, spec.max_length), spec.batch_tokens)


def second_moments(
    model: PreTrainedModel,
    layout: Layout,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int],
    spec: CorpusSpec,
    cache: StatsCache | None = None,
    show_progress: bool = True,
) -> dict[int, SecondMoment]:
    """C0 for each layer, from the cache where present; the missing layers share one pass."""
    identity = model_identity(model, layout, list(layers))
    base = {**identity, "tokenizer": tokenizer_digest(tokenizer), **spec.description(), "dtype": "float64", "version": FORMAT_VERSION}
    descriptions = {layer: {**base, "layer": str(layer)} for layer in layers}
    found: dict[int, SecondMoment] = {}
    if cache is not None:
        for layer, description in descriptions.items():
            hit = cache.load(description)
            if hit is not None:
                found[layer] = SecondMoment(*hit)
    missing = [layer for layer in layers if layer not in found]
    if not missing:
        return found
    acc = MomentAccumulator(missing, layout.key_size, next(model.parameters()).device)
    with progress_bar(f"statistics ({spec.corpus})", total=spec.tokens, enabled=show_progress) as advance:
        for batch in _windows(model, tokenizer, spec):
            advance(accumulate_batch(model, layout, tokenizer, acc, batch))
    computed = acc.result()
    if cache is not None:
        for layer, stat in computed.items():
            cache.save(descriptions[layer], stat.moment, stat.count)
    return {**found, **computed}
