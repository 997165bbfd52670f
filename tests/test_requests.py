"""Tests for alphaedit.requests: formats, validation messages, file loading, real datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alphaedit.requests import EditRequest, RequestError, check_conflicts, load_requests, parse_requests

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COUNTERFACT = DATA / "counterfact" / "counterfact_test.json"
EASYEDIT = DATA / "counterfact_easyedit" / "counterfact-edit.json"
ZSRE = DATA / "zsre" / "zsre_mend_eval_portability_gpt4.json"

DARRIEUX = EditRequest(
    prompt="The mother tongue of {} is",
    subject="Danielle Darrieux",
    target_new="English",
    target_true="French",
    case_id=0,
)


def memit(**overrides):
    record = {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}}
    record.update(overrides)
    return record


def error_for(records, source="<input>") -> str:
    with pytest.raises(RequestError) as info:
        parse_requests(records, source)
    return str(info.value)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- formats


def test_counterfact_record():
    record = {
        "case_id": 0,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
        },
        "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    }
    assert parse_requests([record]) == [DARRIEUX]


def test_memit_record_with_object_and_plain_targets():
    a, b = parse_requests([memit(), memit(subject="Serena Williams", target_new="golf", target_true="tennis", case_id="x1")])
    assert a == EditRequest("{} plays the sport of", "LeBron James", "football")
    assert b == EditRequest("{} plays the sport of", "Serena Williams", "golf", "tennis", "x1")


def test_easyedit_record_first_occurrence_of_subject_becomes_placeholder():
    record = {
        "case_id": 0,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "ground_truth": "French",
        "rephrase_prompt": "Danielle Darrieux, a native",
        "locality_prompt": "The mother tongue of Léon Blum is",
    }
    assert parse_requests([record]) == [DARRIEUX]
    (twice,) = parse_requests([{"prompt": "Paris, not Paris, is in", "subject": "Paris", "target_new": "Italy"}])
    assert twice.prompt == "{}, not Paris, is in"
    assert twice.text() == "Paris, not Paris, is in"


@pytest.mark.parametrize(
    "ground_truth, expected",
    [(["French", "Occitan"], "French"), ([], None), ("", None), ("<|endoftext|>", None), (None, None)],
)
def test_easyedit_ground_truth_forms(ground_truth, expected):
    record = {"prompt": "Danielle Darrieux speaks", "subject": "Danielle Darrieux", "target_new": "English"}
    record["ground_truth"] = ground_truth
    assert parse_requests([record])[0].target_true == expected


def test_placeholder_true_target_in_memit_form_is_none():
    assert parse_requests([memit(target_true={"str": "<|endoftext|>"})])[0].target_true is None


def test_zsre_record_uses_alt_as_new_target():
    record = {
        "subject": "IAAF Combined Events Challenge",
        "src": "When was the inception of IAAF Combined Events Challenge?",
        "alt": "2006",
        "answers": ["1998"],
        "pred": "2011",
    }
    (request,) = parse_requests([record])
    assert request == EditRequest("When was the inception of {}?", "IAAF Combined Events Challenge", "2006", "1998")
    del record["alt"]
    assert parse_requests([record])[0].target_new == "1998"


def test_mixed_formats_in_one_batch():
    records = [memit(), {"prompt": "Paris is in", "subject": "Paris", "target_new": "Italy"}]
    assert [r.subject for r in parse_requests(records)] == ["LeBron James", "Paris"]


# ---------------------------------------------------------------- EditRequest


def test_text_does_not_interpret_braces():
    request = EditRequest(prompt="In {}, {x} is", subject="a{0}b{}", target_new="y")
    assert request.text() == "In a{0}b{}, {x} is"


def test_target_new_is_stored_as_given():
    assert parse_requests([memit(target_new=" football")])[0].target_new == " football"


@pytest.mark.parametrize(
    "request_",
    [
        DARRIEUX,
        EditRequest("{} plays", "LeBron James", "football"),
        EditRequest("{} plays", "X", "y", case_id="abc"),
        EditRequest("a {} b", "{weird}", " lead space", target_true=" t"),
    ],
)
def test_to_dict_round_trips(request_):
    record = request_.to_dict()
    assert record["target_new"] == {"str": request_.target_new}
    assert ("target_true" in record) == (request_.target_true is not None)
    assert ("case_id" in record) == (request_.case_id is not None)
    assert parse_requests([json.loads(json.dumps(record))]) == [request_]


def test_edit_request_is_frozen():
    with pytest.raises(AttributeError):
        DARRIEUX.subject = "other"  # type: ignore[misc]


# ---------------------------------------------------------------- rejections


def test_message_names_source_record_case_id_field_and_fix():
    records = [memit(), memit(subject="Tiger Woods"), {"case_id": 17, "prompt": "The capital is", "subject": "Paris", "target_new": "Rome"}]
    assert error_for(records, "requests.json") == (
        "requests.json, record 3 (case_id 17): field 'prompt' has no '{}' and does not contain the subject 'Paris'"
        " — put '{}' where the subject goes, or write the subject literally in the prompt"
    )


def test_several_placeholders():
    message = error_for([memit(prompt="{} and {} play")])
    assert "<input>, record 1: field 'prompt' has 2 '{}' placeholders" in message
    assert "keep exactly one '{}'" in message


@pytest.mark.parametrize("subject", [None, "", "   "])
def test_subject_missing_or_blank(subject):
    record = memit()
    if subject is None:
        del record["subject"]
    else:
        record["subject"] = subject
    message = error_for([record])
    assert "record 1: field 'subject' is" in message
    assert "— " in message and "subject" in message.split("— ")[1]


@pytest.mark.parametrize("target", ["missing", "", "  ", {"str": ""}, {"str": " "}, None])
def test_target_new_missing_or_blank(target):
    record = memit()
    if target == "missing":
        del record["target_new"]
    else:
        record["target_new"] = target
    message = error_for([record])
    assert "record 1: field 'target_new" in message
    assert "is missing" in message or "is empty" in message
    assert "the text the model should produce after the edit" in message


@pytest.mark.parametrize(
    "overrides, field, got",
    [
        ({"subject": 5}, "'subject'", "int 5"),
        ({"target_new": {"str": 3}}, "'target_new.str'", "int 3"),
        ({"target_new": ["football"]}, "'target_new'", "list"),
        ({"prompt": ["{} plays"]}, "'prompt'", "list"),
        ({"target_true": {"str": 1.5}}, "'target_true.str'", "float 1.5"),
        ({"case_id": 1.5}, "'case_id'", "float 1.5"),
        ({"case_id": True}, "'case_id'", "bool True"),
    ],
)
def test_wrong_types(overrides, field, got):
    message = error_for([memit(), memit(**overrides)])
    assert "record 2" in message and f"field {field} must be" in message and got in message
    assert " — " in message


def test_target_object_without_str_key():
    message = error_for([memit(target_new={"id": "Q1"})])
    assert "field 'target_new' is an object without a 'str' key" in message


def test_counterfact_field_paths_in_messages():
    record = {"case_id": 9, "requested_rewrite": {"prompt": "{} is in", "subject": "", "target_new": {"str": "x"}}}
    assert "record 1 (case_id 9): field 'requested_rewrite.subject' is empty" in error_for([record])
    record = {"case_id": 9, "requested_rewrite": "oops"}
    assert "field 'requested_rewrite' is a str, not an object" in error_for([record])


def test_record_not_an_object():
    message = error_for([memit(), ["not", "a", "dict"]], "r.json")
    assert message.startswith("r.json, record 2: is a list, not a JSON object — each request must be an object")


def test_empty_input():
    assert error_for([]) == (
        "<input> has no requests — add at least one record with prompt, subject and target_new"
    )


def test_conflicting_duplicates_name_both_records():
    records = [
        memit(case_id=4),
        memit(subject="Tiger Woods"),
        {"case_id": 9, "prompt": "LeBron James plays the sport of", "subject": "LeBron James", "target_new": "golf"},
    ]
    message = error_for(records, "batch.json")
    assert message.startswith("batch.json, record 1 (case_id 4) and record 3 (case_id 9): field 'target_new' differs")
    assert "'football' vs 'golf'" in message and "keep only one of them" in message
    assert len(parse_requests(records, allow_conflicts=True)) == 3


def test_identical_duplicates_are_kept():
    records = [memit(), memit(target_new=" football"), memit()]
    assert len(parse_requests(records)) == 3


def test_check_conflicts_on_built_requests():
    a = EditRequest("{} is in", "Paris", "Italy", case_id=1)
    check_conflicts([a, a])
    with pytest.raises(RequestError, match=r"record 1 \(case_id 1\) and record 2: field 'target_new'"):
        check_conflicts([a, EditRequest("{} is in", "Paris", "Spain")])


def test_parse_accepts_any_iterable():
    assert len(parse_requests(r for r in [memit()])) == 1


# ---------------------------------------------------------------- files


def test_load_json_list_single_object_and_wrapper(tmp_path):
    for i, data in enumerate([[memit()], memit(), {"requests": [memit()]}]):
        path = write(tmp_path, f"r{i}.json", json.dumps(data))
        assert load_requests(path) == [EditRequest("{} plays the sport of", "LeBron James", "football")]


def test_load_jsonl_skips_blank_lines_and_names_lines(tmp_path):
    lines = [json.dumps(memit()), "", "   ", json.dumps(memit(subject="Tiger Woods", case_id=8, prompt="x"))]
    path = write(tmp_path, "r.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(RequestError) as info:
        load_requests(path)
    assert str(info.value).startswith(f"{path}, record 2 (line 4, case_id 8): field 'prompt' has no '{{}}'")
    path = write(tmp_path, "ok.jsonl", "\n".join(lines[:3]) + "\n")
    assert len(load_requests(str(path))) == 1


def test_json_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.json", '[\n  {"prompt": "{} is", "subject": "a", "target_new": "b"},\n  {oops}\n]')
    with pytest.raises(RequestError, match=r"bad\.json, line 3, column 4: not valid JSON"):
        load_requests(path)


def test_jsonl_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.jsonl", json.dumps(memit()) + "\n\n" + '{"prompt": "{} is",\n')
    with pytest.raises(RequestError, match=r"bad\.jsonl, line 3, column \d+: not valid JSON .* one complete JSON object"):
        load_requests(path)


def test_other_extension_tries_json_then_jsonl(tmp_path):
    with pytest.warns(UserWarning, match="record 2 repeats record 1 exactly"):
        assert len(load_requests(write(tmp_path, "r.txt", json.dumps([memit(), memit()])))) == 2
    jsonl = json.dumps(memit()) + "\n" + json.dumps(memit(subject="Tiger Woods")) + "\n"
    assert len(load_requests(write(tmp_path, "r.data", jsonl))) == 2
    with pytest.raises(RequestError, match=r"r2\.data, line 2, column \d+: not valid JSON"):
        load_requests(write(tmp_path, "r2.data", json.dumps(memit()) + "\n{broken\n"))
    with pytest.raises(RequestError, match=r"r3, line 1, column \d+: not valid JSON"):
        load_requests(write(tmp_path, "r3", "[{broken"))


def test_one_bad_record_rejects_whole_file(tmp_path):
    records = [memit(subject=f"Player {i}") for i in range(5)]
    records[3]["target_new"] = {"str": ""}
    path = write(tmp_path, "r.json", json.dumps(records))
    with pytest.raises(RequestError, match=r"r\.json, record 4: field 'target_new\.str' is empty"):
        load_requests(path)


@pytest.mark.parametrize("text", ["", "  \n", "[]", '{"requests": []}'])
def test_file_without_requests(tmp_path, text):
    path = write(tmp_path, "empty.json", text)
    with pytest.raises(RequestError, match=r"empty\.json has no requests"):
        load_requests(path)


@pytest.mark.parametrize("text, problem", [("42", "top level is a int"), ('{"requests": {}}', "field 'requests' is a dict")])
def test_bad_top_level(tmp_path, text, problem):
    with pytest.raises(RequestError, match=problem):
        load_requests(write(tmp_path, "r.json", text))


def test_missing_file_and_bom(tmp_path):
    with pytest.raises(RequestError, match=r"nope\.json: cannot read the requests file"):
        load_requests(tmp_path / "nope.json")
    path = tmp_path / "bom.json"
    path.write_text(json.dumps([memit()]), encoding="utf-8-sig")
    assert len(load_requests(path)) == 1


# ---------------------------------------------------------------- real datasets




def test_real_counterfact_all_records_parse():
    requests = load_requests(COUNTERFACT, allow_conflicts=True)
    assert len(requests) == 2191
    raw = json.loads(COUNTERFACT.read_text())
    assert [r.case_id for r in requests] == [rec["case_id"] for rec in raw]
    assert all(r.prompt.count("{}") == 1 and r.target_true for r in requests)
    # Seven "twin city" facts repeat a subject+prompt with another target.
    with pytest.raises(RequestError, match=r"record 275 \(case_id 15913\) and record 589 \(case_id 15554\)"):
        load_requests(COUNTERFACT)


def test_real_easyedit_counterfact_all_records_parse():
    requests = load_requests(EASYEDIT, allow_conflicts=True)
    assert len(requests) == 9514
    raw = json.loads(EASYEDIT.read_text())
    for request, record in zip(requests, raw):
        assert request.text() == record["prompt"]
        assert request.target_true == record["ground_truth"]
    with pytest.raises(RequestError, match=r"field 'target_new' differs"):
        load_requests(EASYEDIT)


def test_real_zsre_all_records_parse():
    requests = load_requests(ZSRE, allow_conflicts=True)
    assert len(requests) == 1037
    assert all(r.prompt.count("{}") == 1 and r.target_new for r in requests)


def test_a_near_miss_of_a_request_field_and_an_exact_repeat_are_said_not_refused(tmp_path):
    path = tmp_path / "edits.jsonl"
    records = [memit(tagret_true="basketball"), memit(subject="Tom Brady", tagret_true="football"),
               memit(questions=["Which sport?"]), memit()]
    path.write_text("\n".join(json.dumps(r) for r in records))
    with pytest.warns(UserWarning) as said:
        requests = load_requests(path)
    messages = [str(w.message) for w in said]
    assert any("record 1 (line 1) (and 1 more records): field 'tagret_true' is not a request field and is ignored; "
               "did you mean 'target_true'?" in m for m in messages)
    assert any("field 'questions'" in m and "'question'" in m for m in messages)
    assert any("record 3 (line 3) repeats record 1 (line 1) exactly (2 repeats in all); both are applied" in m for m in messages)
    assert len(requests) == 4 and requests[0].target_true is None  # nothing refused, the typo ignored


@pytest.mark.parametrize("path", [COUNTERFACT, EASYEDIT, ZSRE])
def test_real_datasets_load_without_a_near_miss_warning(path, recwarn):
    load_requests(path, allow_conflicts=True)
    assert not [w for w in recwarn if "not a request field" in str(w.message)]
