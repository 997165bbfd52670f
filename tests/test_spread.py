"""The joint spread (`EditConfig.spread="joint"`): each layer's part of one projected solve over the
layers still to write, against a float64 reference that stacks the layers into one least-squares
problem, and on a tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

from alphaedit.config import EditConfig
from alphaedit.keys import compute_keys
from alphaedit.methods.projection import joint_projected_solve, projected_solve
from alphaedit.updates import LayerStatistics
from test_editor import REQUESTS, _editor, _post_norm_model, _weights

pytestmark = pytest.mark.usefixtures("single_thread")

D0, D, U = 12, 5, 3
LAYERS = (3, 4, 5)


@pytest.fixture
def block():
    """Per layer: keys [d0, u], a projector onto half of a random C0's directions and earlier keys'
    C_p; one residual [d, u] for the block."""
    g = torch.Generator().manual_seed(0)
    keys, stats = {}, {}
    for layer in LAYERS:
        A = torch.randn(D0, 40, dtype=torch.float64, generator=g)
        evals, evecs = torch.linalg.eigh(A @ A.T / 40)
        low = evecs[:, evals < evals.median()]
        Kp = torch.randn(D0, 2 + layer, dtype=torch.float64, generator=g)
        keys[layer] = torch.randn(D0, U, dtype=torch.float64, generator=g)
        stats[layer] = LayerStatistics(None, low @ low.T, Kp @ Kp.T)
    return keys, stats, torch.randn(D, U, dtype=torch.float64, generator=g)


def _stacked_least_squares(keys, stats, R, alpha):
    """The reference: Δ_l = Y_l Q_lᵀ with Q_l an orthonormal basis of P_l's range, all Y_l found by one
    ridge regression over the stacked features [Q_lᵀ K_l] (normal equations, float64):
    min ‖Σ_l Y_l Q_lᵀ K_l − R‖² + Σ_l tr(Y_l Q_lᵀ (C_p,l + α I) Q_l Y_lᵀ)."""
    bases = {}
    for layer, s in stats.items():
        evals, evecs = torch.linalg.eigh(s.projector)
        bases[layer] = evecs[:, evals > 0.5]
    features = torch.cat([bases[l].T @ keys[l] for l in LAYERS])  # [Σ r_l, u]
    penalty = torch.block_diag(*[bases[l].T @ (stats[l].preserved + alpha * torch.eye(D0, dtype=torch.float64)) @ bases[l] for l in LAYERS])
    Y = R @ features.T @ torch.linalg.inv(features @ features.T + penalty)  # [d, Σ r_l]
    deltas, start = {}, 0
    for layer in LAYERS:
        width = bases[layer].shape[1]
        deltas[layer] = Y[:, start:start + width] @ bases[layer].T
        start += width
    return deltas


def test_the_joint_solve_minimises_the_blocks_objective(block):
    keys, stats, R = block
    for alpha in (0.5, 10.0):
        config = EditConfig(method="alphaedit", l2_alpha=alpha, solve_dtype="float64")
        joint = {l: d.dense().double() for l, d in joint_projected_solve(keys, R, stats, config).items()}
        expected = _stacked_least_squares(keys, stats, R, alpha)
        for layer in LAYERS:
            torch.testing.assert_close(joint[layer], expected[layer], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(joint[layer] @ stats[layer].projector, joint[layer], rtol=1e-5, atol=1e-6)  # in the null space (Δ are float32)


def test_with_one_layer_the_joint_solve_is_the_projected_solve(block):
    keys, stats, R = block
    config = EditConfig(method="alphaedit", l2_alpha=3.0, solve_dtype="float64")
    layer = LAYERS[0]
    joint = joint_projected_solve({layer: keys[layer]}, R, {layer: stats[layer]}, config)[layer].dense().double()
    alone = projected_solve(keys[layer], R, stats[layer], config).dense().double()
    torch.testing.assert_close(joint, alone, rtol=1e-5, atol=1e-6)


def test_the_joint_spread_is_refused_where_it_does_not_apply(tokenizer, vocab_size, tmp_path):
    with pytest.raises(ValueError, match="memit runs without the projection here"):
        EditConfig(method="memit", spread="joint")
    with pytest.raises(ValueError, match="spread must be one of sequential, joint"):
        EditConfig(spread="even")
    assert EditConfig(method="memit", project=True, spread="joint").spread == "joint"
    with pytest.raises(ValueError, match="normalises each MLP output first"):
        _editor(_post_norm_model("gemma2", vocab_size), tokenizer, tmp_path, spread="joint")


def test_a_joint_batch_writes_each_layers_part_of_a_solve_over_the_layers_still_to_write(llama, tokenizer, tmp_path):
    """On the tiny model: the first layer's Δ is its part of the joint solve over the whole block on
    the model before the batch; the last layer, with nothing after it, takes the authors' solve of
    all that is still missing; C_p takes the keys of the edited model."""
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, spread="joint")
    editor.edit(REQUESTS[:2])  # a first batch, so that the second sees C_p
    templates, layers, z_layer = editor.context_templates(), editor.config.layers, editor.config.z_layer
    z = editor._target_values(editor._sourced_forms(REQUESTS[2:]), templates, None).z
    weights, preserved = _weights(editor), {l: c.clone() for l, c in editor.preserved.items()}
    before = compute_keys(editor.model, layout, tokenizer, REQUESTS[2:], templates, layers, z_layer=z_layer)
    plan = joint_projected_solve({l: before.keys[l].T for l in layers}, (z - before.z_current).T, editor.statistics(), editor.config)
    first, last = layers[0], layers[-1]
    # what the last layer sees once the first is written: the reference applies the first Δ itself
    edited = copy.deepcopy(editor)
    edited._add_to_weight(first, plan[first], sign=1)
    then = compute_keys(edited.model, layout, tokenizer, REQUESTS[2:], templates, [last], z_layer=z_layer)
    alone = projected_solve(then.keys[last].T, (z - then.z_current).T, editor.statistics()[last], editor.config)
    editor.edit(REQUESTS[2:])
    after = compute_keys(editor.model, layout, tokenizer, REQUESTS[2:], templates, layers).keys
    torch.testing.assert_close(_weights(editor)[first] - weights[first], plan[first].dense(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(_weights(editor)[last] - weights[last], alone.dense(), rtol=1e-4, atol=1e-6)
    for layer in layers:
        torch.testing.assert_close(editor.preserved[layer] - preserved[layer], after[layer].T @ after[layer], rtol=1e-4, atol=1e-6)


def test_the_joint_spread_writes_more_of_the_residual_than_the_authors_loop(llama, tokenizer, tmp_path):
    """Where α holds each layer's share back, the loop leaves part of the residual unwritten; the
    joint solve, asking each layer for what the whole block can give, leaves less of it."""
    model, layout = llama
    missing = {}
    for spread in ("sequential", "joint"):
        editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, spread=spread, l2_alpha=5.0)
        templates = editor.context_templates()
        z = editor._target_values(editor._sourced_forms(REQUESTS[:2]), templates, None).z
        editor.edit(REQUESTS[:2])
        now = compute_keys(editor.model, layout, tokenizer, REQUESTS[:2], templates, editor.config.layers, z_layer=editor.config.z_layer)
        missing[spread] = float((z - now.z_current).norm())
    assert missing["joint"] < missing["sequential"]


def test_spread_from_the_command_line(tiny_model_folder, tmp_path):
    from alphaedit.cli.common import _method_label
    from test_methods import assert_edit_refuses, assert_eval_refuses, assert_recorded_and_kept, tiny_edit_command

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    common = [*common, "--json"]
    assert_edit_refuses(common, env, tmp_path, ((["--spread", "even"], "spread must be one of sequential, joint"),
                                                (["--spread", "joint", "--method", "memit"], "memit runs without the projection here")))
    assert_recorded_and_kept(common, env, tmp_path / "joint", "--spread", "joint", "sequential", "spread", "joint")
    assert _method_label(EditConfig(spread="joint")) == "alphaedit, joint spread"
    assert_eval_refuses(tiny_model_folder, env, tmp_path, ["--method", "rect", "--spread", "joint"], "rect runs without the projection here")
