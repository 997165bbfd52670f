"""`alphaedit compare`: real eval reports side by side, with the projection's change computed from them."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from alphaedit.cli import app
from conftest import WIKITEXT

DATA = WIKITEXT.parent
COUNTERFACT = DATA / "counterfact" / "counterfact_test.json"


def _eval(model, home, out, *extra):
    result = CliRunner().invoke(app, ["eval", "--model", str(model), "--dataset", f"counterfact:{COUNTERFACT}", "--n", "4", "--batch-size", "2",
                                      "--steps", "3", "--layers", "1-2", "--corpus", str(WIKITEXT), "--tokens", "2000",
                                      "--general", str(DATA / "glue_eval"), "--general-tests", "4", "--general-tasks", "sst2",
                                      "--method", "memit", "--out", str(out), "--json", *extra], env={"ALPHAEDIT_HOME": str(home)})
    assert result.exit_code == 0, result.output[-2000:]


def test_compare_puts_runs_side_by_side_with_the_projections_change(tiny_model_folder, tmp_path):
    home = tmp_path / "home"
    _eval(tiny_model_folder, home, tmp_path / "plain", "--no-project")
    _eval(tiny_model_folder, home, tmp_path / "projected", "--project")
    (tmp_path / "begun").mkdir()
    (tmp_path / "begun" / "run.json").write_text(json.dumps({"args": {"n": 4, "batch_size": 2}}))
    runs = [str(tmp_path / name) for name in ("plain", "projected", "begun")]
    result = CliRunner().invoke(app, ["compare", *runs, "--plots", str(tmp_path / "plots"), "--json"], env={"ALPHAEDIT_HOME": str(home)})
    assert result.exit_code == 0, result.output
    table = json.loads(result.output)
    [group] = table["groups"]
    plain, projected = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("plain", "projected"))
    assert group["n"] == 4 and [r["label"] for r in group["runs"]] == [plain["method_label"], projected["method_label"]]
    assert group["pre"]["efficacy"] == plain["pre"]["efficacy"]
    [gain] = group["projection_gains"]
    assert gain["method"] == "memit"
    for key in ("efficacy", "specificity", "generative_success"):
        assert gain["metrics"][key] == projected["post"][key] - plain["post"][key]
    growth = max(g["frobenius"] for g in projected["monitor"][-1]["weight_growth"].values())
    assert group["runs"][1]["metrics"]["weight_growth"] == growth > 1.0
    label_f1 = 100 * projected["general"][-1]["scores"]["sst2"]["f1_label"]
    assert group["runs"][1]["metrics"]["general_f1_label"] == label_f1
    assert table["unfinished"] == [f"{runs[2]}: not finished (in its pre-edit evaluation; continue it with `alphaedit eval --resume {runs[2]}`)"]
    assert sorted(p.split("/")[-1] for p in table["plots"]) == ["general_f1.png", "general_f1_label.png", "weight_growth.png"]
    assert all((tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG" for name in ("general_f1.png", "weight_growth.png"))

    text = CliRunner().invoke(app, ["compare", *runs[:2]], env={"ALPHAEDIT_HOME": str(home)}).output
    assert "| pre-edit |" in text and "| *memit: projection's change* |" in text and f"| {plain['method_label']} |" in text

    wrong = CliRunner().invoke(app, ["compare", str(tmp_path / "plots")], env={"ALPHAEDIT_HOME": str(home)})
    assert wrong.exit_code == 2 and "no summary.json or run.json there" in " ".join(wrong.output.split())
