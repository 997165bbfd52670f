"""The edit journal: revert, replay, export, deltas, corruption, and crash safety under SIGKILL."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from alphaedit.cli import app
from alphaedit.config import EditConfig
from alphaedit.editor import Editor
from alphaedit.journal import INDEX, Journal, JournalError
from alphaedit.layouts import mlp_out_weight, weight_delta_as_stored
from alphaedit.locks import JOURNAL_WRITE_FILE
from alphaedit.requests import EditRequest
from alphaedit.stats import CorpusSpec, StatsCache
from conftest import WIKITEXT

pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()

REQUESTS = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("The valley near {} is", "the river", "green", None),
    EditRequest("{} flows through the city of", "The Seine", "Berlin", "Paris"),
]


def _editor(model, layout, tokenizer, home: Path) -> Editor:
    config = EditConfig(layers=[1, 2], v_num_grad_steps=4, nullspace_threshold=0.5, context_template_length=6)
    corpus = CorpusSpec(str(WIKITEXT), tokens=2000, max_length=64)
    return Editor(model, tokenizer, config, layout=layout, corpus=corpus, cache=StatsCache(home), show_progress=False)


def _weights(model, layout, layers=(1, 2)) -> dict[int, torch.Tensor]:
    return {l: mlp_out_weight(model, layout, l).detach().clone() for l in layers}


@pytest.fixture
def edited(llama, tokenizer, tmp_path):
    """An editor that applied two batches and saved them to a journal."""
    model, layout = llama
    editor = _editor(copy.deepcopy(model), layout, tokenizer, tmp_path / "home")
    editor.edit(REQUESTS, batch_size=2, on_batch=lambda _: editor.save_state(tmp_path / "state"))
    return editor


def test_reverting_the_latest_batch_restores_the_weights(llama, tokenizer, tmp_path):
    model, layout = llama
    editor = _editor(copy.deepcopy(model), layout, tokenizer, tmp_path)
    editor.edit(REQUESTS[:2])
    before_second = _weights(editor.model, layout)
    preserved_before = {l: c.clone() for l, c in editor.preserved.items()}
    editor.edit(REQUESTS[2:])
    assert any(not torch.equal(before_second[l], w) for l, w in _weights(editor.model, layout).items())
    editor.revert(1)
    for layer, weight in _weights(editor.model, layout).items():
        assert (weight - before_second[layer]).abs().max() <= 1e-6
        assert (editor.preserved[layer] - preserved_before[layer]).abs().max() <= 1e-4 * preserved_before[layer].abs().max()
    with pytest.raises(ValueError, match="already reverted"):
        editor.revert(1)
    with pytest.raises(ValueError, match="no batch 7"):
        editor.revert(7)


def test_replay_onto_a_fresh_base_gives_the_same_weights(edited, llama, tokenizer, tmp_path):
    model, layout = llama
    replayed = Editor.load_state(tmp_path / "state", copy.deepcopy(model), tokenizer, show_progress=False)
    for layer, weight in _weights(edited.model, layout).items():
        assert torch.equal(_weights(replayed.model, layout)[layer], weight)
    assert [r.index for r in replayed.history] == [0, 1]
    for layer in (1, 2):
        torch.testing.assert_close(replayed.preserved[layer], edited.preserved[layer])


def test_a_reverted_batch_stays_reverted_after_replay(edited, llama, tokenizer, tmp_path):
    model, layout = llama
    edited.revert(0)
    edited.save_state(tmp_path / "state")
    replayed = Editor.load_state(tmp_path / "state", copy.deepcopy(model), tokenizer, show_progress=False)
    assert [b.reverted for b in replayed.batches] == [True, False]
    journal = Journal.open(tmp_path / "state")
    assert journal.batch_ids() == [0, 1] and journal.applied_batch_ids() == [1]
    for layer, weight in _weights(edited.model, layout).items():
        torch.testing.assert_close(_weights(replayed.model, layout)[layer], weight, rtol=0, atol=1e-6)


def test_export_loads_in_plain_transformers_with_the_same_logits(edited, tmp_path):
    exported = edited.export(tmp_path / "exported")
    plain = AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = edited.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, edited.model(ids).logits, rtol=0, atol=1e-6)
    with pytest.raises(FileExistsError):
        edited.export(exported)


def test_deltas_only_export_reproduces_the_edit(edited, llama, tmp_path):
    model, layout = llama
    path = edited.export_deltas(tmp_path / "deltas.safetensors")
    # rank 4 factors against 32×64 weights, plus the file's JSON header
    assert path.stat().st_size < 0.5 * sum(w.numel() * 4 for w in _weights(model, layout).values())
    deltas = load_file(str(path))
    for layer, base in _weights(model, layout).items():
        delta = deltas[f"layer.{layer}.left"] @ deltas[f"layer.{layer}.right"].T
        torch.testing.assert_close(base + weight_delta_as_stored(layout, delta), _weights(edited.model, layout)[layer], rtol=0, atol=1e-6)


def test_journal_holds_only_json_and_safetensors(edited, tmp_path):
    files = [p for p in (tmp_path / "state").rglob("*") if p.is_file() and p.name != JOURNAL_WRITE_FILE]
    assert files and all(p.suffix in (".json", ".safetensors") for p in files)
    # beside them, the write lock (locks.py): one line of text naming its last holder, never read as data
    assert (tmp_path / "state" / JOURNAL_WRITE_FILE).read_text().startswith("a journal write (pid ")


def test_a_path_escaping_the_journal_is_refused(edited, tmp_path):
    index_path = tmp_path / "state" / INDEX
    index = json.loads(index_path.read_text())
    index["entries"][0]["path"] = "../../etc"
    index_path.write_text(json.dumps(index))
    with pytest.raises(JournalError, match="invalid path"):
        Journal.open(tmp_path / "state")


def test_a_truncated_index_is_refused_with_a_clear_message(edited, tmp_path):
    index_path = tmp_path / "state" / INDEX
    index_path.write_text(index_path.read_text()[:50])
    with pytest.raises(JournalError, match="not valid JSON"):
        Journal.open(tmp_path / "state")


def test_log_and_revert_commands(edited, tmp_path):
    state = str(tmp_path / "state")
    result = runner.invoke(app, ["log", "--state", state, "--json"])
    assert result.exit_code == 0, result.output
    batches = json.loads(result.stdout)["batches"]
    assert [b["id"] for b in batches] == [0, 1] and all(b["requests"] == 2 for b in batches)
    assert set(batches[0]["delta_norms"]) == {"1", "2"} and not batches[0]["reverted"]

    assert runner.invoke(app, ["revert", "0", "--state", state]).exit_code == 0
    assert json.loads(runner.invoke(app, ["log", "--state", state, "--json"]).stdout)["batches"][0]["reverted"]
    again = runner.invoke(app, ["revert", "0", "--state", state])
    assert again.exit_code == 2 and "already reverted" in again.output
    assert "applied" in runner.invoke(app, ["log", "--state", state]).stdout


# -- crash safety --------------------------------------------------------------------------------


def _edit_command(model: Path, requests: Path, state: Path) -> list[str]:
    """`alphaedit edit` in a subprocess: batches of one request, few steps, so writes are frequent."""
    return [sys.executable, "-m", "alphaedit", "edit", "--model", str(model), "--requests", str(requests), "--state", str(state),
            "--batch-size", "1", "--steps", "3", "--corpus", str(WIKITEXT), "--tokens", "2000", "--json",
            "--allow-repeat"]  # every run appends all its requests, so the count tells what was kept


def _check_journal(state: Path) -> int:
    """A killed run leaves no journal yet, or one that opens, verifies and holds whole batches."""
    if not (state / INDEX).exists():
        return 0
    journal = Journal.open(state)  # verifies every checksum
    ids = journal.batch_ids()
    assert ids == list(range(len(ids)))
    assert all(len(journal.batch(i).requests) == 1 for i in ids)
    return len(ids)


def _stamp(path: Path) -> tuple[int, int] | None:
    """What a commit changes about a file: its inode (replaced by rename) and its size; None while absent."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_size


def _wait_for_change(path: Path, before: tuple[int, int] | None, process: subprocess.Popen, timeout: float) -> None:
    """Polls (without opening it, so the writer is never disturbed) until `path` is replaced or the process ends."""
    deadline = time.monotonic() + timeout
    while _stamp(path) == before and process.poll() is None:
        assert time.monotonic() < deadline, f"no commit to {path} within {timeout:.0f} s"
        time.sleep(0.02)


def test_sigkill_at_random_moments_never_leaves_a_half_written_journal(tiny_model_folder, llama, tokenizer, tmp_path):
    requests = tmp_path / "edits.jsonl"
    requests.write_text("\n".join(json.dumps(r.to_dict()) for r in REQUESTS * 2))
    state = tmp_path / "state"
    env = {**os.environ, "ALPHAEDIT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    command = _edit_command(tiny_model_folder, requests, state)

    started = time.monotonic()  # one uninterrupted run, in its own state, times the whole job
    subprocess.run(_edit_command(tiny_model_folder, requests, tmp_path / "timing"), env=env, check=True, capture_output=True)
    duration = time.monotonic() - started

    rng = random.Random(0)
    committed = 0
    for attempt in range(12):  # each kill restarts the CLI (seconds of imports): twelve random moments cover the phases
        index_before = _stamp(state / INDEX)
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt % 2:  # every other kill lands after this run's first commit, however slow the machine is today
            _wait_for_change(state / INDEX, index_before, process, timeout=20 * duration)
            time.sleep(rng.uniform(0.0, duration / 4))
        else:  # the others anywhere in the run, start-up and model loading included
            time.sleep(rng.uniform(0.2, duration))
        process.send_signal(signal.SIGKILL)
        process.wait()
        now = _check_journal(state)
        assert now >= committed  # committed batches are never lost
        committed = now
    assert committed > 0

    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    final = _check_journal(state)
    assert final == committed + len(REQUESTS) * 2
    model, layout = llama
    replayed = Editor.load_state(state, copy.deepcopy(model), tokenizer, show_progress=False)
    assert len(replayed.history) == final


def _cli_state(tiny_model_folder: Path, tmp_path: Path) -> Path:
    requests = tmp_path / "edits.jsonl"
    requests.write_text("\n".join(json.dumps(r.to_dict()) for r in REQUESTS[:2]))
    state = tmp_path / "state"
    result = runner.invoke(app, ["edit", "--model", str(tiny_model_folder), "--requests", str(requests), "--state", str(state),
                                 "--batch-size", "1", "--steps", "3", "--corpus", str(WIKITEXT), "--tokens", "2000"])
    assert result.exit_code == 0, result.output
    return state


def test_export_and_apply_commands(tiny_model_folder, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    state = _cli_state(tiny_model_folder, tmp_path)

    assert runner.invoke(app, ["export", "--state", str(state), "--out", str(tmp_path / "exported")]).exit_code == 0
    assert runner.invoke(app, ["apply", "--state", str(state), "--model", str(tiny_model_folder), "--out", str(tmp_path / "applied")]).exit_code == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    applied = AutoModelForCausalLM.from_pretrained(tmp_path / "applied")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_folder)
    for name, weight in exported.state_dict().items():
        assert torch.equal(weight, applied.state_dict()[name]), name
    assert not torch.equal(exported.model.layers[1].mlp.down_proj.weight, base.model.layers[1].mlp.down_proj.weight)

    # --force replaces a saved model (apply's too), never a folder that holds anything else
    again = ["apply", "--state", str(state), "--model", str(tiny_model_folder), "--out", str(tmp_path / "applied")]
    refused = runner.invoke(app, again)
    assert refused.exit_code == 2 and "--force" in refused.output
    assert runner.invoke(app, [*again, "--force"]).exit_code == 0
    (tmp_path / "exported" / "notes.txt").write_text("mine")
    (tmp_path / "exported" / "eval").mkdir()
    kept = runner.invoke(app, ["export", "--state", str(state), "--out", str(tmp_path / "exported"), "--force"])
    assert kept.exit_code == 2 and "eval/, notes.txt" in kept.output and "even with --force" in kept.output
    assert (tmp_path / "exported" / "notes.txt").read_text() == "mine" and (tmp_path / "exported" / "eval").is_dir()

    result = runner.invoke(app, ["export", "--state", str(state), "--out", str(tmp_path / "deltas.safetensors"), "--deltas-only"])
    assert result.exit_code == 0, result.output
    deltas = load_file(str(tmp_path / "deltas.safetensors"))
    assert deltas["layer.1.left"].shape[1] == 2  # two batches of one request: rank 2 in all
    for bad in (tmp_path / "deltas.safetensors" / "x.safetensors", tmp_path / "deltas.safetensors" / "model"):
        command = ["export", "--state", str(state), "--out", str(bad)] + (["--deltas-only"] if bad.suffix else [])
        result = runner.invoke(app, command)  # under a file: one line, no traceback
        assert result.exit_code == 2 and "cannot write there" in result.output and "Traceback" not in result.output

    other = AutoModelForCausalLM.from_pretrained(tiny_model_folder)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.add_(1e-3)
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    refused = runner.invoke(app, ["apply", "--state", str(state), "--model", str(tmp_path / "other"), "--out", str(tmp_path / "nope")])
    assert refused.exit_code == 2 and "another base model" in refused.output
    assert not (tmp_path / "nope").exists()


def test_a_revert_made_elsewhere_is_seen_before_the_next_save(edited, tmp_path):
    state = tmp_path / "state"
    assert runner.invoke(app, ["revert", "0", "--state", str(state)]).exit_code == 0  # another process
    with pytest.raises(JournalError, match="different edit history"):
        edited.save_state(state)  # the editor's history lacks that revert: refuse, never overwrite
    assert Journal.open(state).reverted() == {0}
