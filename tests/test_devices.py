"""A model spread over two devices (device_map) edits exactly like the same model on one.

Needs a GPU: the tiny Llama is split between cuda:0 and the CPU with accelerate, so every
place where a layer's output meets tensors made elsewhere (statistics, keys, δ, the losses,
the solve, the efficacy probe, perplexity) is crossed. CI has no GPU and skips it; run it on
the lent GPU machine (`pytest tests/test_devices.py`).
"""

from __future__ import annotations

import copy

import pytest
import torch

from alphaedit.config import EditConfig
from alphaedit.editor import Editor
from alphaedit.eval.scoring import wikitext_perplexity
from alphaedit.layouts import mlp_out_weight
from alphaedit.requests import EditRequest
from alphaedit.stats import CorpusSpec, StatsCache
from conftest import WIKITEXT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to split the model across devices")

REQUESTS = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
]
# Block 1 (edited) and the head on the GPU; block 2 (edited, and the z layer) and the final
# norm on the CPU: δ, the statistics and the logits all live on different devices.
SPLIT = {
    "model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
    "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": 0,
}


def _edit(model, layout, tokenizer, home) -> dict[int, torch.Tensor]:
    config = EditConfig(layers=[1, 2], v_num_grad_steps=4, v_lr=0.5, nullspace_threshold=0.5, context_template_length=6)
    corpus = CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64)
    editor = Editor(model, tokenizer, config, layout=layout, corpus=corpus, cache=StatsCache(home), show_progress=False)
    before = {l: mlp_out_weight(model, layout, l).detach().cpu().clone() for l in config.layers}
    editor.edit(REQUESTS)
    return {l: mlp_out_weight(model, layout, l).detach().cpu() - before[l] for l in config.layers}


def test_an_edit_split_between_gpu_and_cpu_matches_the_cpu_edit(llama, tokenizer, tmp_path):
    from accelerate import dispatch_model

    model, layout = llama
    expected = _edit(copy.deepcopy(model), layout, tokenizer, tmp_path / "one")
    split = dispatch_model(copy.deepcopy(model), device_map=SPLIT, main_device="cpu")  # "cpu" runs there, not offloaded
    assert {p.device.type for p in split.parameters()} == {"cuda", "cpu"}
    deltas = _edit(split, layout, tokenizer, tmp_path / "split")
    for layer, delta in expected.items():
        assert delta.norm() > 0
        torch.testing.assert_close(deltas[layer], delta, rtol=1e-3, atol=1e-4)
    windows = [tokenizer(open(WIKITEXT / "wiki.test.raw").read(2000))["input_ids"][:64]]
    assert wikitext_perplexity(split, tokenizer, windows) > 0
