"""AlphaEdit on the real SmolLM2-135M: edits land, neighbours stay, earlier batches survive."""

from __future__ import annotations

import pytest
import torch

from alphaedit.editor import Editor
from alphaedit.requests import parse_requests
from alphaedit.scoring import prefers_new

pytestmark = pytest.mark.slow


def efficacy(model, tokenizer, records) -> float:
    requests = parse_requests(records)
    wins = prefers_new(model, tokenizer, [r.text() for r in requests], [r.target_new for r in requests], [r.target_true for r in requests])
    return float(wins.float().mean())


def neighbourhood_outcomes(model, tokenizer, records) -> torch.Tensor:
    """Per neighbourhood prompt: does the model prefer the true object over the new one?"""
    prompts, new, true = [], [], []
    for record in records:
        rewrite = record["requested_rewrite"]
        for prompt in record["neighborhood_prompts"]:
            prompts.append(prompt)
            new.append(rewrite["target_new"]["str"])
            true.append(rewrite["target_true"]["str"])
    return ~prefers_new(model, tokenizer, prompts, new, true)


def test_two_sequential_batches_edit_keep_neighbours_and_keep_earlier_edits(pristine, counterfact, stats_cache, wikitext_corpus):
    model, tokenizer = pristine
    first, second = counterfact[:4], counterfact[4:8]
    neighbours_before = neighbourhood_outcomes(model, tokenizer, first)
    assert efficacy(model, tokenizer, first) <= 0.5  # the edits are really counterfactual to begin with

    editor = Editor(model, tokenizer, corpus=wikitext_corpus, cache=stats_cache, show_progress=False)
    (report,) = editor.edit(parse_requests(first))

    assert efficacy(model, tokenizer, first) >= 0.75
    assert report.efficacy >= 0.75
    kept = (neighbourhood_outcomes(model, tokenizer, first) == neighbours_before).float().mean()
    assert kept >= 0.8
    assert all(1000 < rank < 1536 for rank in editor.projector_rank.values())

    editor.edit(parse_requests(second))
    assert efficacy(model, tokenizer, second) >= 0.75
    assert efficacy(model, tokenizer, first) >= 0.75
