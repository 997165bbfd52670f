"""A later write of a fact replaces its earlier hold in C_p (`EditConfig.replace_holds`): a
rehearsal's re-write, or a new edit of the same subject and prompt, is solved without C_p's hold on
its own earlier keys, and afterwards C_p holds each fact once, at the keys of its latest write;
reverts and replays find the same C_p."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from alphaedit.cli import app
from alphaedit.editor import Editor
from alphaedit.requests import EditRequest
from alphaedit.stats import StatsCache
from test_editor import REQUESTS, _editor
from test_methods import assert_edit_refuses, assert_eval_refuses, tiny_edit_command
from test_rehearse import WEAK, _holds

pytestmark = pytest.mark.usefixtures("single_thread")

DARRIEUX, TOWER, RIVER, SEINE = REQUESTS


def _held_by_hand(editor: Editor) -> dict[int, torch.Tensor]:
    """C_p in float64 from the rule itself, one batch and one row at a time: every row of a standing
    batch, or with replace_holds those whose subject and prompt no later standing batch wrote again,
    as its own request or a re-write (chat forms are off here, so row i is the batch's i-th written
    request)."""
    standing = [b for b in editor.batches if not b.reverted]
    held = {l: torch.zeros(editor.layout.key_size, editor.layout.key_size, dtype=torch.float64) for l in editor.config.layers}
    for i, batch in enumerate(standing):
        for row, request in enumerate(batch.written):
            if editor.config.replace_holds and any((r.subject, r.prompt) == (request.subject, request.prompt)
                                                   for later in standing[i + 1 :] for r in later.written):
                continue
            for layer in editor.config.layers:
                k = batch.keys[layer][row].double()
                held[layer] += torch.outer(k, k)
    return held


def _assert_cp(editor: Editor, expected: dict[int, torch.Tensor], layers=None) -> None:
    for layer in layers or editor.config.layers:
        scale = expected[layer].abs().max().item()
        torch.testing.assert_close(editor.preserved[layer].double().cpu(), expected[layer], rtol=0, atol=1e-5 * scale)


def _cp_at_solves(editor: Editor, monkeypatch) -> list[dict[int, torch.Tensor]]:
    """Spy: per batch, C_p as each layer's solve reads it (in float64)."""
    seen: list[dict[int, torch.Tensor]] = []
    real = editor._solve_layer

    def spy(layer, *args, **kwargs):
        if not seen or layer in seen[-1]:
            seen.append({})
        seen[-1][layer] = editor.preserved[layer].double().cpu().clone()
        return real(layer, *args, **kwargs)

    monkeypatch.setattr(editor, "_solve_layer", spy)
    return seen


@pytest.mark.parametrize("replace", [True, False])
def test_a_rewrite_is_solved_without_its_earlier_hold(llama, tokenizer, tmp_path, monkeypatch, replace):
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, rehearse=1, rehearse_cap=4,
                     replace_holds=replace, **WEAK)
    editor.edit([DARRIEUX, TOWER])
    lapsed = [r for r, held in zip([DARRIEUX, TOWER], _holds(editor, [DARRIEUX, TOWER])) if not held]
    assert lapsed, "the weak batch should leave something to rehearse"
    first = editor.batches[0]
    seen = _cp_at_solves(editor, monkeypatch)
    editor.edit([SEINE])
    assert editor.batches[-1].rehearsed == lapsed
    # at the first edited layer nothing below is edited: the re-write's key is its first write's
    # key exactly, so a hold on that key is a hold against the re-write itself
    bottom = editor.config.layers[0]
    for j, request in enumerate(lapsed):
        row = first.written.index(request)
        torch.testing.assert_close(editor.batches[-1].keys[bottom][1 + j], first.keys[bottom][row], rtol=0, atol=1e-5)
    # what the solves read: the first batch's rows, without the rehearsed requests' with replace
    rows = [i for i, r in enumerate(first.written) if not (replace and r in lapsed)]
    for layer in editor.config.layers:
        keys = first.keys[layer][rows].double()
        expected = keys.T @ keys
        torch.testing.assert_close(seen[0][layer], expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max().item()))
    # and after: every row of the new batch, and of the first batch the requests not written again
    # (without replace, all of them: the rehearsed requests held twice)
    _assert_cp(editor, _held_by_hand(editor))


def test_a_request_rehearsed_again_is_held_at_its_latest_write_through_reverts_and_replays(llama, tokenizer, tmp_path):
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, rehearse=1, rehearse_cap=4, replace_holds=True, **WEAK)
    editor.edit([DARRIEUX, TOWER])
    editor.edit([SEINE])
    editor.edit([RIVER])
    twice = [r for r in editor.batches[1].rehearsed if r in editor.batches[2].rehearsed]
    assert twice, "the weak batches should leave an edit lapsed through two rehearsals"
    _assert_cp(editor, _held_by_hand(editor))
    # held once: of the rows written for a request rehearsed twice, only the last batch's counts
    for request in twice:
        assert not any(request in later.rehearsed for later in editor.batches[3:])
    editor.save_state(tmp_path / "state")
    cp_after_three = {l: c.clone() for l, c in editor.preserved.items()}

    # a replay derives the same holds from the journal
    loaded = Editor.load_state(tmp_path / "state", copy.deepcopy(model), tokenizer, cache=StatsCache(tmp_path / "home"), show_progress=False)
    assert loaded.config.replace_holds
    for layer in editor.config.layers:
        torch.testing.assert_close(loaded.preserved[layer], cp_after_three[layer], rtol=1e-5, atol=1e-5)

    # reverting the latest batch gives the holds it replaced back to the batch before
    editor.revert(editor.batches[2].report.index)
    _assert_cp(editor, _held_by_hand(editor))
    # reverting the first batch takes out only the rows of it still held
    editor.revert(editor.batches[0].report.index)
    _assert_cp(editor, _held_by_hand(editor))
    only_second = editor.batches[1]
    for layer in editor.config.layers:  # what is left: the second batch, all of its rows
        keys = only_second.keys[layer].double()
        torch.testing.assert_close(editor.preserved[layer].double().cpu(), keys.T @ keys, rtol=0, atol=1e-5 * (keys.T @ keys).abs().max().item())
    # and the journal's reverts replay to the same C_p
    editor.save_state(tmp_path / "state")
    again = Editor.load_state(tmp_path / "state", copy.deepcopy(model), tokenizer, cache=StatsCache(tmp_path / "home"), show_progress=False)
    for layer in editor.config.layers:
        torch.testing.assert_close(again.preserved[layer], editor.preserved[layer], rtol=1e-5, atol=1e-5)


def test_a_new_edit_of_the_same_fact_is_solved_without_the_old_ones_hold(llama, tokenizer, tmp_path, monkeypatch):
    """No rehearsal: the tower is edited to Rome, then to London. Without replace_holds the second
    solve holds the tower's key where it says Rome; with it, that column is out of C_p. With α small
    beside the keys (the tiny model's keys are short), least squares against the hold writes half
    of the first layer's share at the key, which is the same key there (nothing below is edited)."""
    model, layout = llama
    london = EditRequest(TOWER.prompt, TOWER.subject, "London", "Paris")
    written = {}
    for replace in (False, True):
        editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, replace_holds=replace, l2_alpha=1e-4)
        editor.edit([TOWER, DARRIEUX])
        seen = _cp_at_solves(editor, monkeypatch)
        editor.edit([london])
        first = editor.batches[0]
        rows = [1] if replace else [0, 1]  # the tower was the first batch's row 0
        for layer in editor.config.layers:
            keys = first.keys[layer][rows].double()
            torch.testing.assert_close(seen[0][layer], keys.T @ keys, rtol=0, atol=1e-5 * (keys.T @ keys).abs().max().item())
        _assert_cp(editor, _held_by_hand(editor))
        bottom, new = editor.config.layers[0], editor.batches[-1]
        torch.testing.assert_close(new.keys[bottom][0], first.keys[bottom][0], rtol=0, atol=1e-5)
        written[replace] = (new.deltas[bottom].dense() @ new.keys[bottom][0]).norm().item()
        # reverting the new edit gives the old one its hold back
        editor.revert(editor.batches[-1].report.index)
        keys = {l: first.keys[l].double() for l in editor.config.layers}
        _assert_cp(editor, {l: k.T @ k for l, k in keys.items()})
    assert written[True] / written[False] == pytest.approx(2, rel=0.1)


def test_replace_holds_from_the_command_line(tiny_model_folder, tmp_path):
    from alphaedit.cli.common import _method_label
    from alphaedit.config import EditConfig

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    assert_edit_refuses(common, env, tmp_path, ((["--method", "memit", "--replace-holds"], "replace_holds changes which earlier keys "
                                                                                          "C_p holds, and memit does not read them"),))
    assert_eval_refuses(tiny_model_folder, env, tmp_path, ["--method", "memit", "--replace-holds"], "memit does not read them")
    state = tmp_path / "state"
    done = CliRunner().invoke(app, [*common, "--state", str(state), "--replace-holds", "--json"], env=env)
    assert done.exit_code == 0, done.output
    assert json.loads((state / "header.json").read_text())["config"]["replace_holds"] is True
    # continuing a state made without it may not switch it on
    plain = tmp_path / "plain"
    assert CliRunner().invoke(app, [*common, "--state", str(plain), "--json"], env=env).exit_code == 0
    again = CliRunner().invoke(app, [*common, "--state", str(plain), "--replace-holds", "--allow-repeat"], env=env)
    assert again.exit_code == 2 and "--replace-holds False" in again.output, again.output
    assert _method_label(EditConfig(method="alphaedit", rehearse=1, replace_holds=True)) == \
        "alphaedit, rehearsal every 1, re-writes replace their hold"
    with pytest.raises(ValueError, match="does not read them"):
        EditConfig(method="memit", replace_holds=True)
    with pytest.raises(ValueError, match="use one of them"):  # a re-read C_p holds keys the journal does not keep
        EditConfig(replace_holds=True, earlier_reread=1)
