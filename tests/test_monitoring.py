"""Monitoring of long sequences (issue 14): each batch report carries the growth of the edited
matrices against the base, the target values' norms and the null-space rank."""

from __future__ import annotations

import copy

import pytest
import torch

from alphaedit.config import EditConfig
from alphaedit.editor import Editor
from alphaedit.keys import compute_keys
from alphaedit.layouts import mlp_out_weight
from alphaedit.requests import EditRequest
from alphaedit.stats import CorpusSpec, StatsCache
from alphaedit.targets import compute_targets
from conftest import WIKITEXT

pytestmark = pytest.mark.usefixtures("single_thread")

REQUESTS = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
]


def _editor(model, layout, tmp_path, tokenizer) -> Editor:
    config = EditConfig(layers=[1, 2], v_num_grad_steps=4, v_lr=0.5, nullspace_threshold=0.5, context_template_length=6)
    return Editor(model, tokenizer, config, layout=layout, corpus=CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64),
                  cache=StatsCache(tmp_path / "home"), show_progress=False)


def test_each_report_measures_the_growth_of_the_edited_matrices_against_the_base(llama, tokenizer, tmp_path):
    model, layout = llama
    model = copy.deepcopy(model)
    base = {l: mlp_out_weight(model, layout, l).detach().double().clone() for l in (1, 2)}
    editor = _editor(model, layout, tmp_path, tokenizer)
    reports = editor.edit(REQUESTS, batch_size=1)
    for layer in (1, 2):
        now = mlp_out_weight(model, layout, layer).detach().double()
        growth = reports[-1].weight_growth[str(layer)]
        assert growth["frobenius"] == pytest.approx(float(now.norm() / base[layer].norm()), rel=1e-5)
        spectral = torch.linalg.svdvals(now)[0] / torch.linalg.svdvals(base[layer])[0]
        assert growth["spectral"] == pytest.approx(float(spectral), rel=1e-9)  # float64 either way
        assert growth["frobenius"] != 1.0  # the edit did change the matrix
    assert reports[-1].null_space_rank == {str(l): r for l, r in editor.projector_rank.items()} and reports[-1].null_space_rank


def test_the_value_shift_is_the_targets_distance_from_the_unedited_residual(llama, tokenizer, tmp_path):
    model, layout = llama
    model = copy.deepcopy(model)
    editor = _editor(model, layout, tmp_path, tokenizer)
    templates = editor.context_templates()
    h0 = compute_keys(model, layout, tokenizer, REQUESTS, templates, [2], z_layer=2).z_current
    z = compute_targets(model, layout, tokenizer, REQUESTS, templates, editor.config).z
    report = editor.edit(REQUESTS)[0]
    assert report.value_shift == pytest.approx(float(((z - h0).norm(dim=1) / h0.norm(dim=1)).mean()), rel=1e-4)
    assert report.value_norm == pytest.approx(float(z.norm(dim=1).mean()), rel=1e-5)


def test_monitoring_survives_the_journal(llama, tokenizer, tmp_path):
    model, layout = llama
    editor = _editor(copy.deepcopy(model), layout, tmp_path, tokenizer)
    editor.edit(REQUESTS[:1])
    editor.save_state(tmp_path / "state")
    loaded = Editor.load_state(tmp_path / "state", copy.deepcopy(model), tokenizer, cache=StatsCache(tmp_path / "home"), show_progress=False)
    assert loaded.history[0].weight_growth == editor.history[0].weight_growth
    assert loaded.history[0].value_shift == editor.history[0].value_shift


@pytest.mark.parametrize("shape", [(5, 37), (37, 5), (16, 16)])
def test_norms_summed_over_slices_equal_float64_references(shape):
    """‖W‖_F and σ_max from a Gram matrix summed over slices of the long side (3 columns at a
    time here, so the last slice is short) equal the float64 norm and largest singular value."""
    from alphaedit.editor import _norms

    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    fro, spectral = _norms(weight, chunk=3)
    exact = weight.double()
    assert fro == pytest.approx(float(torch.linalg.matrix_norm(exact)), rel=1e-12)
    assert spectral == pytest.approx(float(torch.linalg.svdvals(exact)[0]), rel=1e-9)
