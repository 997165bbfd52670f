"""Property-based fuzzing of the request parser: whatever comes in, a clean refusal or valid requests."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alphaedit.requests import PLACEHOLDER, EditRequest, RequestError, load_requests, parse_requests

FIELDS = ["prompt", "subject", "target_new", "target_true", "case_id", "requested_rewrite", "src", "answers", "alt",
          "rephrase_prompt", "str", "requests"]
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12) | st.sampled_from(
    ["{}", "{} is in", "Paris", "{} {}", "", " ", "<|endoftext|>", "{", "}"])
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), children, max_size=5),
    max_leaves=20,
)
# records close to valid ones, so the fuzzing reaches past the first type check
near_records = st.fixed_dictionaries(
    {"prompt": st.sampled_from(["{} is in", "{} {}", "no slot", "{} is {", ""]) | st.text(max_size=10),
     "subject": st.sampled_from(["Paris", "", " ", "{}"]) | st.text(max_size=8)},
    optional={"target_new": json_values, "target_true": json_values, "case_id": json_values},
)


def _check(requests: list[EditRequest]) -> None:
    assert requests
    for request in requests:
        assert isinstance(request, EditRequest)
        assert request.prompt.count(PLACEHOLDER) == 1
        assert isinstance(request.subject, str) and request.subject.strip()
        assert isinstance(request.target_new, str) and request.target_new.strip()
        assert request.target_true is None or (isinstance(request.target_true, str) and request.target_true.strip() != request.target_new.strip())
        assert request.case_id is None or isinstance(request.case_id, (int, str)) and not isinstance(request.case_id, bool)
        assert request.text()  # usable


@settings(max_examples=300, deadline=None)
@given(st.lists(json_values | near_records, max_size=4) | json_values)
def test_any_json_is_refused_cleanly_or_parsed_into_valid_requests(data):
    try:
        requests = parse_requests(data if isinstance(data, list) else [data])
    except RequestError as e:
        assert str(e) and "\n" not in str(e)
        return
    _check(requests)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.lists(json_values | near_records, max_size=3).map(lambda v: json.dumps(v).encode()))
def test_any_bytes_in_a_file_are_refused_cleanly_or_parsed(tmp_path, raw):
    path = tmp_path / "requests.json"
    path.write_bytes(raw)
    try:
        requests = load_requests(path)
    except RequestError as e:
        assert str(path) in str(e) or "requests" in str(e)
        return
    _check(requests)
