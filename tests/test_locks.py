"""One writer per folder (locks.py): a folder another live process holds is refused with its name and
nothing changes; a killed holder leaves no stale lock; a journal write waits for another's."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import alphaedit
from alphaedit.cli import app
from alphaedit.journal import Journal
from alphaedit.locks import CLAIM_FILE, JOURNAL_WRITE_FILE, FolderInUse, claim_folder, folder_claimed
from conftest import WIKITEXT
from test_journal import REQUESTS, _editor

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock: Windows takes no advisory locks (locks.py)")
runner = CliRunner()
COUNTERFACT = WIKITEXT.parent / "counterfact" / "counterfact_test.json"


def _holder(folder: Path, purpose: str, lock_file: str | None = None, seconds: float = 60.0) -> subprocess.Popen:
    """Another process that claims `folder` and keeps it for `seconds`; returns once it holds it."""
    code = (f"import sys, time; from alphaedit.locks import claim_folder; h = claim_folder({str(folder)!r}, {purpose!r}, "
            f"lock_file={lock_file!r}); print('held', flush=True); time.sleep({seconds})")
    env = {**os.environ, "PYTHONPATH": str(Path(alphaedit.__file__).parents[1])}  # the code under test
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_claimed_folder_is_refused_with_its_holder_and_freed_when_the_holder_is_killed(tmp_path):
    holder = _holder(tmp_path / "run", "alphaedit eval")
    try:
        with pytest.raises(FolderInUse, match=rf"in use by alphaedit eval \(pid {holder.pid}, since .*\)\. Nothing was changed"):
            claim_folder(tmp_path / "run", "alphaedit eval")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL gives no chance to clean up: the operating system drops the lock with the process
    handle = claim_folder(tmp_path / "run", "a test")
    assert f"a test (pid {os.getpid()}" in (tmp_path / "run" / CLAIM_FILE).read_text()  # the killed holder's line, replaced
    handle.close()
    assert not (tmp_path / "run" / CLAIM_FILE).exists()  # released: the folder as it was
    with folder_claimed(tmp_path / "run", "again"):  # released by close: claimable at once
        pass


def test_eval_refuses_a_run_folder_another_process_holds_before_anything_loads(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out, "alphaedit eval")
    try:
        result = runner.invoke(app, ["eval", "--model", str(tmp_path / "no-model-needed"), "--dataset", f"counterfact:{COUNTERFACT}",
                                     "--n", "2", "--out", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2
    assert f"in use by alphaedit eval (pid {holder.pid}" in result.output
    assert not (out / "run.json").exists() and not (out / "state").exists()  # refused before anything was written


def test_revert_refuses_a_state_another_process_edits_and_leaves_the_journal_as_it_was(edited_state, tmp_path):
    before = (edited_state / "journal.json").read_bytes()
    holder = _holder(edited_state, "alphaedit serve on 127.0.0.1:8000")
    try:
        result = runner.invoke(app, ["revert", "1", "--state", str(edited_state)])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2 and "in use by alphaedit serve on 127.0.0.1:8000" in result.output
    assert (edited_state / "journal.json").read_bytes() == before
    assert runner.invoke(app, ["revert", "1", "--state", str(edited_state)]).exit_code == 0  # once it is free
    assert Journal.open(edited_state).reverted() == {1}


def test_a_journal_write_waits_for_another_processs_write_to_end(llama, tokenizer, tmp_path):
    model, layout = llama
    editor = _editor(copy.deepcopy(model), layout, tokenizer, tmp_path / "home")
    editor.edit(REQUESTS[:2], batch_size=2)
    state = tmp_path / "state"
    holder = _holder(state, "a journal write", JOURNAL_WRITE_FILE, seconds=3.0)
    started = time.monotonic()
    editor.save_state(state)
    waited = time.monotonic() - started
    holder.wait()
    assert waited > 1.0, f"save_state did not wait for the other write (took {waited:.2f} s)"
    assert Journal.open(state).batch_ids() == [0]


@pytest.fixture
def edited_state(llama, tokenizer, tmp_path) -> Path:
    model, layout = llama
    editor = _editor(copy.deepcopy(model), layout, tokenizer, tmp_path / "home")
    state = tmp_path / "state"
    editor.edit(REQUESTS, batch_size=2, on_batch=lambda _: editor.save_state(state))
    assert json.loads((state / "journal.json").read_text())["entries"]
    return state


def test_edit_refuses_a_state_another_process_holds_before_the_model_loads(edited_state, tmp_path):
    requests = tmp_path / "more.jsonl"
    requests.write_text(json.dumps({"prompt": "{} plays", "subject": "Lionel Messi", "target_new": "tennis"}) + "\n")
    before = (edited_state / "journal.json").read_bytes()
    holder = _holder(edited_state, "alphaedit eval")
    try:
        # a model that does not exist: the claim is refused before anything would load it
        result = runner.invoke(app, ["edit", "--model", str(tmp_path / "no-such-model"), "--requests", str(requests),
                                     "--state", str(edited_state)])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2 and f"in use by alphaedit eval (pid {holder.pid}" in result.output
    assert (edited_state / "journal.json").read_bytes() == before


def test_serve_refuses_a_state_another_process_holds_before_the_model_loads(edited_state, tmp_path):
    holder = _holder(edited_state, "alphaedit edit")
    try:
        result = runner.invoke(app, ["serve", "--model", str(tmp_path / "no-such-model"), "--state", str(edited_state)])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2 and f"in use by alphaedit edit (pid {holder.pid}" in result.output


def test_a_file_system_without_flock_gets_a_warning_not_a_traceback(tmp_path, monkeypatch):
    import errno

    from alphaedit import locks

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock it here .*carries on without the guard"):
        assert claim_folder(tmp_path / "nfs", "alphaedit eval") is None
    assert not (tmp_path / "nfs" / CLAIM_FILE).exists()
