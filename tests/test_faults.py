"""Fault injection: kill `edit` and `stats` with SIGKILL at every commit point they reach.

The commit points are enumerated by the code itself (ALPHAEDIT_FAULT_LOG: every os.replace of a
finished file or folder goes through files.commit), not found by timing. After each kill the
state must open and verify, hold whole batches only, and a rerun of the same command must end
exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from alphaedit.editor import Editor
from alphaedit.journal import INDEX, Journal
from alphaedit.layouts import mlp_out_weight
from conftest import WIKITEXT

REQUESTS = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English", "target_true": "French"},
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome", "target_true": "Paris"},
]


def _run(command: list[str], home: Path, **fault: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALPHAEDIT_FAULT")}
    env.update({"ALPHAEDIT_HOME": str(home), "OMP_NUM_THREADS": "1", **fault})
    return subprocess.run([sys.executable, "-m", "alphaedit", *command], env=env, capture_output=True, text=True, timeout=300)


def _commit_points(command: list[str], home: Path, log: Path) -> list[str]:
    done = _run(command, home, ALPHAEDIT_FAULT_LOG=str(log))
    assert done.returncode == 0, done.stderr[-2000:]
    return log.read_text().splitlines()


def _weights(state: Path, model, tokenizer, layers=(1, 2)) -> dict[int, torch.Tensor]:
    editor = Editor.load_state(state, copy.deepcopy(model), tokenizer, show_progress=False)
    return {l: mlp_out_weight(editor.model, editor.layout, l).detach().clone() for l in layers}


def test_edit_killed_at_every_commit_point_resumes_to_the_uninterrupted_result(tiny_model_folder, llama, tokenizer, tmp_path, record_property):
    model, _ = llama
    requests = tmp_path / "edits.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in REQUESTS))

    def command(state: Path) -> list[str]:
        return ["edit", "--model", str(tiny_model_folder), "--requests", str(requests), "--state", str(state),
                "--batch-size", "1", "--steps", "3", "--layers", "1-2", "--corpus", str(WIKITEXT), "--tokens", "2000", "--json"]

    points = _commit_points(command(tmp_path / "reference"), tmp_path / "home-reference", tmp_path / "points.log")
    # statistics of two layers, the header copy, the journal's creation, then per batch its folder and the index
    assert len(points) >= 2 + 2 + 2 * len(REQUESTS)
    reference = _weights(tmp_path / "reference", model, tokenizer)

    for k in range(1, len(points) + 1):
        state, home = tmp_path / f"state-{k}", tmp_path / f"home-{k}"
        killed = _run(command(state), home, ALPHAEDIT_FAULT_AT=str(k))
        assert killed.returncode == -signal.SIGKILL, f"point {k} ({points[k - 1]}) was not reached: {killed.stderr[-500:]}"
        if (state / INDEX).exists():  # the state opens, verifies, and holds whole batches only
            journal = Journal.open(state)
            assert journal.batch_ids() == list(range(len(journal.batch_ids())))
            assert all(len(journal.batch(i).requests) == 1 for i in journal.batch_ids())
        finished = _run(command(state), home)
        assert finished.returncode == 0, f"rerun after a kill at point {k} ({points[k - 1]}): {finished.stderr[-1500:]}"
        assert Journal.open(state).batch_ids() == list(range(len(REQUESTS)))  # nothing applied twice
        for layer, weight in _weights(state, model, tokenizer).items():
            torch.testing.assert_close(weight, reference[layer], rtol=0, atol=1e-6, msg=f"kill at point {k} ({points[k - 1]})")
        shutil.rmtree(state)
        shutil.rmtree(home)
    record_property("kill_points", ("edit", len(points)))


def test_stats_killed_at_every_commit_point_resumes_to_the_uninterrupted_result(tiny_model_folder, tmp_path, record_property):
    def command(out: Path) -> list[str]:
        return ["stats", "--model", str(tiny_model_folder), "--corpus", str(WIKITEXT), "--tokens", "20000", "--layers", "1-2",
                "--checkpoint-every", "5000", "--out", str(out), "--json"]

    points = _commit_points(command(tmp_path / "reference"), tmp_path / "home-reference", tmp_path / "points.log")
    assert sum("checkpoints" in p for p in points) >= 2  # several checkpoints, then the results
    reference = {l: load_file(str(tmp_path / "reference" / f"layer{l}.safetensors"))["moment"] for l in (1, 2)}
    for k in range(1, len(points) + 1):
        out, home = tmp_path / f"out-{k}", tmp_path / f"home-{k}"
        killed = _run(command(out), home, ALPHAEDIT_FAULT_AT=str(k))
        assert killed.returncode == -signal.SIGKILL, f"point {k} ({points[k - 1]}) was not reached"
        finished = _run(command(out), home)
        assert finished.returncode == 0, f"rerun after a kill at point {k} ({points[k - 1]}): {finished.stderr[-1500:]}"
        for layer, moment in reference.items():
            assert torch.equal(load_file(str(out / f"layer{layer}.safetensors"))["moment"], moment), f"kill at point {k} ({points[k - 1]})"
        shutil.rmtree(out)
        shutil.rmtree(home)
    record_property("kill_points", ("stats", len(points)))
