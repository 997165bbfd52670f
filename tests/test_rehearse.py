"""Rehearsal (`EditConfig.rehearse`): before a batch every earlier edit still standing is checked,
and the lapsed ones are written again with the batch; the journal keeps them, so a replay and a
continued run come out alike."""

from __future__ import annotations

import copy
import json
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from alphaedit import editor as editor_module
from alphaedit import rehearsal as rehearsal_module
from alphaedit.cli import app
from alphaedit.editor import Editor
from alphaedit.journal import Journal
from alphaedit.rehearsal import choose_lapsed, rewrites_holding
from alphaedit.requests import EditRequest
from alphaedit.stats import StatsCache
from alphaedit.teacher_forcing import continuation_accuracy, prefers_new
from test_editor import REQUESTS, _editor, _room_warnings, _weights
from test_eval_resume import _command
from test_faults import _run
from test_methods import assert_edit_refuses, assert_eval_refuses, assert_recorded_and_kept, tiny_edit_command

pytestmark = pytest.mark.usefixtures("single_thread")

# a learning rate so small that one z step leaves the targets where they were: the first batch's
# edits do not take, so there is something to rehearse
WEAK = dict(v_lr=1e-4, v_num_grad_steps=1)


def _holds(editor: Editor, requests: list[EditRequest]) -> list[bool]:
    """The reference check, one request at a time: the new object preferred over the true one, or,
    without a true one, every target token top-1."""
    out = []
    for r in requests:
        if r.target_true:
            out.append(bool(prefers_new(editor.model, editor.tokenizer, [r.text()], [r.target_new], [r.target_true])[0]))
        else:
            out.append(continuation_accuracy(editor.model, editor.tokenizer, [r.text()], [r.target_new])[0] == 1.0)
    return out


def test_the_lapsed_earlier_edits_are_written_again_with_the_next_batch(llama, tokenizer, tmp_path):
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, rehearse=1, **WEAK)
    first = editor.edit(REQUESTS[:2])[0]
    assert first.earlier_held is None and first.rehearsed == 0  # nothing earlier to check
    holds = _holds(editor, REQUESTS[:2])
    assert not all(holds), "the weak first batch should leave something to rehearse"
    lapsed = [r for r, held in zip(REQUESTS[:2], holds) if not held]
    second = editor.edit(REQUESTS[2:])[0]
    assert second.earlier_held == pytest.approx(sum(holds) / 2)
    assert second.rehearsed == len(lapsed) and editor.batches[-1].rehearsed == lapsed
    assert editor.batches[-1].requests == REQUESTS[2:] and second.requests == 2  # the batch's own count stays its own
    # the update was solved for every request it wrote: the rehearsed ones' keys are in C_p twice
    # (once as first written, once now), the batch's own once
    assert editor.batches[-1].written == [*REQUESTS[2:], *lapsed]
    assert all(len(k) == 2 + len(lapsed) for k in editor.batches[-1].keys.values())


def test_standing_requests_only_and_none_that_conflict_with_the_batch(llama, tokenizer, tmp_path):
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, rehearse=1, **WEAK)
    darrieux, tower, river, seine = REQUESTS
    replaced = EditRequest(tower.prompt, tower.subject, "London", "Paris")  # the same subject and prompt, edited again
    editor.edit([darrieux, tower, seine])
    editor.edit([replaced])
    # before the third batch: the tower stands as "London", not as "Rome"; the batch edits the
    # Seine again, under another prompt, so its earlier edit is not written back over the new one;
    # and the river's request (without a true object) is checked by its target tokens
    batch = [EditRequest("{} is a river in", seine.subject, "Spain", "France"), river]
    rehearsal = editor._rehearsal(batch)
    standing = [darrieux, seine, replaced]
    holds = _holds(editor, standing)
    assert rehearsal.held == pytest.approx(sum(holds) / len(holds))
    assert rehearsal.lapsed == [r for r, held in zip(standing, holds) if not held and r is not seine]
    assert tower not in rehearsal.lapsed
    # a reverted batch's requests stand no more
    editor.revert(editor.history[1].index)
    assert replaced not in editor._rehearsal(batch).lapsed
    # at most as many as the batch has, oldest first
    many = editor._rehearsal([river])
    assert len(many.lapsed) <= 1


def test_a_rehearsal_cap_lets_a_batch_write_back_more_lapsed_edits_than_it_has(llama, tokenizer, tmp_path):
    model, layout = llama
    darrieux, tower, river, seine = REQUESTS
    lapsed_each = []
    for cap in (0, 3):
        editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, rehearse=1, rehearse_cap=cap, **WEAK)
        editor.edit([darrieux, tower, river])
        holds = _holds(editor, [darrieux, tower, river])
        assert sum(not h for h in holds) >= 2, "the weak batch should leave at least two edits lapsed"
        report = editor.edit([seine])[0]
        lapsed_each.append([r for r, held in zip([darrieux, tower, river], holds) if not held])
        assert editor.batches[-1].rehearsed == lapsed_each[-1][: cap or 1]  # oldest first, at most the cap
        assert report.rehearsed == len(editor.batches[-1].rehearsed) and report.requests == 1
    assert lapsed_each[0] == lapsed_each[1]  # the same first batch either way: the cap only changes the choice


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@pytest.mark.parametrize("warm", [False, True])
def test_a_warm_rehearsal_writes_a_lapsed_edit_again_with_the_value_it_had(llama, tokenizer, tmp_path, monkeypatch, warm):
    model, layout = llama
    # two iterations: a negligible Adam step from δ = 0, then the last, which never steps. The
    # first batch's edits barely move, so they lapse; a warm start's step is the jump instead,
    # so a rehearsed request is written with its old value exactly
    weak = dict(v_lr=1e-4, v_num_grad_steps=2)
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, rehearse=1, rehearse_warm=warm, **weak)
    editor.edit(REQUESTS[:2])
    kept = editor.batches[0].values
    assert kept is None if not warm else kept.shape == (2, layout.hidden_size)
    lapsed = [i for i, held in enumerate(_holds(editor, REQUESTS[:2])) if not held]
    assert lapsed, "the weak first batch should leave something to rehearse"
    if warm:
        # the weak batch barely moved h0, so its values are close to where a fresh start begins:
        # values 10% longer tell a warm start apart from one at δ = 0
        kept = editor.batches[0].values = kept * 1.1

    seen, results = [], []
    real = editor_module.compute_targets

    def spy(*args, starts=None, **kwargs):  # the real optimisation, its starts and result noted
        seen.append(starts)
        results.append(real(*args, starts=starts, **kwargs))
        return results[-1]

    monkeypatch.setattr(editor_module, "compute_targets", spy)
    editor.edit(REQUESTS[2:])
    rehearsed = editor.batches[-1]
    assert rehearsed.rehearsed == [REQUESTS[i] for i in lapsed]
    # the report counts the rehearsed requests' z steps apart (here one either way: Adam's, or the jump)
    assert editor.history[-1].rehearsed_z_steps == pytest.approx(sum(results[0].steps[2:]) / len(lapsed))
    assert editor.history[-1].rehearsed_z_steps == 1
    if not warm:
        assert seen == [None] and rehearsed.values is None
        return
    expected = [None, None, *(kept[i] for i in lapsed)]  # the batch's own requests start from δ = 0
    assert len(seen[0]) == len(expected) and all(_same(a, b) for a, b in zip(seen[0], expected))
    assert rehearsed.values.shape == (2 + len(lapsed), layout.hidden_size)
    torch.testing.assert_close(rehearsed.values[2:], kept[lapsed], rtol=0, atol=1e-5)  # the old values, written again
    h0 = results[0].h0[2:].float()  # where a fresh start would have stayed, the optimisation being so weak
    assert ((rehearsed.values[2:] - h0).norm(dim=-1) > 0.05 * h0.norm(dim=-1)).all()
    # the journal keeps the values: a loaded state starts its rehearsals from the same ones
    editor.save_state(tmp_path / "state")
    resumed = Editor.load_state(tmp_path / "state", copy.deepcopy(model), tokenizer, cache=StatsCache(tmp_path / "home"), show_progress=False)
    assert resumed.config.rehearse_warm
    for loaded, applied in zip(resumed.batches, editor.batches):
        assert torch.equal(loaded.values, applied.values)
    # a request written again later starts from its latest value, and one whose latest batch is
    # reverted from the value before it
    sourced = list(enumerate([REQUESTS[2], REQUESTS[lapsed[0]]]))
    assert _same(resumed._warm_starts(sourced, 1, 1)[1], rehearsed.values[2])
    resumed.revert(resumed.history[-1].index)
    assert _same(resumed._warm_starts(sourced, 1, 1)[1], kept[lapsed[0]])


def test_of_two_earlier_requests_that_contradict_each_other_the_newer_is_rehearsed(llama, tokenizer, tmp_path):
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, rehearse=1, **WEAK)
    darrieux, tower, river, seine = REQUESTS
    keeper = EditRequest(tower.prompt, tower.subject, "Rome", "Paris", keep_subjects=("The Louvre",))
    louvre = EditRequest(tower.prompt, "The Louvre", "Berlin", "Paris")  # edits what the keeper kept, later
    editor.edit([keeper, darrieux])
    editor.edit([louvre])
    standing = [keeper, darrieux, louvre]
    holds = dict(zip(["keeper", "darrieux", "louvre"], _holds(editor, standing)))
    assert not holds["louvre"], "the weak batch should leave the later request lapsed"
    lapsed = editor._rehearsal([river, seine, EditRequest("{} is in", "Lyon", "Italy", "France")]).lapsed
    assert louvre in lapsed and keeper not in lapsed
    assert (darrieux in lapsed) == (not holds["darrieux"])
    assert lapsed == sorted(lapsed, key=standing.index)  # oldest first


def test_which_lapsed_requests_are_chosen_every_rule():
    """The choice itself, given which standing requests hold: each rule of choose_lapsed on its own
    case, including the one the tiny model cannot build, a held newer request keeping an older
    contradicting one from being written again."""
    def r(subject, new, prompt="{} is in", keep=()):
        return EditRequest(prompt, subject, new, "Paris", keep_subjects=keep)

    a, b, c, d = r("A", "Rome"), r("B", "Rome"), r("C", "Rome"), r("D", "Rome")
    batch = [r("X", "Oslo"), r("Y", "Oslo")]
    # lapsed ones, oldest first, at most as many as the batch has, or as the cap allows
    assert choose_lapsed([a, b, c, d], [False, True, False, False], batch) == [a, c]
    assert choose_lapsed([a, b, c, d], [False, True, False, False], batch, most=1) == [a]
    assert choose_lapsed([a, b, c, d], [False] * 4, batch, most=3) == [a, b, c]
    assert choose_lapsed([a, b, c, d], [True] * 4, batch) == []
    assert choose_lapsed([a, b, c], [False] * 3, batch[:1]) == [a]
    # never one about a subject the batch edits or keeps, nor one keeping a subject the batch edits
    keeps_x = r("E", "Rome", keep=("X",))
    kept_by_batch = [r("Z", "Oslo", keep=("A",))]
    assert choose_lapsed([a, keeps_x, b], [False] * 3, [r("X", "Oslo"), *kept_by_batch, r("W", "Oslo")]) == [b]
    # an older request keeping a subject that a newer one edits: the newer wins, lapsed or held
    keeper = r("F", "Rome", keep=("G",))
    g = r("G", "Berlin")
    assert choose_lapsed([keeper, g], [False, False], batch) == [g]
    assert choose_lapsed([keeper, g], [False, True], batch) == []  # the held-newer case
    # an older request editing what a newer one keeps: again the newer wins
    h = r("H", "Rome")
    keeps_h = r("I", "Berlin", keep=("H",))
    assert choose_lapsed([h, keeps_h], [False, True], batch) == []
    assert choose_lapsed([h, keeps_h], [False, False], batch) == [keeps_h]
    # a keep is per prompt: keeping H under another prompt contradicts nothing
    other_prompt = r("I", "Berlin", prompt="{} was born in", keep=("H",))
    assert choose_lapsed([h, other_prompt], [False, True], batch) == [h]


def test_a_replayed_journal_keeps_the_rehearsed_requests_and_continues_alike(llama, tokenizer, tmp_path):
    model, layout = llama
    settings = dict(rehearse=1, earlier_reread=1, **WEAK)  # with the re-read, C_p is rebuilt over the written requests
    straight = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, **settings)
    straight.edit(REQUESTS, batch_size=1)
    assert any(b.rehearsed for b in straight.batches)

    first = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, **settings)
    first.edit(REQUESTS[:3], batch_size=1)
    first.save_state(tmp_path / "state")
    saved = [json.loads(p.read_text()) for p in sorted((tmp_path / "state" / "batches").glob("*/requests.json"))]
    assert [len(s) for s in saved] == [1 + b.rehearsed for b in first.history]
    listed = CliRunner().invoke(app, ["log", "--state", str(tmp_path / "state")], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and "1 +1 rehearsed" in listed.output, listed.output
    resumed = Editor.load_state(tmp_path / "state", copy.deepcopy(model), tokenizer, cache=StatsCache(tmp_path / "home"), show_progress=False)
    assert resumed.config.rehearse == 1
    assert [b.rehearsed for b in resumed.batches] == [b.rehearsed for b in first.batches]
    assert [b.requests for b in resumed.batches] == [b.requests for b in first.batches]
    for layer in first.config.layers:
        torch.testing.assert_close(resumed.preserved[layer], first.preserved[layer], rtol=1e-5, atol=1e-6)
    resumed.edit(REQUESTS[3:], batch_size=1)
    assert [b.rehearsed for b in resumed.batches] == [b.rehearsed for b in straight.batches]
    for layer, weight in _weights(straight).items():
        torch.testing.assert_close(_weights(resumed)[layer], weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(resumed.preserved[layer], straight.preserved[layer], rtol=1e-5, atol=1e-5)


def test_rehearse_from_the_command_line(tiny_model_folder, tmp_path):
    from alphaedit.cli.common import _method_label
    from alphaedit.config import EditConfig

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    assert_edit_refuses(common, env, tmp_path, ((["--rehearse", "-1"], "--rehearse -1: give a number of batches"),))
    assert_recorded_and_kept(common, env, tmp_path / "state", "--rehearse", "1", "3", "rehearse", 1)
    assert_eval_refuses(tiny_model_folder, env, tmp_path, ["--rehearse", "-2"], "--rehearse -2")
    assert _method_label(EditConfig(method="alphaedit", rehearse=2)) == "alphaedit, rehearsal every 2"
    with pytest.raises(ValueError, match="rehearse must be"):
        EditConfig(rehearse=-1)


def test_rehearse_cap_from_the_command_line(tiny_model_folder, tmp_path):
    from alphaedit.cli.common import _method_label
    from alphaedit.config import EditConfig

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    assert_edit_refuses(common, env, tmp_path, ((["--rehearse", "1", "--rehearse-cap", "0"], "--rehearse-cap 0: give the most"),
                                                (["--rehearse-cap", "200"], "--rehearse-cap 200 limits rehearsal, which is off")))
    assert_recorded_and_kept([*common, "--rehearse", "1"], env, tmp_path / "state", "--rehearse-cap", "3", "5", "rehearse_cap", 3)
    assert_eval_refuses(tiny_model_folder, env, tmp_path, ["--rehearse-cap", "2"], "--rehearse-cap 2 limits rehearsal")
    assert _method_label(EditConfig(method="alphaedit", rehearse=1, rehearse_cap=300)) == "alphaedit, rehearsal every 1 (at most 300)"
    with pytest.raises(ValueError, match="rehearse_cap must be"):
        EditConfig(rehearse_cap=-1)


def test_rehearse_warm_from_the_command_line(tiny_model_folder, tmp_path):
    from alphaedit.cli.common import _method_label
    from alphaedit.config import EditConfig

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    assert_edit_refuses(common, env, tmp_path, ((["--rehearse-warm"], "--rehearse-warm starts rehearsed edits from their earlier values, "
                                                                       "and rehearsal is off"),))
    assert_eval_refuses(tiny_model_folder, env, tmp_path, ["--rehearse-warm"], "give --rehearse N too")
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    for state, flags in ((warm, ["--rehearse-warm"]), (cold, [])):
        done = CliRunner().invoke(app, [*common, "--state", str(state), "--rehearse", "1", *flags, "--json"], env=env)
        assert done.exit_code == 0, done.output
    assert json.loads((warm / "header.json").read_text())["config"]["rehearse_warm"] is True
    assert json.loads((cold / "header.json").read_text())["config"]["rehearse_warm"] is False
    # the values are in the journal with the warm start only
    assert "values" in Journal.open(warm).batch(0).tensors() and "values" not in Journal.open(cold).batch(0).tensors()
    # continuing keeps the setting: switching it on for a state made without it is refused
    again = CliRunner().invoke(app, [*common, "--state", str(cold), "--rehearse-warm", "--allow-repeat"], env=env)
    assert again.exit_code == 2 and "--rehearse-warm False" in again.output, again.output
    kept = CliRunner().invoke(app, [*common, "--state", str(warm), "--allow-repeat", "--json"], env=env)
    assert kept.exit_code == 0, kept.output
    # without --json the table says what each batch's check found and how many it wrote again
    shown = CliRunner().invoke(app, [*common, "--state", str(cold), "--allow-repeat"], env=env)
    journal = Journal.open(cold)
    last = journal.batch(journal.batch_ids()[-1]).report
    # (the headers may wrap in a narrow console: the cells are what is checked)
    assert shown.exit_code == 0 and "earlier" in shown.output, shown.output
    assert re.search(rf"{100 * last['earlier_held']:.1f}% │ +{last['rehearsed']} │", shown.output), shown.output
    assert _method_label(EditConfig(method="alphaedit", rehearse=1, rehearse_warm=True)) == "alphaedit, rehearsal every 1, warm-started"


def test_a_rehearsing_eval_run_grown_ends_as_one_started_with_all_its_records(tiny_model_folder, tmp_path):
    """The eval protocol matches a resumed state's batches to its records by their own requests,
    not the rehearsed ones: a 4-record rehearsing run grown to 6 ends where a 6-record run ends."""
    weak = ["--rehearse", "1", "--lr", "0.0001", "--steps", "1"]
    reference = _run([*_command(tiny_model_folder, tmp_path / "reference"), *weak], tmp_path / "home")
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert "earlier edits held" in reference.stderr
    out = tmp_path / "grown"
    short = _run([*_command(tiny_model_folder, out, n=4), *weak], tmp_path / "home")
    assert short.returncode == 0, short.stderr[-2000:]
    grown = _run(["eval", "--resume", str(out), "--n", "6", "--json"], tmp_path / "home")
    assert grown.returncode == 0, grown.stderr[-2000:]
    want, got = (json.loads((folder / "summary.json").read_text()) for folder in (tmp_path / "reference", out))
    assert got["post"] == want["post"] and got["norms"] == want["norms"]
    rehearsed = [json.loads(p.read_text())["rehearsed"] for p in sorted((out / "state" / "batches").glob("*/report.json"))]
    assert rehearsed[0] == 0 and sum(rehearsed) > 0, rehearsed
    # a batch after one that wrote edits again says how many of those held, on its progress line
    counted = [json.loads(p.read_text()).get("rewrites_counted", 0)
               for p in sorted((tmp_path / "reference" / "state" / "batches").glob("*/report.json"))]
    assert any(counted) and "re-writes held" in reference.stderr, (counted, reference.stderr[-2000:])
    # and the report carries the checks per batch, with a plot of them
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "reference" / "state" / "batches").glob("*/report.json"))]
    checked = [p for p in want["monitor"] if "earlier_held" in p]
    assert [(p["rehearsed"], p["rewrites_counted"]) for p in checked] == [(r["rehearsed"], r["rewrites_counted"]) for r in reports[1:]]
    assert "earlier_held" not in want["monitor"][0]  # the first batch has nothing earlier to check
    assert (tmp_path / "reference" / "rehearsal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rehearsal_that_outgrows_the_null_space_is_told_to_cap_its_rewrites(llama, tokenizer, tmp_path):
    # two directions per layer: the second batch's own two requests fit, its re-writes do not
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, rehearse=1, projector_rule="rank", nullspace_threshold=2, **WEAK)
    editor.edit(REQUESTS[:2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = editor.edit(REQUESTS[2:])[0]
    said = _room_warnings(caught)
    assert report.rehearsed >= 1, "the weak first batch should leave something to rehearse"
    assert len(said) == 1 and f"{2 + report.rehearsed} columns (2 new, {report.rehearsed} rehearsed)" in said[0]
    assert "--rehearse-cap" in said[0]


def test_each_check_counts_what_lapsed_and_how_many_of_the_last_rewrites_held(llama, tokenizer, tmp_path):
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, rehearse=1, rehearse_cap=2, **WEAK)
    editor.edit(REQUESTS[:2])
    second = editor.edit(REQUESTS[2:3])[0]
    rewritten = editor.batches[-1].rehearsed
    assert rewritten, "the weak first batch should leave something to rehearse"
    assert second.rewrites_counted == 0 and second.earlier_lapsed == 2 - round(2 * second.earlier_held)  # nothing re-written before
    standing = REQUESTS[:3]
    holds = _holds(editor, standing)  # the reference: one request at a time, on the model as the third batch finds it
    third = editor.edit(REQUESTS[3:])[0]
    assert third.earlier_lapsed == holds.count(False)
    assert third.rewrites_counted == len(rewritten)
    assert third.rewrites_lapsed == [h for r, h in zip(standing, holds) if r in rewritten].count(False)
    # kept in the journal and shown by `alphaedit log`
    editor.save_state(tmp_path / "state")
    listed = CliRunner().invoke(app, ["log", "--state", str(tmp_path / "state")], env={"COLUMNS": "250"})
    assert listed.exit_code == 0, listed.output
    held = third.rewrites_counted - third.rewrites_lapsed
    assert f"{100 * third.earlier_held:.1f}% held, {held} of {third.rewrites_counted} re-writes" in listed.output, listed.output


def test_with_rehearsal_every_other_batch_the_check_counts_the_last_rehearsing_batchs_rewrites(llama, tokenizer, tmp_path):
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, rehearse=2, rehearse_cap=3, **WEAK)
    reports = editor.edit([*REQUESTS, EditRequest("{} is a river in", "The Seine", "Spain", "France")], batch_size=1)
    # batches 1, 3 and 5 rehearse (1 has nothing earlier); 5's check counts what 3 wrote again, 2 and 4 wrote none
    assert [r.earlier_held is not None for r in reports] == [False, False, True, False, True]
    assert editor.batches[2].rehearsed, "the weak batches should leave something to rehearse"
    assert reports[4].rewrites_counted == len(editor.batches[2].rehearsed)


def test_only_the_last_rehearsing_batchs_rewrites_that_still_stand_are_counted():
    darrieux, tower, river, seine = REQUESTS
    replaced = EditRequest(tower.prompt, tower.subject, "London", "Paris")

    def applied(rehearsed, reverted=False, checked=True):  # rewrites_holding reads only these fields
        return SimpleNamespace(rehearsed=rehearsed, reverted=reverted, report=SimpleNamespace(earlier_held=0.5 if checked else None))

    standing, holds = [darrieux, river, replaced], [True, False, True]
    # the tower's re-write stands no more (edited again since): of the other two, one held
    assert rewrites_holding([applied([darrieux, tower, river])], standing, holds) == [True, False]
    # a reverted latest batch, or one that did not rehearse: the one before it is the last rehearsing one
    assert rewrites_holding([applied([river]), applied([darrieux], reverted=True)], standing, holds) == [False]
    assert rewrites_holding([applied([river]), applied([], checked=False)], standing, holds) == [False]
    # a rehearsing batch that wrote nothing again: nothing to count, even if an earlier one did
    assert rewrites_holding([applied([river]), applied([])], standing, holds) == [] and rewrites_holding([], standing, holds) == []


def test_the_outlook_pools_f_and_kappa_over_the_latest_checks(monkeypatch):
    def batch(requests, rehearsed, lapsed=None, counted=0, again=0, reverted=False, efficacy=0.9):
        report = SimpleNamespace(requests=requests, rehearsed=rehearsed, earlier_held=None if lapsed is None else 0.9,
                                 earlier_lapsed=lapsed, rewrites_counted=counted, rewrites_lapsed=again, efficacy=efficacy)
        return SimpleNamespace(report=report, reverted=reverted)

    monkeypatch.setattr(rehearsal_module, "OUTLOOK_REWRITES", 50)
    history = [batch(100, 0),  # nothing earlier to check
               batch(100, 30, lapsed=30),  # wrote back all 30 lapsed
               batch(100, 40, lapsed=45, counted=30, again=10),  # 10 of the 30 lapsed again, 45 - 10 - 0 = 35 new; cap: 40 of 45
               batch(100, 50, lapsed=60, counted=40, again=16)]  # 16 of the 40 again; 60 - 16 - (45 - 40) = 39 new
    seen = rehearsal_module.outlook(history)
    # the two latest pairs of checks: 70 re-writes counted, 26 lapsed again; 74 new over 130 + 140 columns
    assert seen.rewrites == 70 and seen.f == pytest.approx(26 / 70) and seen.kappa == pytest.approx(74 / 270)
    assert seen.new_per_check == 100 and seen.settles_at == pytest.approx(100 * seen.kappa / (1 - seen.f - seen.kappa))
    assert not seen.gives_out
    # of the 74, each batch's own 10 misses (efficacy 0.9 of 100): 20 over the 270 columns, 54 knocked out
    assert seen.own_missed == pytest.approx(20 / 270) and seen.knocked_out == pytest.approx(54 / 270)
    # a batch that writes worse: its misses are more of κ; a pair's misses count only up to what newly
    # lapsed there (one that recovered by the next check is not lapsed); an unknown efficacy (zsRE) says nothing
    worse = [*history[:2], batch(100, 40, lapsed=45, counted=30, again=10, efficacy=0.5), history[3]]
    assert rehearsal_module.outlook(worse).own_missed == pytest.approx((10 + 39) / 270)
    assert rehearsal_module.outlook([*history[:2], batch(100, 40, lapsed=45, counted=30, again=10, efficacy=0.0), history[3]]).own_missed \
        == pytest.approx((10 + 39) / 270)
    unknown = rehearsal_module.outlook([*history[:2], batch(100, 40, lapsed=45, counted=30, again=10, efficacy=None), history[3]])
    assert unknown.kappa == seen.kappa and unknown.own_missed is None and unknown.knocked_out is None
    # the latest pair alone once it counts enough
    monkeypatch.setattr(rehearsal_module, "OUTLOOK_REWRITES", 40)
    assert rehearsal_module.outlook(history).kappa == pytest.approx(39 / 140)
    # too few re-writes to tell, and journals of older code (no counts) say nothing
    monkeypatch.setattr(rehearsal_module, "OUTLOOK_REWRITES", 71)
    assert rehearsal_module.outlook(history) is None
    assert rehearsal_module.outlook([batch(100, 0), *[batch(100, 30) for _ in range(3)]]) is None
    # a pair of checks with a reverted batch between them (or at either end) is skipped: the later
    # check's counts were taken with it applied
    monkeypatch.setattr(rehearsal_module, "OUTLOOK_REWRITES", 30)
    undone = rehearsal_module.outlook([*history[:3], batch(100, 80, lapsed=99, counted=40, again=40, reverted=True), history[3]])
    assert undone.rewrites == 30 and undone.f == pytest.approx(10 / 30) and undone.kappa == pytest.approx(35 / 130)
    # with rehearsal every other batch: the requests between two checks are two batches' worth
    every_other = [batch(100, 0), batch(100, 0), batch(100, 30, lapsed=30), batch(100, 0),
                   batch(100, 40, lapsed=50, counted=30, again=12)]  # 50 - 12 - 0 = 38 new over 130 + 100
    seen = rehearsal_module.outlook(every_other)
    assert seen.f == pytest.approx(12 / 30) and seen.kappa == pytest.approx(38 / 230) and seen.new_per_check == 200
    assert seen.settles_at == pytest.approx(200 * (38 / 230) / (1 - 12 / 30 - 38 / 230))
    monkeypatch.setattr(rehearsal_module, "OUTLOOK_REWRITES", 40)
    # f + κ at GIVES_OUT: most re-writes lapse again and every column knocks one out
    worn = rehearsal_module.outlook([*history, batch(100, 60, lapsed=110, counted=50, again=40)])  # 110 - 40 - 10 = 60 new / 150
    assert worn.f == pytest.approx(0.8) and worn.kappa == pytest.approx(0.4) and worn.gives_out and worn.settles_at is None


def test_a_rehearsal_that_gives_out_is_told_once(llama, tokenizer, tmp_path, monkeypatch):
    # a learning rate too small for any write to take: every re-write lapses again at once, which
    # is what a model out of room does to them; one re-write is enough to tell here
    monkeypatch.setattr(rehearsal_module, "OUTLOOK_REWRITES", 1)
    model, layout = llama
    editor = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, rehearse=1, rehearse_cap=4, **WEAK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        editor.edit(REQUESTS, batch_size=1)
    said = [str(w.message) for w in caught if "rehearsal is giving out" in str(w.message)]
    outlooks = [rehearsal_module.outlook(editor.batches[:k]) for k in range(1, len(editor.batches) + 1)]
    seen = next((o for o in outlooks if o is not None and o.gives_out), None)
    assert seen is not None, outlooks
    assert len(said) == 1, said
    assert f"of the last {seen.rewrites} re-written edits {100 * seen.f:.0f}% lapsed again" in said[0]
    assert f"leaves {seen.kappa:.2f} edits newly lapsed" in said[0] and "the cap of 4 re-writes a batch" in said[0]
    assert f"({seen.own_missed:.2f} its own that did not take, {seen.knocked_out:.2f} earlier ones knocked out)" in said[0]
    # without rehearsal there is nothing to say
    plain = _editor((copy.deepcopy(model), layout), tokenizer, tmp_path, **WEAK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain.edit(REQUESTS, batch_size=1)
    assert not [w for w in caught if "rehearsal is giving out" in str(w.message)]
