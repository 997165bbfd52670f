"""`alphaedit eval` as a resumable long run: killed with SIGKILL at its commit points, continued with
`--resume`, it ends with the numbers of an uninterrupted run; and its options are checked up front."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from conftest import WIKITEXT
from test_faults import _commit_points, _run

DATA = WIKITEXT.parent
COUNTERFACT = DATA / "counterfact" / "counterfact_test.json"
GLUE = DATA / "glue_eval"
MEASURED = ("pre", "post", "curve", "norms", "general", "n", "batches", "projector_rank")


def _command(model: Path, out: Path) -> list[str]:
    return ["eval", "--model", str(model), "--dataset", f"counterfact:{COUNTERFACT}", "--n", "6", "--batch-size", "2", "--every", "1",
            "--steps", "3", "--layers", "1-2", "--corpus", str(WIKITEXT), "--tokens", "2000", "--general", str(GLUE),
            "--general-every", "2", "--general-tests", "4", "--general-tasks", "sst2,rte", "--out", str(out), "--json"]


def test_eval_killed_at_its_commit_points_resumes_to_the_uninterrupted_numbers(tiny_model_folder, tmp_path, record_property):
    points = _commit_points(_command(tiny_model_folder, tmp_path / "reference"), tmp_path / "home-reference", tmp_path / "points.log")
    reference = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert [p["edits"] for p in reference["general"]] == [0, 4, 6]  # before, every 2 batches, after the last
    assert [p["edits"] for p in reference["curve"]] == [0, 2, 4, 6]
    assert set(reference["general"][0]["scores"]) == {"sst2", "rte"}
    assert reference["norms"][-1]["1"] != reference["norms"][0]["1"]  # the weights moved
    # one kill in each kind of commit: statistics, general rows, journal, the progress after a batch, report
    kinds: dict[str, int] = {}
    for k, point in enumerate(points, start=1):
        name = Path(point.split("\t")[1]).name
        kind = "journal" if "/state/" in point else "general" if "/general/" in point else "statistics" if name.startswith("layer") else name.split(".")[0]
        if kind == "progress" and "journal" in kinds:
            kind = "progress after a batch"  # killed between the journal's commit and the batch's measurements
        kinds.setdefault(kind, k)
    targets = sorted(kinds[k] for k in ("statistics", "general", "journal", "progress after a batch", "summary"))
    for k in targets:
        out, home = tmp_path / f"out-{k}", tmp_path / f"home-{k}"
        killed = _run(_command(tiny_model_folder, out), home, ALPHAEDIT_FAULT_AT=str(k))
        assert killed.returncode == -signal.SIGKILL, f"point {k} ({points[k - 1]}) was not reached: {killed.stderr[-500:]}"
        progress = out / "progress.json"
        batches_left = progress.exists() and json.loads(progress.read_text())["batches"] < 3
        resumed = _run(["eval", "--resume", str(out), "--json"], home)
        assert resumed.returncode == 0, f"resume after a kill at point {k} ({points[k - 1]}): {resumed.stderr[-1500:]}"
        summary = json.loads((out / "summary.json").read_text())
        for key in MEASURED:
            assert summary[key] == reference[key], f"{key} after a kill at point {k} ({points[k - 1]})"
        if batches_left:
            assert "edits · ETA" in resumed.stderr  # a progress line per batch: edits, ETA, latest metrics
            # the evaluations' phases, each announced and timed; the ETA counts the final evaluation
            # at the pace of the evaluation after a batch (--every 1)
            assert "for the final evaluation" in resumed.stderr
            assert "general check (2 tasks, 4 records each" in resumed.stderr
        assert "final evaluation, after 6 edits" in resumed.stderr and "teacher-forced scores (6 records" in resumed.stderr
        assert "generative success: done in" in resumed.stderr
    record_property("kill_points", ("eval", len(targets)))


def _cli(tiny_model_folder, home, *extra: str):
    from typer.testing import CliRunner

    from alphaedit.cli import app

    return CliRunner().invoke(app, ["eval", "--model", str(tiny_model_folder), *extra], env={"ALPHAEDIT_HOME": str(home)})


def test_resume_refuses_new_settings_and_a_run_folder_is_not_overwritten(tiny_model_folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"args": {}}))
    taken = _cli(tiny_model_folder, tmp_path, "--dataset", f"counterfact:{COUNTERFACT}", "--out", str(out))
    assert taken.exit_code == 2 and f"continue it with --resume {out}" in taken.output
    changed = _cli(tiny_model_folder, tmp_path, "--resume", str(out), "--n", "8")
    assert changed.exit_code == 2 and "leave out --model, --n" in changed.output
    missing = _cli(tiny_model_folder, tmp_path, "--resume", str(tmp_path / "nowhere"))
    assert missing.exit_code == 2 and "no readable run.json" in missing.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--general-every", "2"], "need --general DIR"),
        (["--general", "{glue}", "--general-tasks", "sst2,squad"], "unknown task 'squad'"),
        (["--general", "{empty}"], "sst2.jsonl is missing"),
    ],
)
def test_general_options_are_checked_before_anything_runs(tiny_model_folder, tmp_path, extra, message):
    (tmp_path / "empty").mkdir()
    extra = [e.format(glue=GLUE, empty=tmp_path / "empty") for e in extra]
    out = tmp_path / "out"
    result = _cli(tiny_model_folder, tmp_path, "--dataset", f"counterfact:{COUNTERFACT}", "--out", str(out), *extra)
    assert result.exit_code == 2 and message in result.output
    assert not out.exists()  # nothing written
