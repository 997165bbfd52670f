"""Re-reading the earlier batches' keys (`EditConfig.earlier_reread`): C_p rebuilt from every
applied request's keys as the edited model reads them, at the configured points, in an edit and
in the replay of its journal alike, and after a revert."""

from __future__ import annotations

import copy

import pytest
import torch

from alphaedit.editor import Editor
from alphaedit.keys import compute_keys
from alphaedit.stats import StatsCache
from test_editor import REQUESTS, _editor, _weights
from test_methods import assert_edit_refuses, assert_eval_refuses, assert_recorded_and_kept, tiny_edit_command

pytestmark = pytest.mark.usefixtures("single_thread")


def _keys_now(editor: Editor, requests) -> dict[int, torch.Tensor]:
    """Σ kkᵀ per layer over `requests`, their keys read on the editor's model as it is (the reference)."""
    keys = compute_keys(editor.model, editor.layout, editor.tokenizer, requests, editor.context_templates(), editor.config.layers).keys
    return {l: k.T @ k for l, k in keys.items()}


def test_c_p_is_read_again_on_the_edited_model_at_every_nth_batch(llama, tokenizer, tmp_path):
    model, layout = llama
    # a small α, so that the updates are large enough to move the upper layer's keys measurably
    plain = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, l2_alpha=1e-3)
    reread = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, l2_alpha=1e-3, earlier_reread=2)
    for editor in (plain, reread):
        editor.edit(REQUESTS[:2])
    # after one batch (not a re-read point) both hold the batch's keys as written, which are the
    # keys of the model now
    for layer in reread.config.layers:
        torch.testing.assert_close(reread.preserved[layer], plain.preserved[layer], rtol=0, atol=0)
    for editor in (plain, reread):
        editor.edit(REQUESTS[2:])
    now = _keys_now(reread, REQUESTS)
    for layer in reread.config.layers:
        torch.testing.assert_close(reread.preserved[layer], now[layer], rtol=1e-4, atol=1e-6)
    first, upper = reread.config.layers
    # nothing below the first edited layer changes, so its keys never move; the upper layer's do,
    # and without re-reading C_p still holds the first batch's keys as they were before the second
    torch.testing.assert_close(plain.preserved[first], reread.preserved[first], rtol=1e-4, atol=1e-6)
    stale = float((plain.preserved[upper] - now[upper]).norm())
    assert stale > 100 * float((reread.preserved[upper] - now[upper]).norm()) and stale > 1e-6, stale


def test_a_replayed_journal_reads_c_p_again_where_the_edit_did_and_continues_alike(llama, tokenizer, tmp_path):
    model, layout = llama
    straight = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, l2_alpha=1e-3, earlier_reread=1)
    straight.edit(REQUESTS, batch_size=1)

    first = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, l2_alpha=1e-3, earlier_reread=1)
    first.edit(REQUESTS[:2], batch_size=1)
    first.save_state(tmp_path / "state")
    resumed = Editor.load_state(tmp_path / "state", copy.deepcopy(model), tokenizer, cache=StatsCache(tmp_path / "home"), show_progress=False)
    assert resumed.config.earlier_reread == 1
    for layer in first.config.layers:
        torch.testing.assert_close(resumed.preserved[layer], first.preserved[layer], rtol=1e-5, atol=1e-6)
    resumed.edit(REQUESTS[2:], batch_size=1)
    for layer, weight in _weights(straight).items():
        torch.testing.assert_close(_weights(resumed)[layer], weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(resumed.preserved[layer], straight.preserved[layer], rtol=1e-5, atol=1e-5)


def test_a_revert_reads_c_p_again_without_the_reverted_batch(llama, tokenizer, tmp_path):
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, l2_alpha=1e-3, earlier_reread=1)
    editor.edit(REQUESTS[:3], batch_size=1)
    editor.revert(editor.history[1].index)
    now = _keys_now(editor, [REQUESTS[0], REQUESTS[2]])
    for layer in editor.config.layers:
        torch.testing.assert_close(editor.preserved[layer], now[layer], rtol=1e-4, atol=1e-5)


def test_earlier_reread_from_the_command_line(tiny_model_folder, tmp_path):
    from alphaedit.cli.common import _method_label
    from alphaedit.config import EditConfig

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    assert_edit_refuses(common, env, tmp_path, ((["--earlier-reread", "-1"], "--earlier-reread -1: give a number of batches"),
                                                (["--earlier-reread", "2", "--method", "memit"], "memit does not read them here")))
    assert_recorded_and_kept(common, env, tmp_path / "state", "--earlier-reread", "1", "3", "earlier_reread", 1)
    assert_eval_refuses(tiny_model_folder, env, tmp_path, ["--method", "memit", "--earlier-reread", "2"], "memit does not read them here")
    assert _method_label(EditConfig(method="alphaedit", earlier_reread=10)) == "alphaedit, C_p re-read every 10"
    with pytest.raises(ValueError, match="memit does not read them"):
        EditConfig(method="memit", earlier_reread=1)
