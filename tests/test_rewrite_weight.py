"""A rehearsal's re-writes weighed more in the solve (`EditConfig.rewrite_weight`): each layer's
update is the weighted least squares Σ w_j ‖Δk_j − r_j‖² + ‖Δ K_p‖² + α‖Δ‖² under P, checked in
float64 against the normal equations, with the batch's own columns at weight 1 and the re-writes
at w; a re-write is written further for it."""

from __future__ import annotations

import copy

import pytest
import torch

from alphaedit.config import EditConfig
from test_editor import REQUESTS, _editor
from test_rehearse import WEAK

pytestmark = pytest.mark.usefixtures("single_thread")

DARRIEUX, TOWER, RIVER, SEINE = REQUESTS


def _solves(editor, monkeypatch) -> list[dict]:
    """Spy: per layer solved, its inputs (keys [u, d0], residual share [u, d], weights) and C_p then."""
    seen: list[dict] = []
    real = editor._solve_layer

    def spy(layer, keys, plain_keys, resid, statistics, kept=None, weights=None):
        seen.append({"layer": layer, "keys": keys.double().clone(), "resid": resid.double().clone(), "weights": weights,
                     "preserved": statistics.preserved.double().cpu().clone(), "projector": statistics.projector.double().cpu().clone()})
        return real(layer, keys, plain_keys, resid, statistics, kept, weights)

    monkeypatch.setattr(editor, "_solve_layer", spy)
    return seen


@pytest.mark.parametrize("weight", [1.0, 4.0])
def test_each_layer_solves_the_weighted_least_squares(llama, tokenizer, tmp_path, monkeypatch, weight):
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, rehearse=1, rehearse_cap=4, rewrite_weight=weight,
                     chat=False, **WEAK)
    editor.edit([DARRIEUX, TOWER])
    seen = _solves(editor, monkeypatch)
    editor.edit([SEINE])
    rehearsed = editor.batches[-1].rehearsed
    assert rehearsed, "the weak batch should leave something to rehearse"
    alpha = editor.config.l2_alpha
    for solve in seen:
        # the reference: the batch's own column weighs 1, each re-write `weight` (Llama's W_out adds
        # to the residual stream as it is, so the share asked of W_out is the residual share)
        K, R = solve["keys"].T, solve["resid"].T  # [d0, u], [d, u]
        W = torch.diag(torch.tensor([1.0] + [weight] * len(rehearsed), dtype=torch.float64))
        P, Cp = solve["projector"], solve["preserved"]
        # d/dΔ of Σ w_j ‖Δk_j − r_j‖² + ‖Δ P K_p‖² + α‖Δ P‖² over Δ = Δ̃P, as the authors' code writes it
        V = torch.linalg.solve(P @ (K @ W @ K.T + Cp) + alpha * torch.eye(K.shape[0], dtype=torch.float64), P @ K @ W)
        expected = R @ V.T  # [d, d0]
        got = editor.batches[-1].deltas[solve["layer"]].dense().double()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
        assert (solve["weights"] is None) == (weight == 1.0)


def _first_asks(editor, monkeypatch, spread: str) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Spy: per layer solved, (layer, its keys [u, d0], what it is asked to add [u, d]): the layer's
    share under the sequential spread, the whole missing residual under the joint one."""
    seen = []
    if spread == "sequential":
        real = editor._solve_layer

        def spy(layer, keys, plain_keys, resid, *args):
            seen.append((layer, keys.double().clone(), resid.double().clone()))
            return real(layer, keys, plain_keys, resid, *args)

        monkeypatch.setattr(editor, "_solve_layer", spy)
    else:
        real = editor._joint_share

        def spy(layer, ahead, current, missing, *args):
            seen.append((layer, current.keys[layer].double().clone(), missing.double().clone()))
            return real(layer, ahead, current, missing, *args)

        monkeypatch.setattr(editor, "_joint_share", spy)
    return seen


@pytest.mark.parametrize("spread", ["sequential", "joint"])
def test_a_heavier_rewrite_is_written_further(llama, tokenizer, tmp_path, monkeypatch, spread):
    """The same state and the same z values, the re-writes at weight 1 and at 8: of what each
    re-written column asks of the first edited layer, the share that layer writes rises (under the
    joint spread too, whose solve plans the whole block)."""
    model, layout = llama
    written = {}
    for weight in (1.0, 8.0):
        editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, rehearse=1, rehearse_cap=4, rewrite_weight=weight,
                         chat=False, spread=spread, **WEAK)
        editor.edit([DARRIEUX, TOWER])  # no re-writes yet: the same first batch both times
        seen = _first_asks(editor, monkeypatch, spread)
        editor.edit([SEINE])
        layer, keys, asked = seen[0]  # the first edited layer: its keys and what it is asked do not depend on the weight
        got = keys @ editor.batches[-1].deltas[layer].dense().double().T  # [u, d] what W_out now adds at each column
        written[weight] = ((got * asked).sum(1) / (asked * asked).sum(1)).tolist()  # the share of each column's ask written
        assert len(written[weight]) == 1 + len(editor.batches[-1].rehearsed) > 1
    for plain, heavier in zip(written[1.0][1:], written[8.0][1:]):  # the re-writes, after the batch's own column
        assert heavier > plain, written


@pytest.mark.parametrize(("fields", "message"), [
    ({"rewrite_weight": 0.0, "rehearse": 1}, "rewrite_weight must be a finite number > 0"),
    ({"rewrite_weight": float("nan"), "rehearse": 1}, "rewrite_weight must be a finite number > 0"),
    ({"rewrite_weight": 3.0}, "rehearse is 0"),
])
def test_bad_weights_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        EditConfig(**fields)


def test_rewrite_weight_from_the_command_line(tiny_model_folder, tmp_path):
    import json

    from typer.testing import CliRunner

    from alphaedit.cli import app
    from alphaedit.cli.common import _method_label
    from test_methods import assert_edit_refuses, assert_eval_refuses, tiny_edit_command

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    assert_edit_refuses(common, env, tmp_path, ((["--rewrite-weight", "3"], "rehearsal is off: give --rehearse N too"),
                                                (["--rehearse", "1", "--rewrite-weight", "0"], "must be a finite number > 0")))
    assert_eval_refuses(tiny_model_folder, env, tmp_path, ["--rewrite-weight", "3"], "rehearsal is off")
    state = tmp_path / "state"
    done = CliRunner().invoke(app, [*common, "--state", str(state), "--rehearse", "1", "--rewrite-weight", "3", "--json"], env=env)
    assert done.exit_code == 0, done.output
    assert json.loads((state / "header.json").read_text())["config"]["rewrite_weight"] == 3.0
    # continuing it with another weight is refused: the state's edits were solved with its own
    again = CliRunner().invoke(app, [*common, "--state", str(state), "--rewrite-weight", "2", "--allow-repeat"], env=env)
    assert again.exit_code == 2 and "--rewrite-weight 3" in again.output, again.output
    assert _method_label(EditConfig(method="alphaedit", rehearse=1, rewrite_weight=3)) == "alphaedit, rehearsal every 1, re-writes weighed 3"

