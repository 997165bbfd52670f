"""NAS's norm-anchored target values (anchor.py, issue 14): against a hand computation, and in the editor."""

from __future__ import annotations

import copy

import pytest
import torch

from alphaedit.anchor import anchored_values, reference_norm
from alphaedit.config import EditConfig
from alphaedit.editor import Editor
from alphaedit.keys import compute_keys
from alphaedit.prompts import PLAIN_TEMPLATE
from alphaedit.residual import mlp_contribution
from alphaedit.stats import CorpusSpec, StatsCache
from alphaedit.targets import compute_targets
from conftest import WIKITEXT
from test_editor import REQUESTS

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_reference_is_the_mean_without_the_largest_five_percent():
    assert reference_norm(torch.arange(1.0, 21.0)) == pytest.approx(10.0)  # 20 norms: the largest one left out
    assert reference_norm(torch.tensor([3.0, 5.0])) == pytest.approx(4.0)  # fewer than 20: none left out


def test_each_value_is_rescaled_to_the_reference_and_an_outlier_is_dropped():
    h0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    m = torch.tensor([[0.5, 0.0], [0.0, 0.5], [1.0, 0.0]])
    delta = torch.tensor([[2.5, 0.0], [0.0, 0.5], [30.0, 0.0]])  # ‖m + δ‖ = 3, 1, 31
    z, dropped = anchored_values(h0 + delta, h0, m, reference=2.0)
    assert dropped.tolist() == [False, False, True]
    v = m + (z - h0)
    torch.testing.assert_close(v[:2].norm(dim=1), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(v[0], torch.tensor([2.0, 0.0]))  # the direction kept
    torch.testing.assert_close(z[2], h0[2])  # dropped: v* = m, so z = h0, no edit


def _editor(model, layout, tokenizer, tmp_path) -> Editor:
    config = EditConfig(method="memit", layers=[1, 2], v_num_grad_steps=4, v_lr=0.5, context_template_length=6, value_anchor=True)
    return Editor(model, tokenizer, config, layout=layout, corpus=CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64),
                  cache=StatsCache(tmp_path / "home"), show_progress=False)


def test_the_first_batch_sets_the_reference_on_the_unedited_model_and_later_batches_keep_it(llama, tokenizer, tmp_path):
    model, layout = llama
    model = copy.deepcopy(model)
    editor = _editor(model, layout, tokenizer, tmp_path)
    templates = editor.context_templates()
    targets = compute_targets(model, layout, tokenizer, REQUESTS[:2], templates, editor.config)
    keys = compute_keys(model, layout, tokenizer, REQUESTS[:2], [PLAIN_TEMPLATE], [2]).keys[2]
    m = mlp_contribution(model, layout, 2, keys)
    expected = reference_norm((m + targets.z - targets.h0).norm(dim=1))
    editor.edit(REQUESTS[:2])
    first = editor.history[0]
    assert first.value_reference == pytest.approx(expected, rel=1e-5)
    editor.edit(REQUESTS[2:])
    assert editor.history[1].value_reference == first.value_reference  # μ stays the unedited model's
    editor.save_state(tmp_path / "state")
    loaded = Editor.load_state(tmp_path / "state", copy.deepcopy(llama[0]), tokenizer, cache=StatsCache(tmp_path / "home"), show_progress=False)
    assert loaded.config.value_anchor and loaded.history[-1].value_reference == first.value_reference


def test_anchored_targets_have_the_reference_norm(llama, tokenizer, tmp_path):
    model, layout = llama
    model = copy.deepcopy(model)
    editor = _editor(model, layout, tokenizer, tmp_path)
    targets = compute_targets(model, layout, tokenizer, REQUESTS, editor.context_templates(), editor.config)
    z, reference, dropped = editor._anchored(REQUESTS, targets)
    keys = compute_keys(model, layout, tokenizer, REQUESTS, [PLAIN_TEMPLATE], [2]).keys[2]
    v = mlp_contribution(model, layout, 2, keys) + (z - targets.h0)
    off_reference = int(((v.norm(dim=1) - reference).abs() > 1e-3).sum())
    assert off_reference == dropped  # every value not dropped has the norm μ
