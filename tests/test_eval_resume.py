"""`alphaedit eval` as a resumable long run: killed with SIGKILL at its commit points, continued with
`--resume`, it ends with the numbers of an uninterrupted run; and its options are checked up front."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alphaedit.cli import app
from conftest import WIKITEXT
from test_faults import _commit_points, _run

DATA = WIKITEXT.parent
COUNTERFACT = DATA / "counterfact" / "counterfact_test.json"
GLUE = DATA / "glue_eval"
MEASURED = ("pre", "post", "curve", "norms", "general", "n", "batches", "projector_rank")


def _command(model: Path, out: Path, n: int = 6) -> list[str]:
    return ["eval", "--model", str(model), "--dataset", f"counterfact:{COUNTERFACT}", "--n", str(n), "--batch-size", "2", "--every", "1",
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


def test_a_finished_run_grown_to_more_records_ends_where_a_run_started_with_them_ends(tiny_model_folder, tmp_path):
    """`eval --resume DIR --n M`: a finished 4-record run (2 batches) goes on to 6 records. It scores
    the 2 new records on the unedited model, keeps its earlier report, takes the curve point after
    batch 2 that only the longer schedule calls for, and ends with the numbers of a 6-record run."""
    reference = _run(_command(tiny_model_folder, tmp_path / "reference"), tmp_path / "home")
    assert reference.returncode == 0, reference.stderr[-2000:]
    reference = json.loads((tmp_path / "reference" / "summary.json").read_text())
    out = tmp_path / "grown"
    short = _run(_command(tiny_model_folder, out, n=4), tmp_path / "home")
    assert short.returncode == 0, short.stderr[-2000:]
    earlier = json.loads((out / "summary.json").read_text())
    assert [p["edits"] for p in earlier["curve"]] == [0, 2, 4] and earlier["n"] == 4
    # as if begun by a version before these options: each takes its default on resuming
    run_json = json.loads((out / "run.json").read_text())
    newer = ("curve_of", "curve_sample", "chat", "chat_values", "chat_eval", "chat_max_tokens", "chat_neighbours", "chat_judge", "consistency",
             "sampling", "stop_most_probable", "anchor_values", "pre_cache")
    (out / "run.json").write_text(json.dumps({**run_json, "args": {k: v for k, v in run_json["args"].items() if k not in newer}}))

    grown = _run(["eval", "--resume", str(out), "--n", "6", "--json"], tmp_path / "home")
    assert grown.returncode == 0, grown.stderr[-2000:]
    assert "pre-edit evaluation of the 2 records the run grew by" in grown.stderr
    assert "evaluation after 4 edits" in grown.stderr  # the curve point a 4-record run had as its final evaluation
    summary = json.loads((out / "summary.json").read_text())
    for key in ("post", "norms", "general", "n", "batches", "projector_rank"):
        assert summary[key] == reference[key], key
    # the curve from 4 edits on is the 6-record run's; the point after batch 1 stays a mean over the 4 records the run had then
    assert summary["curve"][2:] == reference["curve"][2:]
    assert summary["curve"][1] == {**earlier["curve"][1], "records": 4}
    # the new records' pre-edit rows come from their own evaluation (other batch shapes than the
    # reference's single one): equal to float32 rounding
    assert summary["pre"].keys() == reference["pre"].keys()
    for metric, value in reference["pre"].items():
        assert (summary["pre"][metric] is None) if value is None else summary["pre"][metric] == pytest.approx(value, abs=1e-4), metric
    pre_rows = [json.loads(line)["pre"] for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(pre_rows) == 6
    assert json.loads((out / "at-4-edits" / "summary.json").read_text()) == earlier  # the earlier report, kept
    assert (out / "at-4-edits" / "records.jsonl").exists() and (out / "at-4-edits" / "summary.md").exists()
    assert any("grown from 4 to 6 records" in note and "at-4-edits" in note for note in summary["notes"])
    assert json.loads((out / "run.json").read_text())["args"]["n"] == 6

    again = _run(["eval", "--resume", str(out), "--json"], tmp_path / "home")  # resumed once more: nothing left to do
    assert again.returncode == 0 and json.loads((out / "summary.json").read_text())["post"] == reference["post"]
    assert (out / "at-4-edits" / "summary.json").exists() and "pre-edit evaluation of the" not in again.stderr


def test_a_run_grows_only_into_the_same_sequence_of_batches(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    args = {"n": 5, "batch_size": 2, "select_seed": None}
    (out / "run.json").write_text(json.dumps({"args": args}))
    shrink = CliRunner().invoke(app, ["eval", "--resume", str(out), "--n", "4"], env={"ALPHAEDIT_HOME": str(tmp_path)})
    assert shrink.exit_code == 2 and "--n can only grow a run" in " ".join(shrink.output.split())
    partial = CliRunner().invoke(app, ["eval", "--resume", str(out), "--n", "8"], env={"ALPHAEDIT_HOME": str(tmp_path)})
    assert partial.exit_code == 2 and "ended with a partial batch" in " ".join(partial.output.split())
    (out / "run.json").write_text(json.dumps({"args": {**args, "n": 4, "select_seed": 3}}))
    drawn = CliRunner().invoke(app, ["eval", "--resume", str(out), "--n", "8"], env={"ALPHAEDIT_HOME": str(tmp_path)})
    assert drawn.exit_code == 2 and "--select-seed 3" in " ".join(drawn.output.split())
    assert json.loads((out / "run.json").read_text())["args"]["n"] == 4  # nothing changed


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
    assert changed.exit_code == 2 and "leave out --model (--n may be given" in changed.output
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


def test_a_curve_of_the_edited_records_equals_a_shorter_runs_final_evaluation(tiny_model_folder, tmp_path):
    """--curve-of edited: the point after k batches is the mean over the records edited so far, the
    same numbers a run of only those records ends with; --curve-sample spreads a smaller sample."""
    def command(out: Path, n: int, *extra: str) -> list[str]:
        return ["eval", "--model", str(tiny_model_folder), "--dataset", f"counterfact:{COUNTERFACT}", "--n", str(n), "--batch-size", "2",
                "--steps", "3", "--layers", "1-2", "--corpus", str(WIKITEXT), "--tokens", "2000", "--out", str(out), "--json", *extra]

    runs = {name: _run(command(tmp_path / name, n, *extra), tmp_path / "home") for name, n, extra in [
        ("edited", 6, ("--every", "1", "--curve-of", "edited")),
        ("sampled", 6, ("--every", "1", "--curve-of", "edited", "--curve-sample", "2")),
        ("four", 4, ()),
    ]}
    for name, result in runs.items():
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
    edited, sampled, four = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("edited", "sampled", "four"))
    metrics = ("efficacy", "generalization", "specificity", "generative_success")
    assert [(p["edits"], p.get("records")) for p in edited["curve"]] == [(0, None), (2, 2), (4, 4), (6, None)]
    assert edited["curve"][2]["of"] == "edited"
    for m in metrics:  # after 4 edits, over the 4 edited records: what the 4-record run ends with
        assert edited["curve"][2][m] == pytest.approx(four["post"][m], abs=1e-6), m
    assert edited["post"] == sampled["post"]  # the sample changes what is measured along the way, not the run
    assert [(p["edits"], p.get("records")) for p in sampled["curve"]] == [(0, None), (2, 2), (4, 2), (6, None)]
    assert sampled["curve"][1] == edited["curve"][1]  # 2 of 2 edited records: the same point
    assert "| 4 |" in (tmp_path / "edited" / "summary.md").read_text() and "4 edited |" in (tmp_path / "edited" / "summary.md").read_text()
    assert any("the records edited so far, at most 2" in note for note in sampled["notes"])

    refused = _cli(tiny_model_folder, tmp_path, "--dataset", f"counterfact:{COUNTERFACT}", "--out", str(tmp_path / "x"), "--curve-of", "edited")
    assert refused.exit_code == 2 and "give --every K too" in refused.output and not (tmp_path / "x").exists()


def test_a_curve_sample_is_spread_over_the_records_it_stands_for():
    from alphaedit.eval.protocol import Schedule

    assert Schedule(10, 1).curve_records(300, 1000) is None  # all records, as the paper's figures
    assert Schedule(10, 1, curve_of="edited").curve_records(300, 1000) == list(range(300))
    assert Schedule(10, 1, curve_of="edited", curve_sample=4).curve_records(300, 1000) == [0, 75, 150, 225]
    assert Schedule(10, 1, curve_sample=4).curve_records(300, 1000) == [0, 250, 500, 750]
    assert Schedule(10, 1, curve_of="edited", curve_sample=400).curve_records(300, 1000) == list(range(300))
    with pytest.raises(ValueError, match="curve_of must be one of all, edited"):
        Schedule(10, 1, curve_of="some")
