"""Evaluation datasets: every local format, selection, and the one-time download."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import pytest

from alphaedit.eval.datasets import load_dataset, select

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_counterfact_rome_format():
    records = load_dataset(f"counterfact:{DATA / 'counterfact' / 'counterfact_test.json'}")
    first = records[0]
    assert len(records) == 2191 and first.kind == "counterfact"
    assert first.request.text() == "Angola is located in" and first.request.target_new == "Antarctica"
    assert len(first.paraphrases) == 2 and len(first.neighbourhood) == 10 and len(first.generation_prompts) == 10
    assert all(t.endswith(" Antarctica.") for t in first.reference_texts)


def test_counterfact_easyedit_flat_format():
    records = load_dataset(f"counterfact:{DATA / 'counterfact_easyedit' / 'counterfact-val.json'}")
    assert records[0].request.prompt.count("{}") == 1 and records[0].paraphrases and records[0].neighbourhood_answers


def test_zsre_mend_format_follows_the_reference_loader():
    raw = json.loads((DATA / "zsre" / "zsre_mend_eval_portability_gpt4.json").read_text())
    records = load_dataset(f"zsre:{DATA / 'zsre' / 'zsre_mend_eval_portability_gpt4.json'}")
    assert records[0].kind == "zsre" and records[0].request.target_new == raw[0]["answers"][0]
    assert records[0].neighbourhood == [raw[0]["loc"] + "?"] and records[0].neighbourhood_answers == [raw[0]["loc_ans"]]


def test_knowedit_format_skips_records_whose_prompt_lacks_the_subject():
    skipped: list[str] = []
    records = load_dataset(f"knowedit:{DATA / 'knowedit' / 'ZsRE-test-all.json'}", skipped)
    assert records[0].request.target_new == "Noctuidae" and records[0].neighbourhood_answers == ["genus", "genus"]
    assert skipped and all("record" in message and "subject" in message for message in skipped)
    assert len(records) + len(skipped) == 1304


def test_selection_is_first_n_or_seeded():
    records = load_dataset(f"zsre:{DATA / 'zsre' / 'zsre_mend_eval_portability_gpt4.json'}")
    assert [r.case_id for r in select(records, 3, None)] == [0, 1, 2]
    assert [r.case_id for r in select(records, 5, 7)] == [r.case_id for r in select(records, 5, 7)]
    assert [r.case_id for r in select(records, 5, 7)] != [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="has 1037"):
        select(records, 5000, None)


def test_bad_specs_are_clear():
    with pytest.raises(ValueError, match="counterfact"):
        load_dataset("wikidata:x.json")
    with pytest.raises(ValueError, match="not a file"):
        load_dataset("zsre:/nonexistent.json")


def test_a_public_dataset_is_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    source = json.loads((DATA / "zsre" / "zsre_mend_eval_portability_gpt4.json").read_text())[:3]
    (served / "zsre_mend_eval.json").write_text(json.dumps(source))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ALPHAEDIT_DATA_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        assert len(load_dataset("zsre")) == 3
    finally:
        server.shutdown()
        server.server_close()
    assert (tmp_path / "home" / "data" / "zsre_mend_eval.json").exists()
    assert len(load_dataset("zsre")) == 3  # from the cache: the server is gone
    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "other-home"))
    with pytest.raises(ValueError, match="could not download"):
        load_dataset("zsre")


def test_several_files_chain_into_one_stream_without_repeated_subject_and_prompt(tmp_path):
    """EasyEdit's CounterFact edit + train files as one long sequence (issue 14): a record whose
    subject and prompt an earlier one already edited is left out and reported, not fatal."""
    import json as _json

    from alphaedit.eval.datasets import load_dataset as load

    first = [{"case_id": 1, "prompt": "The twin city of Tirana is", "subject": "Tirana", "target_new": "Shanghai", "ground_truth": "Athens"},
             {"case_id": 2, "prompt": "Toko Yasuda, the", "subject": "Toko Yasuda", "target_new": "piano", "ground_truth": "guitar"}]
    second = [{"case_id": 3, "prompt": "The twin city of Tirana is", "subject": "Tirana", "target_new": "Hamburg", "ground_truth": "Athens"},
              {"case_id": 4, "prompt": "Toko Yasuda, the", "subject": "Toko Yasuda", "target_new": "piano", "ground_truth": "guitar"},
              {"case_id": 5, "prompt": "BBC One, by", "subject": "BBC One", "target_new": "Sega", "ground_truth": "BBC"}]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(_json.dumps(first))
    b.write_text(_json.dumps(second))
    skipped: list[str] = []
    records = load(f"counterfact:{a},{b}", skipped)
    assert [r.case_id for r in records] == [1, 2, 5]
    assert "case_id 3" in skipped[0] and "contradicts case_id 1" in skipped[0] and "'Shanghai'" in skipped[0]
    assert "case_id 4" in skipped[1] and "repeats case_id 2" in skipped[1]
    with pytest.warns(UserWarning, match="2 records of the stream left out"):
        assert len(load(f"counterfact:{a},{b}")) == 3
    assert len(load(f"counterfact:{a}", [])) == 2  # one file: as published


def _one_file_of_each_kind(folder: Path) -> tuple[Path, Path]:
    """A CounterFact file and a zsRE file of one record each."""
    cf, zsre = folder / "cf.json", folder / "zsre.json"
    cf.write_text(json.dumps([{"case_id": 1, "prompt": "The twin city of Tirana is", "subject": "Tirana", "target_new": "Shanghai",
                                "ground_truth": "Athens"}]))
    zsre.write_text(json.dumps([{"subject": "Tirana", "src": "Which city is twinned with Tirana?", "rephrase": "Tirana's twin?",
                                  "answers": ["Athens"], "alt": "x", "loc": "nq question: who?", "loc_ans": "y"}]))
    return cf, zsre


def test_a_stream_mixing_counterfact_and_zsre_records_is_refused_naming_the_files(tmp_path):
    from alphaedit.eval.datasets import load_dataset as load

    cf, zsre = _one_file_of_each_kind(tmp_path)
    with pytest.raises(ValueError, match=r"counterfact records from .*cf\.json, zsre records from .*zsre\.json; evaluate them as separate"):
        load(f"counterfact:{cf},{zsre}")


def test_the_evaluator_refuses_records_of_two_kinds(tmp_path):
    """The same rule where the scorer is chosen, for records built without the loader."""
    from alphaedit.eval.datasets import load_dataset as load
    from alphaedit.eval.evaluator import EvalSettings, Evaluator

    cf, zsre = _one_file_of_each_kind(tmp_path)
    records = load(f"counterfact:{cf}") + load(f"zsre:{zsre}")
    with pytest.raises(ValueError, match="records of one kind only, not counterfact and zsre"):
        Evaluator(None, None, records, EvalSettings())
    assert Evaluator(None, None, records[1:], EvalSettings()).kind == "zsre"


def test_the_final_evaluations_estimate_scales_a_sampled_phase_to_all_records(tmp_path):
    """A curve point over a sample times its per-record phases; the ETA of the final evaluation
    (all records) scales them, and the next phase's announced estimate is for its own size."""
    import time

    from alphaedit.eval.datasets import load_dataset as load
    from alphaedit.eval.evaluator import EvalSettings, Evaluator

    cf = tmp_path / "cf.json"
    cf.write_text(json.dumps([{"case_id": k, "prompt": "The twin city of {} is", "subject": f"Town {k}", "target_new": "Shanghai",
                                "ground_truth": "Athens"} for k in range(10)]))
    heard: list[str] = []
    evaluator = Evaluator(None, None, load(f"counterfact:{cf}"), EvalSettings(), on_phase=heard.append)
    with evaluator.phase("teacher-forced scores", "2 records", 2):
        time.sleep(0.2)
    with evaluator.phase("perplexity", "1 window"):  # not per record: counted as it took
        time.sleep(0.1)
    took = evaluator.took
    assert evaluator.evaluation_seconds() == pytest.approx(took["teacher-forced scores"] * 5 + took["perplexity"])
    with evaluator.phase("teacher-forced scores", "4 records", 4):
        pass
    assert "about" in heard[-2] and "at the last pace" in heard[-2]


def test_the_easyedit_counterfact_files_make_a_stream_of_over_18000_edits():
    from alphaedit.eval.datasets import load_dataset as load

    folder = Path(__file__).resolve().parents[3] / "shared" / "data" / "counterfact_easyedit"
    skipped: list[str] = []
    records = load(f"counterfact:{folder / 'counterfact-edit.json'},{folder / 'counterfact-train.json'}", skipped)
    assert len(records) + len(skipped) == 9514 + 9493 and len(records) > 18_000
    assert len({(r.request.subject, r.request.prompt) for r in records}) == len(records)
