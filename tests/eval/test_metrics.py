"""Metric formulas on hand-made cases."""

from __future__ import annotations

import math

import pytest

from alphaedit.eval.metrics import TfIdf, harmonic_mean, mean, ngram_entropy, perplexity, word_tokenize
from alphaedit.eval.evaluator import summarise


def test_word_tokenize_splits_punctuation_and_contractions():
    assert word_tokenize("Paris isn't in Italy, it's in France.") == ["Paris", "is", "n't", "in", "Italy", ",", "it", "'s", "in", "France", "."]


def test_ngram_entropy_of_a_repeated_word_is_zero():
    assert ngram_entropy("the the the the the") == 0.0


def test_ngram_entropy_of_distinct_tokens_follows_the_formula():
    # 5 distinct tokens: 4 distinct bigrams (H2 = log2 4 = 2), 3 distinct trigrams (H3 = log2 3)
    expected = (2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2
    assert ngram_entropy("a b c d e") == pytest.approx(expected)


def test_ngram_entropy_weights_repeated_bigrams_by_frequency():
    # tokens x y x y: bigrams xy, yx, xy -> p = (2/3, 1/3); trigrams xyx, yxy -> p = (1/2, 1/2)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("x y x y") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)


def test_tfidf_uses_smooth_idf_and_unit_vectors():
    tfidf = TfIdf(["paris is a city", "rome is a city", "paris paris"])
    # "paris" is in 2 of 3 documents: idf = ln(4/3) + 1; "rome" in 1: ln(4/2) + 1
    assert tfidf.idf["paris"] == pytest.approx(math.log(4 / 3) + 1)
    assert tfidf.idf["rome"] == pytest.approx(math.log(2) + 1)
    assert sum(v * v for v in tfidf.vector("paris rome city").values()) == pytest.approx(1.0)
    assert tfidf.cosine("paris city", "paris city") == pytest.approx(1.0)
    assert tfidf.cosine("paris", "rome") == 0.0
    assert 0 < tfidf.cosine("paris city", "rome city") < 1


def test_summary_is_a_mean_times_100_and_easyedit_names_mean_easyedit_metrics():
    rows = [
        {"efficacy": 1.0, "generalization": 0.5, "specificity": 1.0, "generative_success": 0.0, "fluency": 6.0, "consistency": 0.2,
         "rewrite_acc": 0.5, "rephrase_acc": 0.25},
        {"efficacy": 0.0, "generalization": 1.0, "specificity": 0.5, "generative_success": 1.0, "fluency": 5.0, "consistency": None,
         "rewrite_acc": 1.0, "rephrase_acc": 0.75},
    ]
    summary = summarise(rows)
    assert summary["efficacy"] == 50.0 and summary["rewrite_acc"] == 75.0  # the NLL comparison and the token accuracy differ
    assert summary["generalization"] == 75.0 and summary["rephrase_acc"] == 50.0
    assert summary["specificity"] == 75.0 and "locality" not in summary  # EasyEdit's is relative to the unedited model
    assert summary["fluency"] == pytest.approx(550.0)
    assert summary["consistency"] == pytest.approx(20.0)  # records without a value are left out


def test_small_helpers():
    assert mean([]) is None and mean([1, 2]) == 1.5
    assert harmonic_mean([1.0, 1.0]) == 1.0 and harmonic_mean([0.5, 0.0]) == 0.0
    assert perplexity(math.log(7) * 3, 3) == pytest.approx(7.0)
