"""Editing methods as plug-ins: each against a float64 reference of its formula, the projection
switch on and off, the journal for masked and restrained updates, and a method added through the
registry alone."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alphaedit.config import EditConfig
from alphaedit.editor import Editor
from alphaedit.keys import compute_keys
from alphaedit.layouts import mlp_out_weight
from alphaedit.methods import METHODS, Method, get_method, register
from alphaedit.methods.emmet import EmmetOptions, equality_constrained_solve
from alphaedit.methods.encore import EncoreOptions
from alphaedit.methods.projection import projected_solve
from alphaedit.methods.prune import PruneOptions, restrain_spectrum
from alphaedit.methods.rect import RectOptions, keep_largest_relative_change
from alphaedit.updates import LayerStatistics, LowRankDelta, MaskedDelta, update_from_tensors
from test_editor import REQUESTS, _editor, _weights

pytestmark = pytest.mark.usefixtures("single_thread")

D0, D, U = 12, 5, 3


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    K = torch.randn(D0, U, dtype=torch.float64, generator=g)
    R = torch.randn(D, U, dtype=torch.float64, generator=g)
    A = torch.randn(D0, 40, dtype=torch.float64, generator=g)
    W = torch.randn(D, D0, dtype=torch.float64, generator=g)
    return K, R, A @ A.T / 40, W


def test_emmet_equals_its_closed_form_and_meets_the_constraints(problem):
    K, R, C0, _ = problem
    for lam, mu, lam_e in ((7.0, 0.0, 0.1), (3.0, 0.5, 0.0)):
        config = EditConfig(method="emmet", mom2_update_weight=lam)
        delta = equality_constrained_solve(K.float(), R.float(), LayerStatistics(C0.float(), None, torch.zeros(D0, D0)), config,
                                           EmmetOptions(emmet_lambda=lam_e, update_norm_lambda=mu)).dense().double()
        C = lam * C0 + mu * torch.eye(D0, dtype=torch.float64)
        Dm = K.T @ torch.linalg.inv(C) @ K + lam_e * torch.eye(U, dtype=torch.float64)
        expected = R @ torch.linalg.inv(Dm) @ K.T @ torch.linalg.inv(C)
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
        if lam_e == 0.0:  # equality constraints: every key maps exactly onto its residual
            torch.testing.assert_close(delta @ K, R, rtol=1e-4, atol=1e-4)


def test_encore_equals_its_closed_form_and_its_norm_penalty_shrinks_the_update(problem):
    K, R, C0, _ = problem
    g = torch.Generator().manual_seed(1)
    Kp = torch.randn(D0, 4, dtype=torch.float64, generator=g)
    stats = LayerStatistics(C0.float(), None, (Kp @ Kp.T).float())
    config = EditConfig(method="encore", mom2_update_weight=3.0)
    norms = []
    for lam_n in (0.0, 20.0, 200.0):
        delta = get_method("encore").solve(K.float(), R.float(), stats, config, EncoreOptions(norm_lambda=lam_n)).dense().double()
        A = 3.0 * C0 + lam_n * torch.eye(D0, dtype=torch.float64) + Kp @ Kp.T + K @ K.T
        torch.testing.assert_close(delta, R @ K.T @ torch.linalg.inv(A), rtol=1e-5, atol=1e-6)
        norms.append(float(delta.norm()))
    assert norms[0] > norms[1] > norms[2]
    assert get_method("encore").keeps_preserved(config)  # C_p accumulates without the projection


def test_the_projected_solve_equals_its_closed_form_and_alpha_shrinks_the_update(problem):
    K, R, C0, _ = problem
    g = torch.Generator().manual_seed(2)
    Kp = torch.randn(D0, 4, dtype=torch.float64, generator=g)
    evals, evecs = torch.linalg.eigh(C0)
    P = evecs[:, evals < evals.median()] @ evecs[:, evals < evals.median()].T  # half of C0's directions
    stats = LayerStatistics(C0.float(), P.float(), (Kp @ Kp.T).float())
    norms = []
    for alpha in (1.0, 10.0, 100.0):
        config = EditConfig(method="alphaedit", l2_alpha=alpha, solve_dtype="float64")
        delta = projected_solve(K.float(), R.float(), stats, config).dense().double()
        expected = R @ K.T @ P @ torch.linalg.inv(Kp @ Kp.T @ P + K @ K.T @ P + alpha * torch.eye(D0, dtype=torch.float64))  # Eq. 14
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(delta @ P, delta, rtol=1e-5, atol=1e-6)  # the update lives in the null space
        norms.append(float(delta.norm()))
    assert norms[0] > norms[1] > norms[2]


def test_rect_keeps_the_largest_relative_changes(problem):
    K, R, _, W = problem
    low_rank = LowRankDelta(R.float(), K.float())
    for percent in (40.0, 20.0, 100.0):
        masked = keep_largest_relative_change(low_rank, W.float(), RectOptions(keep_percent=percent))
        dense = low_rank.dense().double()
        relative = (dense / (W + 1e-8)).abs().flatten()
        dropped = int(relative.numel() * (100 - percent) / 100)
        # by hand: all but the `dropped - 1` smallest, as their threshold is the dropped-th smallest value and is kept
        kept = relative.argsort(descending=True)[: relative.numel() - max(0, dropped - 1)]
        expected = torch.zeros(relative.numel(), dtype=torch.bool)
        expected[kept] = True
        assert torch.equal(masked.mask.flatten(), expected), percent
        torch.testing.assert_close(masked.dense().double(), dense * expected.reshape(dense.shape))


def test_prune_bounds_only_the_singular_values_above_the_weights_own(problem):
    _, _, _, W = problem
    g = torch.Generator().manual_seed(5)
    total = 4 * torch.randn(D, D0, dtype=torch.float64, generator=g)
    sigma_max = torch.linalg.svdvals(W)[0]
    before = torch.linalg.svdvals(total)
    assert (before > sigma_max).any() and (before < sigma_max).any()  # both cases occur
    for base in (math.e, 2.0):
        after = torch.linalg.svdvals(restrain_spectrum(total, W, PruneOptions(log_base=base)))
        expected = torch.where(before > sigma_max, torch.log(before / sigma_max) / math.log(base) + sigma_max, before)
        torch.testing.assert_close(after.sort(descending=True).values, expected.sort(descending=True).values)
    # the singular vectors stay: what lies in a subspace stays in it (AlphaEdit's null space under --project)
    U_, s, Vh = torch.linalg.svd(total, full_matrices=False)
    restrained = restrain_spectrum(total, W, PruneOptions())
    torch.testing.assert_close(restrained @ Vh.T @ Vh, restrained)


def test_masked_update_round_trips_through_its_tensors(problem):
    K, R, _, W = problem
    masked = keep_largest_relative_change(LowRankDelta(R.float(), K.float()), W.float(), RectOptions())
    back = update_from_tensors(masked.tensors("layer.3"), "layer.3")
    assert isinstance(back, MaskedDelta) and torch.equal(back.dense(), masked.dense())
    assert masked.tensors("x")["x.mask"].numel() == math.ceil(D * D0 / 8)  # eight entries a byte


def test_memit_with_the_projection_is_alphaedit(llama, tokenizer, tmp_path):
    """The switch reproduces today's AlphaEdit exactly, batch after batch (C_p included)."""
    runs = {}
    for name, overrides in (("alphaedit", {}), ("memit", {"project": True}), ("memit-seq", {"project": True})):
        editor = _editor((copy.deepcopy(llama[0]), llama[1]), tokenizer, tmp_path, method=name, **overrides)
        editor.edit(REQUESTS, batch_size=2)
        runs[name] = _weights(editor)
    for name in ("memit", "memit-seq"):
        for layer, weight in runs[name].items():
            assert torch.equal(weight, runs["alphaedit"][layer]), (name, layer)
    plain = _editor((copy.deepcopy(llama[0]), llama[1]), tokenizer, tmp_path, method="alphaedit", project=False)
    plain.edit(REQUESTS, batch_size=2)
    assert any(not torch.equal(w, runs["alphaedit"][l]) for l, w in _weights(plain).items())


@pytest.mark.parametrize("method, overrides", [("rect", {}), ("prune", {}), ("rect", {"project": True}), ("prune", {"project": True}), ("emmet", {})])
def test_masked_and_restrained_updates_replay_revert_and_export(method, overrides, llama, tokenizer, tmp_path):
    model, layout = llama
    base = {l: mlp_out_weight(model, layout, l).detach().clone() for l in (1, 2)}
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, method=method, mom2_update_weight=1e-2, **overrides)
    after_first = None
    for start in (0, 2):
        editor.edit(REQUESTS[start : start + 2])
        editor.save_state(tmp_path / "state")
        after_first = after_first or _weights(editor)
    edited = _weights(editor)
    assert any(not torch.equal(edited[l], base[l]) for l in base)
    if method == "rect":
        share = [d.mask.float().mean().item() for b in editor.batches for d in b.deltas.values()]
        assert all(0.39 <= s <= 0.45 for s in share), share
    if method == "prune":  # the model carries W0 + restrain(Σ Δ)
        for layer in base:
            total = sum(b.deltas[layer].dense() for b in editor.batches)
            torch.testing.assert_close(edited[layer], base[layer] + restrain_spectrum(total, base[layer], PruneOptions()), rtol=0, atol=1e-5)

    replayed = Editor.load_state(tmp_path / "state", copy.deepcopy(model), tokenizer, show_progress=False)
    for layer, weight in _weights(replayed).items():
        torch.testing.assert_close(weight, edited[layer], rtol=0, atol=1e-6)

    path = editor.export_deltas(tmp_path / "deltas.safetensors")
    tensors = load_file(str(path))
    for layer in base:
        dense = tensors[f"layer.{layer}.delta"] if f"layer.{layer}.delta" in tensors else tensors[f"layer.{layer}.left"] @ tensors[f"layer.{layer}.right"].T
        torch.testing.assert_close(base[layer] + dense, edited[layer], rtol=0, atol=1e-5)

    editor.revert(editor.batches[-1].report.index)  # the latest batch: back to the weights after the first
    for layer, weight in _weights(editor).items():
        torch.testing.assert_close(weight, after_first[layer], rtol=0, atol=1e-5)


def test_a_method_added_through_the_registry_alone_is_usable_everywhere(llama, tokenizer, tmp_path, tiny_model_folder):
    from typer.testing import CliRunner

    from alphaedit.cli import app
    from alphaedit.methods.memit import ridge_solve

    def halved(keys, resid, stats, config, options):
        delta = ridge_solve(keys, resid, stats, config, options)
        return LowRankDelta(delta.left * options.scale, delta.right)

    from dataclasses import dataclass

    @dataclass(frozen=True)
    class HalfOptions:
        scale: float = 0.5

    register(Method("half-memit", "MEMIT's update, scaled", "this test", halved, options=HalfOptions))
    try:
        listed = CliRunner().invoke(app, ["methods", "--json"])
        assert listed.exit_code == 0 and {"name": "half-memit", "options": {"scale": 0.5}}.items() <= next(
            m for m in json.loads(listed.stdout) if m["name"] == "half-memit").items()
        editor = _editor((copy.deepcopy(llama[0]), llama[1]), tokenizer, tmp_path, method="half-memit", method_options={"scale": "0.25"})
        assert editor.config.method_options == {"scale": 0.25}  # typed by the method's options
        editor.edit(REQUESTS[:2])
        with pytest.raises(ValueError, match="method half-memit has no option 'size' \\(its options: scale\\)"):
            EditConfig(method="half-memit", method_options={"size": 1})
    finally:
        METHODS.pop("half-memit")
    assert get_method("memit").option_defaults() == {}


def test_the_earlier_weight_scales_c_p_in_every_solve_that_reads_it(problem):
    """β weighs the earlier batches' keys: each solve equals its formula with β C_p (β = 1 the
    authors'), a larger β moves the earlier keys' outputs less and fits the batch less, β = 0
    forgets them; a method that never reads C_p refuses a β."""
    from alphaedit.methods.projection import joint_projected_solve

    K, R, C0, _ = problem
    g = torch.Generator().manual_seed(3)
    Kp = torch.randn(D0, 4, dtype=torch.float64, generator=g)
    evals, evecs = torch.linalg.eigh(C0)
    P = evecs[:, evals < evals.median()] @ evecs[:, evals < evals.median()].T
    stats = LayerStatistics(C0.float(), P.float(), (Kp @ Kp.T).float())
    eye = torch.eye(D0, dtype=torch.float64)
    formulas = {  # Δ as a function of β, in float64
        "alphaedit": lambda b: R @ K.T @ P @ torch.linalg.inv(b * Kp @ Kp.T @ P + K @ K.T @ P + 10.0 * eye),
        "memit-seq": lambda b: R @ K.T @ torch.linalg.inv(5.0 * C0 + b * Kp @ Kp.T + K @ K.T),
        "encore": lambda b: R @ K.T @ torch.linalg.inv(5.0 * C0 + 20.0 * eye + b * Kp @ Kp.T + K @ K.T),
    }
    for method, formula in formulas.items():
        moved, missed = [], []
        for beta in (0.0, 1.0, 30.0):
            config = EditConfig(method=method, mom2_update_weight=5.0, solve_dtype="float64", earlier_weight=beta)
            delta = get_method(method).layer_update(K.float(), R.float(), stats, config).dense().double()
            torch.testing.assert_close(delta, formula(beta), rtol=1e-4, atol=1e-5)
            if method == "alphaedit":  # the joint solve over one layer is the same solve
                joint = joint_projected_solve({0: K.float()}, R.float(), {0: stats}, config)[0].dense().double()
                torch.testing.assert_close(joint, delta, rtol=1e-4, atol=1e-5)
            moved.append(float((delta @ Kp).norm()))
            missed.append(float((delta @ K - R).norm()))
        assert moved[0] > moved[1] > moved[2], (method, moved)  # earlier keys held more firmly as β grows
        assert missed[0] < missed[1] < missed[2], (method, missed)  # at the cost of the batch's own fit
    with pytest.raises(ValueError, match="memit does not read them"):
        EditConfig(method="memit", earlier_weight=2.0)
    with pytest.raises(ValueError, match="finite number"):
        EditConfig(method="alphaedit", earlier_weight=-1.0)
    EditConfig(method="rect", project=True, earlier_weight=2.0)  # any method under the projection reads C_p


def tiny_edit_command(tiny_model_folder, tmp_path) -> tuple[list[str], dict[str, str]]:
    """`alphaedit edit` of the first two requests on the tiny model, to which a test adds --state and
    its options, and the environment to run it in (a home of its own)."""
    from conftest import WIKITEXT

    requests = tmp_path / "edits.jsonl"
    requests.write_text("\n".join(json.dumps(r.to_dict()) for r in REQUESTS[:2]))
    command = ["edit", "--model", str(tiny_model_folder), "--requests", str(requests), "--layers", "1-2", "--steps", "2",
               "--corpus", str(WIKITEXT), "--tokens", "2000"]
    return command, {"ALPHAEDIT_HOME": str(tmp_path / "home")}


def assert_edit_refuses(common: list[str], env: dict[str, str], tmp_path, cases) -> None:
    """Each (extra arguments, message) of `cases` makes `alphaedit edit` exit with status 2, saying the
    message, and leave no state behind."""
    from typer.testing import CliRunner

    from alphaedit.cli import app

    for refused, says in cases:
        result = CliRunner().invoke(app, [*common, "--state", str(tmp_path / "refused"), *refused], env=env)
        assert result.exit_code == 2 and says in result.output, result.output
        assert not (tmp_path / "refused").exists()


def assert_recorded_and_kept(common: list[str], env: dict[str, str], state, option: str, value: str, other: str, field: str, recorded) -> None:
    """`alphaedit edit OPTION VALUE` writes a state whose journal records `field` as `recorded`, and
    continuing that state with OPTION OTHER is refused, naming the recorded setting."""
    from typer.testing import CliRunner

    from alphaedit.cli import app

    done = CliRunner().invoke(app, [*common, "--state", str(state), option, value], env=env)
    assert done.exit_code == 0, done.output
    assert json.loads((state / "header.json").read_text())["config"][field] == recorded
    again = CliRunner().invoke(app, [*common, "--state", str(state), option, other], env=env)
    assert again.exit_code == 2 and f"{option} {recorded}" in again.output, again.output


def assert_a_larger_weight_shrinks_every_update(common: list[str], env: dict[str, str], tmp_path, option: str, field: str,
                                               small: str, large: str) -> None:
    """`alphaedit edit OPTION SMALL` and `OPTION LARGE` record the value as the config's `field`; the
    larger weight gives a smaller first-batch update of every edited W_out; continuing the first
    state with another value is refused, naming the recorded one."""
    from typer.testing import CliRunner

    from alphaedit.cli import app

    norms = {}
    for value in (small, large):
        state = tmp_path / f"{field}-{value}"
        done = CliRunner().invoke(app, [*common, "--state", str(state), option, value], env=env)
        assert done.exit_code == 0, done.output
        assert json.loads((state / "header.json").read_text())["config"][field] == float(value)
        norms[value] = json.loads(done.stdout)["batches"][0]["delta_norms"]
    assert set(norms[small]) == {"1", "2"}  # the tiny command's layers
    for layer in norms[small]:
        assert norms[large][layer] < norms[small][layer]
    again = CliRunner().invoke(app, [*common, "--state", str(tmp_path / f"{field}-{small}"), option, "20"], env=env)
    assert again.exit_code == 2 and f"{option} {float(small)}" in again.output, again.output


def assert_eval_refuses(tiny_model_folder, env: dict[str, str], tmp_path, arguments: list[str], says: str) -> None:
    """`alphaedit eval` with these arguments exits with status 2, saying `says`, before it loads a
    model or records the run (a run.json would make the folder a run)."""
    from typer.testing import CliRunner

    from alphaedit.cli import app

    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_folder), "--dataset", "counterfact:cf.json", "--out", str(run),
                                      *arguments], env=env)
    assert result.exit_code == 2 and says in result.output, result.output
    assert not run.exists()


def test_cli_method_options_and_projection_are_checked_and_recorded(tiny_model_folder, tmp_path):
    from typer.testing import CliRunner

    from alphaedit.cli import app

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    bad = CliRunner().invoke(app, [*common, "--state", str(tmp_path / "bad"), "--method", "rect", "--method-option", "keep=3"], env=env)
    assert bad.exit_code == 2 and "method rect has no option 'keep' (its options: keep_percent)" in bad.output
    state = tmp_path / "state"
    done = CliRunner().invoke(app, [*common, "--state", str(state), "--method", "rect", "--project", "--method-option", "keep_percent=20"], env=env)
    assert done.exit_code == 0, done.output
    config = json.loads((state / "header.json").read_text())["config"]
    assert config["method"] == "rect" and config["project"] is True and config["method_options"] == {"keep_percent": 20.0}
    again = CliRunner().invoke(app, [*common[:3], "--requests", str(tmp_path / "edits.jsonl"), "--state", str(state), "--no-project"], env=env)
    assert again.exit_code == 2 and "--project/--no-project True" in again.output


def test_l2_from_the_command_line_is_the_projected_solves_alpha(tiny_model_folder, tmp_path):
    from typer.testing import CliRunner

    from alphaedit.cli import app

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    common = [*common, "--json"]
    assert_edit_refuses(common, env, tmp_path, ((["--l2", "0"], "--l2 0.0: α must be positive"),
                                                (["--l2", "100", "--method", "memit"], "memit runs without the projection here: add --project")))
    assert_a_larger_weight_shrinks_every_update(common, env, tmp_path, "--l2", "l2_alpha", "10", "1000")  # a hundred times the penalty
    # eval refuses them before it loads a model or records the run (a run.json would make the folder a run)
    for refused, says in ((["--l2", "-1"], "α must be positive"), (["--method", "rect", "--no-project", "--l2", "5"], "add --project"),
                          (["--method", "rect", "--method-option", "keep=3"], "method rect has no option 'keep'")):
        run = tmp_path / "run"
        result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_folder), "--dataset", "counterfact:cf.json", "--out", str(run), *refused],
                                    env=env)
        assert result.exit_code == 2 and says in result.output, result.output
        assert not run.exists()


def test_mom2_weight_from_the_command_line_is_the_unprojected_solves_lambda(tiny_model_folder, tmp_path):
    from typer.testing import CliRunner

    from alphaedit.cli import app
    from alphaedit.cli.common import _method_label
    from alphaedit.config import EditConfig

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    common = [*common, "--json", "--method", "memit-seq"]
    assert_edit_refuses(common, env, tmp_path, ((["--mom2-weight", "0"], "--mom2-weight 0.0: λ must be positive"),
                                                (["--mom2-weight", "100", "--project"], "memit-seq runs with the projection here: add --no-project")))
    assert_a_larger_weight_shrinks_every_update(common, env, tmp_path, "--mom2-weight", "mom2_update_weight", "10", "100000")  # C0 weighed ×10⁴
    assert _method_label(EditConfig(method="memit-seq", mom2_update_weight=1000.0)) == "memit-seq, λ 1000"
    assert _method_label(EditConfig(method="memit-seq")) == "memit-seq"
    # eval refuses them before it loads a model or records the run
    for refused, says in ((["--mom2-weight", "-5"], "λ must be positive"), (["--mom2-weight", "5"], "alphaedit runs with the projection here")):
        run = tmp_path / "run"
        result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_folder), "--dataset", "counterfact:cf.json", "--out", str(run), *refused],
                                    env=env)
        assert result.exit_code == 2 and says in result.output, result.output
        assert not run.exists()


def test_earlier_weight_from_the_command_line_is_recorded_checked_and_continued(tiny_model_folder, tmp_path):
    from alphaedit.cli.common import _method_label

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    common = [*common, "--json"]
    assert_edit_refuses(common, env, tmp_path, ((["--earlier-weight", "-1"], "--earlier-weight -1.0: β must be a finite number ≥ 0"),
                                                (["--earlier-weight", "2", "--method", "memit"], "memit does not read them here")))
    assert_recorded_and_kept(common, env, tmp_path / "beta", "--earlier-weight", "4", "1", "earlier_weight", 4.0)
    assert _method_label(EditConfig(method="alphaedit", l2_alpha=40.0, earlier_weight=4.0)) == "alphaedit, α 40, β 4"
    assert _method_label(EditConfig(method="alphaedit")) == "alphaedit"
    assert_eval_refuses(tiny_model_folder, env, tmp_path, ["--method", "memit", "--earlier-weight", "3"], "memit does not read them here")


def test_encore_with_most_probable_stopping_from_the_command_line(tiny_model_folder, tmp_path):
    from typer.testing import CliRunner

    from alphaedit.cli import app

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    state = tmp_path / "state"
    done = CliRunner().invoke(app, [*common, "--state", str(state), "--method", "encore",
                                    "--method-option", "norm_lambda=50", "--stop-most-probable"], env=env)
    assert done.exit_code == 0, done.output
    config = json.loads((state / "header.json").read_text())["config"]
    assert config["method"] == "encore" and config["method_options"] == {"norm_lambda": 50.0} and config["stop_when_most_probable"] is True


def test_anchored_values_from_the_command_line(tiny_model_folder, tmp_path):
    from typer.testing import CliRunner

    from alphaedit.cli import app

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    state = tmp_path / "state"
    done = CliRunner().invoke(app, [*common, "--state", str(state), "--anchor-values", "--json"], env=env)
    assert done.exit_code == 0, done.output
    assert json.loads((state / "header.json").read_text())["config"]["value_anchor"] is True
    assert json.loads(done.stdout)["batches"][0]["value_reference"] > 0


@pytest.mark.parametrize("method", ["rect", "prune"])
def test_a_finished_or_restrained_batch_is_reported_and_preserved_as_the_model_carries_it(method, llama, tokenizer, tmp_path):
    """RECT's mask and PRUNE's restraint change the lower layers after the upper layers' keys were
    read: the batch report (weight growth, efficacy) and C_p describe the weights after them."""
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, method=method, project=True, l2_alpha=1e-4)
    for start in (0, 2):
        report = editor.edit(REQUESTS[start : start + 2])[-1]
        assert report.weight_growth == editor.weight_growth()  # measured on the carried weights
    if method == "prune":  # the restraint binds here, so the raw sum is not what the model carries
        total = sum(b.deltas[2].dense() for b in editor.batches)
        base = mlp_out_weight(model, layout, 2).detach()
        assert not torch.allclose(restrain_spectrum(total, base, PruneOptions()), total, atol=1e-3)
    # C_p is Σ K Kᵀ of each batch's keys on the model as it was after that batch
    replay = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, method=method, project=True, l2_alpha=1e-4)
    for start in (0, 2):
        replay.edit(REQUESTS[start : start + 2])
        keys = compute_keys(replay.model, layout, tokenizer, REQUESTS[start : start + 2], replay.context_templates(), [1, 2]).keys
        for layer in (1, 2):
            torch.testing.assert_close(replay.batches[-1].keys[layer], keys[layer], rtol=0, atol=1e-5)
    for layer in (1, 2):
        expected = sum(b.keys[layer].T @ b.keys[layer] for b in replay.batches)
        torch.testing.assert_close(replay.preserved[layer].cpu(), expected, rtol=1e-5, atol=1e-5)


def test_a_bool_option_given_as_text_is_parsed_not_truthy():
    from dataclasses import dataclass, fields

    from alphaedit.methods.base import _typed

    @dataclass
    class Options:
        flag: bool = False

    (field,) = fields(Options)
    assert _typed(field, "false") is False and _typed(field, "True") is True and _typed(field, "0") is False
    with pytest.raises(ValueError, match="flag: 'maybe' is not a bool"):
        _typed(field, "maybe")


def test_a_report_row_names_the_method_its_projection_and_its_stabilisers():
    from alphaedit.cli.common import _method_label

    assert _method_label(EditConfig(method="alphaedit")) == "alphaedit"
    assert _method_label(EditConfig(method="alphaedit", project=False)) == "alphaedit without projection"
    assert _method_label(EditConfig(method="rect", project=True)) == "rect + projection"
    assert _method_label(EditConfig(method="alphaedit", value_anchor=True)) == "alphaedit, NAS value anchoring"
    assert (_method_label(EditConfig(method="encore", project=True, stop_when_most_probable=True))
            == "encore + projection, most-probable stop")
    assert _method_label(EditConfig(method="alphaedit", l2_alpha=100.0)) == "alphaedit, α 100"
    assert _method_label(EditConfig(method="memit", l2_alpha=100.0)) == "memit"  # α weighs only the projected solve


def test_the_leak_weight_adds_c0_inside_the_projected_solve(problem):
    """λ₁ (BetaEdit's leak penalty): the solve equals its formula with λ₁ C0 beside C_p, in float64;
    λ₁ = 0 is the authors' solve; a larger λ₁ moves the MLP output at preserved keys less (tr ΔC0Δᵀ)
    at the cost of the batch's own fit, and the update stays in the null space; the joint solve over
    one layer is the same solve; a method without the projection refuses it."""
    from alphaedit.cli.common import _method_label
    from alphaedit.methods.projection import joint_projected_solve

    K, R, C0, _ = problem
    g = torch.Generator().manual_seed(4)
    Kp = torch.randn(D0, 4, dtype=torch.float64, generator=g)
    evals, evecs = torch.linalg.eigh(C0)
    P = evecs[:, evals < evals.median()] @ evecs[:, evals < evals.median()].T  # an approximate null space: C0 is not 0 on it
    stats = LayerStatistics(C0.float(), P.float(), (Kp @ Kp.T).float())
    eye = torch.eye(D0, dtype=torch.float64)
    leaked, missed = [], []
    for lam in (0.0, 30.0, 3000.0):
        config = EditConfig(method="alphaedit", l2_alpha=10.0, solve_dtype="float64", leak_weight=lam)
        delta = projected_solve(K.float(), R.float(), stats, config).dense().double()
        expected = R @ K.T @ P @ torch.linalg.inv((K @ K.T + Kp @ Kp.T + lam * C0) @ P + 10.0 * eye)
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(delta @ P, delta, rtol=1e-5, atol=1e-6)
        joint = joint_projected_solve({0: K.float()}, R.float(), {0: stats}, config)[0].dense().double()
        torch.testing.assert_close(joint, delta, rtol=1e-4, atol=1e-5)
        leaked.append(float(torch.trace(delta @ C0 @ delta.T)))
        missed.append(float((delta @ K - R).norm()))
    authors = EditConfig(method="alphaedit", l2_alpha=10.0, solve_dtype="float64")
    torch.testing.assert_close(projected_solve(K.float(), R.float(), stats, authors).dense().double(),
                               R @ K.T @ P @ torch.linalg.inv((K @ K.T + Kp @ Kp.T) @ P + 10.0 * eye), rtol=1e-5, atol=1e-6)
    assert leaked[0] > leaked[1] > leaked[2], leaked  # less of the update reaches the preserved keys
    assert missed[0] < missed[1] < missed[2], missed  # and less of the batch is written
    with pytest.raises(ValueError, match="memit runs without the projection here"):
        EditConfig(method="memit", leak_weight=3000.0)
    with pytest.raises(ValueError, match="finite number ≥ 0"):
        EditConfig(method="alphaedit", leak_weight=-1.0)
    assert EditConfig(method="memit", project=True, leak_weight=3000.0).leak_weight == 3000.0
    with pytest.raises(ValueError, match="needs the second moment C0"):
        projected_solve(K.float(), R.float(), LayerStatistics(None, P.float(), torch.zeros(D0, D0)),
                        EditConfig(method="alphaedit", leak_weight=1.0))
    assert _method_label(EditConfig(method="alphaedit", leak_weight=3000.0)) == "alphaedit, leak λ₁ 3000"


def test_leak_weight_from_the_command_line_is_recorded_and_kept(tiny_model_folder, tmp_path):
    from typer.testing import CliRunner

    from alphaedit.cli import app

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    common = [*common, "--json"]
    assert_edit_refuses(common, env, tmp_path, ((["--leak-weight", "-1"], "λ₁ must be a finite number ≥ 0"),
                                                (["--leak-weight", "3000", "--method", "memit"],
                                                 "memit runs without the projection here (its own λ C0 is --mom2-weight)")))
    assert_a_larger_weight_shrinks_every_update(common, env, tmp_path, "--leak-weight", "leak_weight", "0", "100000")  # C0 inside the solve
    run = tmp_path / "run"  # eval refuses it before it loads a model or records the run
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_folder), "--dataset", "counterfact:cf.json", "--out", str(run),
                                      "--method", "rect", "--no-project", "--leak-weight", "5"], env=env)
    assert result.exit_code == 2 and "add --project" in result.output, result.output
    assert not run.exists()
