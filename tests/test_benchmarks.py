"""The benchmarks' random-model paths (the ones meant for a GPU) run end to end on a tiny shape.

They are not exercised anywhere else before a GPU is lent, so a renamed API would otherwise
only show up on the device, where time is scarce.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import WIKITEXT

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
COUNTERFACT = WIKITEXT.parent / "counterfact" / "counterfact_test.json"


def _json_only(stdout: str) -> dict:
    """Under --json a benchmark prints one JSON document and nothing else (no table after it)."""
    return json.loads(stdout)


def _run(*args: str, home: Path) -> dict:
    done = subprocess.run([sys.executable, *args, "--json"], capture_output=True, text=True, timeout=600,
                          env={"ALPHAEDIT_HOME": str(home), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return _json_only(done.stdout)


def test_edit_speed_random_model_path(tiny_model_folder, tmp_path):
    result = _run(str(BENCHMARKS / "edit_speed.py"), "--shape", "tiny", "--edits", "4", "--sequential-edits", "2",
                  "--steps", "2", "--requests", str(COUNTERFACT), "--corpus", str(WIKITEXT), "--corpus-tokens", "2000",
                  "--tokenizer", str(tiny_model_folder), home=tmp_path)
    assert [p["edits"] for p in result["paths"]] == [4, 4, 2, 2]
    assert [p["dtype"] for p in result["paths"]] == ["bfloat16", "bfloat16", "float32", "float32"]
    assert all(set(p["phase_s_per_edit"]) == {"z", "keys", "solve", "check"} for p in result["paths"])
    assert result["batched_s_per_edit"] > 0 and result["sequential_s_per_edit"] > 0


def test_stats_speed_random_model_path(tmp_path):
    result = _run(str(BENCHMARKS / "stats_speed.py"), "--shape", "tiny", "--tokens", "4096", home=tmp_path)
    assert result["layers"] == [4, 5, 6, 7, 8] and result["one_pass_tokens_per_s"] > 0


def test_general_check_benchmark_runs_and_both_label_paths_agree(tiny_model_folder, tmp_path):
    result = _run(str(BENCHMARKS / "general_check.py"), "--model", str(tiny_model_folder), "--tests", "3", home=tmp_path)
    assert result["scores_agree"] and set(result["scores"]) == {"sst2", "mrpc", "cola", "rte", "mmlu", "nli"}
    assert result["seconds_first_step_labels"] > 0 and result["seconds_teacher_forced_labels"] > 0
