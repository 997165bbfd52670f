"""Faults and careless input that must never cost the user data (issue 17, data loss)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from alphaedit.cli import app
from alphaedit.journal import INDEX, Journal, JournalError
from alphaedit.stats import CorpusSpec, StatsCache, second_moments
from conftest import WIKITEXT
from test_journal import REQUESTS, _cli_state, edited  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- 1. a state whose journal.json is lost ---------------------------------------------------------


def test_edit_refuses_a_state_with_batches_but_no_journal_and_changes_nothing(edited, tmp_path):
    state = tmp_path / "state"
    (state / INDEX).unlink()
    before = _tree(state)
    requests = tmp_path / "more.jsonl"
    requests.write_text(json.dumps({"prompt": "{} is in", "subject": "X", "target_new": "Y"}))
    result = runner.invoke(app, ["edit", "--model", "no-such-model", "--requests", str(requests), "--state", str(state)])
    assert result.exit_code == 2
    assert "no journal.json" in result.output and "alphaedit recover" in result.output
    assert _tree(state) == before  # the batches are still there, untouched
    with pytest.raises(Exception, match="damaged"):
        edited.save_state(state)  # the library refuses too: Journal.create never deletes batches
    assert _tree(state) == before


def test_recover_rebuilds_the_lost_journal_with_its_reverts(edited, llama, tokenizer, tmp_path):
    state = tmp_path / "state"
    edited.edit(edited.batches[0].requests)  # a third batch ...
    edited.revert(1)  # ... after which batch 1 is reverted ...
    edited.edit(edited.batches[1].requests)  # ... and a fourth comes after the revert
    edited.save_state(state)
    original = json.loads((state / INDEX).read_text())
    (state / INDEX).unlink()

    result = runner.invoke(app, ["recover", "--state", str(state)])
    assert result.exit_code == 0, result.output
    assert json.loads((state / INDEX).read_text()) == original
    assert "4 batches, 1 reverted [1]" in result.output

    again = runner.invoke(app, ["recover", "--state", str(state)])
    assert again.exit_code == 2 and "nothing to recover" in again.output


def test_a_cut_journal_is_named_by_every_command_and_recover_rebuilds_it_keeping_the_damaged_one(edited, tmp_path):
    state = tmp_path / "state"
    original = (state / INDEX).read_text()
    (state / INDEX).write_text(original[:100])  # cut by a disk fault (ours write atomically)
    for command in (["log"], ["revert", "0"]):
        line = _one_line_error(runner.invoke(app, [*command, "--state", str(state)]))
        assert "not valid JSON" in line and f"alphaedit recover --state {state}" in line

    result = runner.invoke(app, ["recover", "--state", str(state)])
    assert result.exit_code == 0, result.output
    assert json.loads((state / INDEX).read_text()) == json.loads(original)
    (kept,) = state.glob(f"{INDEX}.damaged-*")
    assert kept.read_text() == original[:100] and kept.name in result.output

    (state / INDEX).unlink()  # lost altogether: log says so, and what to run, like edit
    line = _one_line_error(runner.invoke(app, ["log", "--state", str(state)]))
    assert "no journal.json" in line and "alphaedit recover" in line


def test_recover_refuses_a_tampered_batch_and_a_gap(edited, tmp_path):
    state = tmp_path / "state"
    (state / INDEX).unlink()
    update = state / "batches" / "000001" / "update.safetensors"
    update.write_bytes(update.read_bytes()[:-8])
    result = runner.invoke(app, ["recover", "--state", str(state)])
    assert result.exit_code == 2 and "batch 1" in result.output and "manifest" in result.output
    assert not (state / INDEX).exists()

    shutil.rmtree(state / "batches" / "000000")
    result = runner.invoke(app, ["recover", "--state", str(state)])
    assert result.exit_code == 2 and "batch 0 is missing" in result.output
    assert not (state / INDEX).exists()


def test_recover_refuses_a_damaged_revert_file_with_what_to_do(edited, tmp_path):
    state = tmp_path / "state"
    edited.revert(1)
    edited.save_state(state)
    (state / INDEX).unlink()
    (revert,) = (state / "reverts").iterdir()
    revert.write_text('{"batch": 1, "time": "')  # cut short by a crash of the disk, not of ours
    result = runner.invoke(app, ["recover", "--state", str(state)])
    assert result.exit_code == 2 and revert.name in result.output and "move the file aside" in result.output
    assert not (state / INDEX).exists()


def test_a_batch_entry_without_an_id_is_refused_as_damage(edited, tmp_path):
    state = tmp_path / "state"
    index = json.loads((state / INDEX).read_text())
    del index["entries"][0]["id"]
    (state / INDEX).write_text(json.dumps(index))
    with pytest.raises(JournalError, match="entry 0 is a batch without an id"):
        Journal.open(state)


def test_a_state_written_before_header_json_gains_one_on_its_next_commit(edited, tmp_path):
    state = tmp_path / "state"
    (state / "header.json").unlink()
    edited.edit(edited.batches[0].requests)
    edited.save_state(state)
    assert json.loads((state / "header.json").read_text()) == Journal.open(state).header


# -- 2. export never overwrites without --force ----------------------------------------------------


def test_export_refuses_to_overwrite_unless_forced(tiny_model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    state = _cli_state(tiny_model_folder, tmp_path)
    deltas = tmp_path / "deltas.safetensors"
    deltas.write_bytes(b"precious")
    for extra in ([], ["--force"]):  # not an export of updates: not even --force replaces it
        refused = runner.invoke(app, ["export", "--state", str(state), "--out", str(deltas), "--deltas-only", *extra])
        assert refused.exit_code == 2 and ("--force" in refused.output if not extra else "not an export of updates" in refused.output)
        assert deltas.read_bytes() == b"precious"
    deltas.unlink()
    assert runner.invoke(app, ["export", "--state", str(state), "--out", str(deltas), "--deltas-only"]).exit_code == 0
    assert runner.invoke(app, ["export", "--state", str(state), "--out", str(deltas), "--deltas-only"]).exit_code == 2
    forced = runner.invoke(app, ["export", "--state", str(state), "--out", str(deltas), "--deltas-only", "--force"])
    assert forced.exit_code == 0, forced.output  # an earlier export of updates is replaced
    assert load_file(str(deltas))["layer.1.left"].shape[1] == 2

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    for extra in ([], ["--force"]):
        result = runner.invoke(app, ["export", "--state", str(state), "--out", str(folder), *extra])
        assert result.exit_code == 2 and "not empty" in result.output and "Traceback" not in result.output
        assert (folder / "thesis.txt").read_text() == "years of work"
    onto_folder = runner.invoke(app, ["export", "--state", str(state), "--out", str(folder), "--deltas-only"])
    assert onto_folder.exit_code == 2 and "is a folder" in onto_folder.output

    model_dir = tmp_path / "model"
    assert runner.invoke(app, ["export", "--state", str(state), "--out", str(model_dir)]).exit_code == 0
    assert runner.invoke(app, ["export", "--state", str(state), "--out", str(model_dir)]).exit_code == 2
    (model_dir / "marker").write_text("the user's")  # a file save_pretrained does not write: --force keeps off it too
    forced = runner.invoke(app, ["export", "--state", str(state), "--out", str(model_dir), "--force"])
    assert forced.exit_code == 2 and "marker" in forced.output and (model_dir / "marker").read_text() == "the user's"
    (model_dir / "marker").unlink()
    (model_dir / "config.json").write_text("{}")  # an older export's, replaced
    assert runner.invoke(app, ["export", "--state", str(state), "--out", str(model_dir), "--force"]).exit_code == 0
    assert json.loads((model_dir / "config.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model-")]  # nothing left aside


# -- 3. stats --restart restarts only the pass asked for -------------------------------------------


def test_restart_drops_only_its_own_pass_checkpoint(llama, tokenizer, tmp_path):
    model, layout = llama
    cache = StatsCache(tmp_path)
    checkpoints = cache.root / "checkpoints"
    checkpoints.mkdir(parents=True)
    other = checkpoints / "pass-0123456789abcdef.safetensors"  # another corpus's interrupted pass
    other.write_bytes(b"keep me")
    spec = CorpusSpec(str(WIKITEXT), tokens=3000, max_length=64)
    restarted = second_moments(model, layout, tokenizer, [1], spec, cache, show_progress=False, restart=True)
    assert other.read_bytes() == b"keep me"
    reference = second_moments(model, layout, tokenizer, [1], spec, None, show_progress=False)
    assert torch.equal(restarted[1].moment, reference[1].moment)


# -- careless input: one line naming the input and the fix, exit 2, nothing changed --------------


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    # the error is one line, never wrapped, and the last thing said (an earlier line may say which preset applied)
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    return errors[0]


@pytest.mark.parametrize("args", [
    ["edit", "--batch-size", "-1"], ["edit", "--batch-size", "0"], ["edit", "--tokens", "-100"], ["edit", "--steps", "0"],
    ["stats", "--tokens", "0"], ["stats", "--tokens", "-100"], ["eval", "--n", "-1"], ["eval", "--n", "0"],
    ["eval", "--batch-size", "0"], ["ask", "--max-new-tokens", "0", "x"],
])
def test_counts_are_validated_at_the_command_line(args, tmp_path):
    needs = {"edit": ["--requests", "r.json", "--state", str(tmp_path / "s")], "eval": ["--dataset", "zsre:x", "--out", str(tmp_path / "o")]}
    result = runner.invoke(app, [args[0], *needs.get(args[0], []), *args[1:]])
    assert result.exit_code == 2 and "Invalid value" in result.output
    assert not (tmp_path / "s").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("layers, says", [("abc", "write a range"), ("3-", "write a range"), ("7-3", "runs backwards"),
                                          ("99-100", "do not exist"), ("2,1", "ascending")])
def test_bad_layers_are_one_line(layers, says, tiny_model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    requests = tmp_path / "r.json"
    requests.write_text(json.dumps([{"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}]))
    result = runner.invoke(app, ["edit", "--model", str(tiny_model_folder), "--requests", str(requests), "--state", str(tmp_path / "s"),
                                 "--layers", layers])
    assert says in _one_line_error(result)
    assert not (tmp_path / "s").exists()


def test_a_model_that_is_not_there_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    for folder, says in ((tmp_path / "missing", "no such folder"), (empty, "no config.json"), (no_weights, "no weights")):
        assert says in _one_line_error(runner.invoke(app, ["ask", "--model", str(folder), "hello"]))
    assert "is empty" in _one_line_error(runner.invoke(app, ["ask", "--model", str(no_weights), ""]))


def test_state_that_is_a_file_is_refused_before_anything_loads(tmp_path):
    state = tmp_path / "state"
    state.write_text("not a folder")
    requests = tmp_path / "r.json"
    requests.write_text(json.dumps([{"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}]))
    line = _one_line_error(runner.invoke(app, ["edit", "--model", "no-such/model", "--requests", str(requests), "--state", str(state)]))
    assert "is a file" in line and state.read_text() == "not a folder"


def test_a_no_op_edit_is_refused_naming_the_record(tmp_path):
    requests = tmp_path / "r.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "{} is in", "subject": "Paris", "target_new": "Rome", "target_true": "France"},
        {"prompt": "{} is in", "subject": "Lyon", "target_new": " France", "target_true": "France"},
    ]))
    line = _one_line_error(runner.invoke(app, ["edit", "--model", "x/y", "--requests", str(requests), "--state", str(tmp_path / "s")]))
    assert "record 2" in line and "change nothing" in line and "target_new" in line


def test_a_journal_without_entries_and_a_truncated_checkpoint_are_named(edited, llama, tokenizer, tmp_path):
    state = tmp_path / "state"
    index = json.loads((state / INDEX).read_text())
    del index["entries"]
    (state / INDEX).write_text(json.dumps(index))
    line = _one_line_error(runner.invoke(app, ["log", "--state", str(state)]))
    assert "'entries'" in line and "recover" in line

    model, layout = llama
    cache = StatsCache(tmp_path / "home")
    spec = CorpusSpec(str(WIKITEXT), tokens=3000, max_length=64)
    from alphaedit.stats import _pass_key, statistic_description, Workers

    key = _pass_key({1: statistic_description(model, layout, tokenizer, 1, spec)}, Workers())
    cache.save_checkpoint(key, {"batches_done": torch.tensor(1), "count": torch.tensor(5)})
    path = cache.root / "checkpoints" / f"pass-{key}.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="--restart") as error:
        second_moments(model, layout, tokenizer, [1], spec, cache, show_progress=False)
    assert str(path) in str(error.value)


def test_continuing_a_state_refuses_contradicting_options_and_skips_repeats(tiny_model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    state = _cli_state(tiny_model_folder, tmp_path)  # layers 1-2 (the tiny preset), 3 steps, corpus WIKITEXT, 2000 tokens
    header = Journal.open(state).header
    before = _tree(state)
    requests = tmp_path / "edits.jsonl"
    for given, recorded in ((["--steps", "5"], "--steps 3"), (["--tokens", "999"], "--tokens 2000"),
                            (["--corpus", str(tmp_path / "missing")], f"--corpus {WIKITEXT}"),
                            (["--layers", "0-1"], f"--layers {header['config']['layers'][0]}-{header['config']['layers'][-1]}"),
                            (["--lr", "0.3"], f"--lr {header['config']['v_lr']}"),
                            # the switches too: a state made with chat-aware editing on does not go on without it
                            (["--no-chat"], "--chat/--no-chat True"), (["--chat-values", "shared"], "--chat-values own"),
                            (["--anchor-values"], "--anchor-values False"),
                            (["--stop-most-probable"], "--stop-most-probable False")):
        result = runner.invoke(app, ["edit", "--requests", str(requests), "--state", str(state), *given])
        line = _one_line_error(result)
        assert recorded in line and "cannot continue" in line
    assert _tree(state) == before

    # the same two requests again (a rerun after a kill): skipped, and said so; with --json, in JSON
    again = runner.invoke(app, ["edit", "--requests", str(requests), "--state", str(state)])
    assert again.exit_code == 0 and "already in" in again.output
    again = runner.invoke(app, ["edit", "--requests", str(requests), "--state", str(state), "--chat", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout) == {"state": str(state), "requests": 0, "skipped": 2, "batches": []}
    assert _tree(state) == before
    forced = runner.invoke(app, ["edit", "--requests", str(requests), "--state", str(state), "--allow-repeat", "--steps", "3"])
    assert forced.exit_code == 0, forced.output
    assert len(Journal.open(state).batch_ids()) == 3  # the default batch: both in one


def test_an_overlong_prompt_is_refused_before_any_computation(tiny_model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    requests = tmp_path / "r.json"
    requests.write_text(json.dumps([{"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"},
                                    {"prompt": "{} " + "very " * 100 + "is in", "subject": "Lyon", "target_new": "Rome"}]))
    command = ["edit", "--model", str(tiny_model_folder), "--requests", str(requests), "--state", str(tmp_path / "s"),
               "--corpus", str(WIKITEXT), "--tokens", "2000"]
    line = _one_line_error(runner.invoke(app, [*command, "--max-prompt-tokens", "64"]))
    assert "request 2" in line and "--max-prompt-tokens" in line
    line = _one_line_error(runner.invoke(app, command))  # 256 by default, but the tiny model's context is shorter
    assert "request 2" in line and "context of 244" in line
    assert not (tmp_path / "home" / "stats").exists()  # refused before the statistics pass
    assert not (tmp_path / "s").exists()


def test_log_never_cuts_its_cells(edited, tmp_path):
    result = runner.invoke(app, ["log", "--state", str(tmp_path / "state")])
    assert result.exit_code == 0
    assert "…" not in result.output and "applied" in result.output


# -- 6. the statistics cache is verified, and keyed by the corpus's content --------------------------


def test_a_flipped_bit_in_a_cached_statistic_is_refused_naming_the_file(llama, tokenizer, tmp_path):
    model, layout = llama
    cache = StatsCache(tmp_path)
    spec = CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64)
    second_moments(model, layout, tokenizer, [1], spec, cache, show_progress=False)
    (path,) = (cache.root).rglob("layer1-*.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # one bit of the moment's last float
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum") as error:
        second_moments(model, layout, tokenizer, [1], spec, cache, show_progress=False)
    assert str(path) in str(error.value) and "delete it" in str(error.value)


def test_a_changed_corpus_file_is_not_served_its_old_statistics(llama, tokenizer, tmp_path):
    model, layout = llama
    corpus = tmp_path / "corpus.txt"
    text = (WIKITEXT / "wiki.valid.raw").read_text(encoding="utf-8")
    corpus.write_text(text[:20_000], encoding="utf-8")
    cache = StatsCache(tmp_path / "home")
    spec = CorpusSpec(str(corpus), tokens=1000, max_length=64)
    first = second_moments(model, layout, tokenizer, [1], spec, cache, show_progress=False)[1].moment
    corpus.write_text(text[20_000:40_000], encoding="utf-8")  # same path, other text
    second = second_moments(model, layout, tokenizer, [1], spec, cache, show_progress=False)[1].moment
    fresh = second_moments(model, layout, tokenizer, [1], spec, None, show_progress=False)[1].moment
    assert not torch.equal(first, second) and torch.equal(second, fresh)


def test_ctrl_c_during_an_edit_says_what_was_committed_and_the_rerun_continues(tiny_model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    from alphaedit.editor import Editor

    requests = tmp_path / "edits.jsonl"
    requests.write_text("\n".join(json.dumps(r.to_dict()) for r in REQUESTS[:3]))
    command = ["edit", "--model", str(tiny_model_folder), "--requests", str(requests), "--state", str(tmp_path / "state"),
               "--batch-size", "1", "--steps", "3", "--corpus", str(WIKITEXT), "--tokens", "2000"]
    real, calls = Editor._edit_batch, []

    def interrupted_in_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what SIGINT raises in the main thread
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Editor, "_edit_batch", interrupted_in_the_second_batch)
    result = runner.invoke(app, command)
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert "interrupted: 1 batch(es), 1 of 3 request(s), were committed" in " ".join(result.output.split())
    assert Journal.open(tmp_path / "state").batch_ids() == [0]

    monkeypatch.setattr(Editor, "_edit_batch", real)
    again = runner.invoke(app, command)
    assert again.exit_code == 0 and "skipping 1 of 3" in again.output
    assert Journal.open(tmp_path / "state").batch_ids() == [0, 1, 2]


def test_the_cli_says_a_warning_in_one_line_and_restores_the_usual_display(tmp_path):
    import warnings

    requests = tmp_path / "edits.jsonl"
    requests.write_text(json.dumps({"prompt": "{} is in", "subject": "Paris", "target_new": "Rome", "tagret_true": "France"}))
    before = warnings.showwarning
    result = runner.invoke(app, ["edit", "--requests", str(requests), "--state", str(tmp_path / "s"), "--model", str(tmp_path / "none")])
    assert result.exit_code == 2  # no such model: refused after the file was read
    said = [line for line in result.output.splitlines() if "tagret_true" in line]
    assert len(said) == 1 and said[0].startswith("warning: ") and said[0].endswith("did you mean 'target_true'?")
    assert "UserWarning" not in result.output and warnings.showwarning is before


def test_a_state_saved_from_python_names_its_model_or_the_cli_asks_for_it(edited, tiny_model_folder, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    from transformers import AutoModelForCausalLM

    from alphaedit.editor import Editor

    state = tmp_path / "state"
    assert Journal.open(state).header["model"] is None  # built from a config in memory: nothing to name
    for command in (["export", "--out", str(tmp_path / "out")], ["ask", "The Seine flows through"]):
        line = _one_line_error(runner.invoke(app, [*command, "--state", str(state)]))
        assert "does not name its base model" in line and "give --model" in line
    given = runner.invoke(app, ["export", "--state", str(state), "--out", str(tmp_path / "out"), "--model", str(tiny_model_folder)])
    assert given.exit_code == 0, given.output
    # a model loaded from a folder or the hub is named by where it came from
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_folder)
    assert Editor(loaded, tokenizer, cache=edited.cache).model_spec == str(tiny_model_folder)


def test_edit_takes_chat_values_for_a_new_state_and_refuses_an_unknown_one(tiny_model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    requests = tmp_path / "edits.jsonl"
    requests.write_text(json.dumps(REQUESTS[0].to_dict()))
    command = ["edit", "--model", str(tiny_model_folder), "--requests", str(requests), "--state", str(tmp_path / "state"),
               "--steps", "3", "--corpus", str(WIKITEXT), "--tokens", "2000"]
    for refused in ([*command, "--chat-values", "mine"], ["serve", "--state", str(tmp_path / "state"), "--chat-values", "mine"]):
        line = _one_line_error(runner.invoke(app, refused))
        assert "--chat-values mine: choose one of own, shared, trained" in line and not (tmp_path / "state").exists()
    result = runner.invoke(app, [*command, "--chat-values", "shared"])
    assert result.exit_code == 0, result.output
    assert Journal.open(tmp_path / "state").header["config"]["chat_values"] == "shared"


def test_the_command_line_loads_without_transformers():
    """`alphaedit --help` and a mistyped option answer in about a second: importing the CLI must not
    import transformers (seconds on a laptop); a command loads it when it loads a model."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import sys, alphaedit.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
