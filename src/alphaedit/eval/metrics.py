"""Metric formulas on plain data, exactly as ALGORITHM.md §3 states them.

Everything here is a pure function of numbers or strings, so each formula is unit-tested on
hand-made cases; the model-facing scoring lives in `scoring.py`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

# Penn-Treebank-like word tokenisation (nltk.word_tokenize needs downloaded data): words,
# numbers, contractions split like "do n't"/"'s", and every other symbol on its own.
_WORD = re.compile(r"\w+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.]\w+)*|[^\w\s]", re.IGNORECASE)


def word_tokenize(text: str) -> list[str]:
    return _WORD.findall(text)


def ngram_entropy(text: str, weights: Sequence[float] = (2 / 3, 4 / 3), ns: Sequence[int] = (2, 3)) -> float:
    """Mean over n of w_n · H_n, H_n the entropy (bits) of the text's n-gram frequencies.

    With the defaults: (2/3·H2 + 4/3·H3) / 2, ROME's `n_gram_entropy` (§3.3).
    """
    tokens = word_tokenize(text)
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        entropy = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * entropy)
    return sum(values) / len(values)


class TfIdf:
    """TF-IDF vectors with idf from a reference corpus (ROME ships idf.npy; we build ours).

    idf(t) = ln((1 + N) / (1 + df(t))) + 1 (sklearn's smooth idf); vectors are L2-normalised.
    """

    def __init__(self, documents: Iterable[str]):
        df: Counter[str] = Counter()
        count = 0
        for doc in documents:
            df.update(set(self._terms(doc)))
            count += 1
        self.documents = count
        self.idf = {t: math.log((1 + count) / (1 + c)) + 1 for t, c in df.items()}

    @classmethod
    def from_idf(cls, vocabulary: dict[str, int], idf: Sequence[float]) -> TfIdf:
        """The vectoriser ROME fits with its idf.npy and tfidf_vocab.json (term -> index into idf)."""
        tfidf = cls([])
        tfidf.idf = {term: float(idf[index]) for term, index in vocabulary.items()}
        return tfidf

    @staticmethod
    def _terms(text: str) -> list[str]:
        return re.findall(r"\b\w\w+\b", text.lower())  # sklearn's default token pattern, lowercased

    def vector(self, text: str) -> dict[str, float]:
        tf = Counter(t for t in self._terms(text) if t in self.idf)
        vec = {t: c * self.idf[t] for t, c in tf.items()}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {t: v / norm for t, v in vec.items()} if norm else {}

    def cosine(self, a: str, b: str) -> float:
        va, vb = self.vector(a), self.vector(b)
        return sum(v * vb.get(t, 0.0) for t, v in va.items())


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def harmonic_mean(values: Sequence[float]) -> float:
    """ROME's `post_score`: 0 if any value is 0."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def perplexity(total_nll: float, tokens: int) -> float:
    return math.exp(total_nll / tokens)
