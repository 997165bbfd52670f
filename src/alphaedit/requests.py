"""Edit requests: the facts to write into a model, loaded and validated.

An edit request says "for this prompt about this subject, the model should
now continue with ``target_new``".  Three record formats are accepted and
detected per record, so files from different projects can be mixed:

1. CounterFact (ROME/MEMIT ``counterfact.json`` / ``multi_counterfact.json``);
   only ``case_id`` and ``requested_rewrite`` are read, other fields ignored::

       {"case_id": 0,
        "requested_rewrite": {"prompt": "The mother tongue of {} is",
                              "subject": "Danielle Darrieux",
                              "target_new": {"str": "English", "id": "Q1860"},
                              "target_true": {"str": "French", "id": "Q150"}},
        "paraphrase_prompts": [...], ...}

2. MEMIT request (also what :meth:`EditRequest.to_dict` writes); targets may
   be ``{"str": ...}`` objects or plain strings, ``target_true`` and
   ``case_id`` are optional::

       {"prompt": "{} plays the sport of", "subject": "LeBron James",
        "target_new": {"str": "football"}}

3. EasyEdit flat form: the prompt has no ``{}`` but contains the subject
   literally; its first occurrence becomes ``{}``.  ``ground_truth`` (a
   string, or a list whose first item is used) becomes ``target_true``::

       {"prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux", "target_new": "English",
        "ground_truth": "French", "rephrase_prompt": "...", ...}

Also accepted: MEND zsRE records (``subject``, ``src``, ``alt``,
``answers``), read the way EasyEdit reads them: ``src`` is the prompt,
``alt`` the new target and ``answers[0]`` the true one (without ``alt``,
``answers[0]`` is the new target, as in ROME's zsRE loader).

Any format may add ``question``: the fact asked as a question about the subject
(``"What is the mother tongue of {}?"``, ``{}`` or the subject written literally).
With it, the edit is also written in the tokenizer's chat template, the question as
the user's turn and ``target_new`` as the start of the answer (``EditConfig.chat``).

A true target that is empty or the placeholder ``"<|endoftext|>"`` (ROME
writes it when the true answer is unknown) is stored as ``None``.

Two requests with the same subject and prompt but different new targets
contradict each other (the solver would average them), so a batch holding
both is rejected unless ``allow_conflicts=True``.  Identical duplicates are
harmless and both are kept (:func:`load_requests` warns about them, and about a
field that is a typo of a request field, such as ``tagret_true``).  Real datasets have such conflicts (several
"twin city" facts per city in CounterFact), so loaders for whole datasets
pass ``allow_conflicts=True`` and call :func:`check_conflicts` per batch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EditRequest",
    "RequestError",
    "check_conflicts",
    "load_requests",
    "parse_requests",
]

PLACEHOLDER = "{}"
GOLD_ANSWER_FIELDS = ("answers", "ground_truth")  # a dataset's true answer, not a claim about the model
_NO_ANSWER = "<|endoftext|>"
_MISSING = object()
# the fields a request is read from (formats 2 and 3, and CounterFact's requested_rewrite); a
# record's other fields are the dataset's own and are ignored, unless one is a near miss of these
REQUEST_FIELDS = ("prompt", "subject", "target_new", "target_true", "ground_truth", "case_id", "question", "keep_subjects")


class RequestError(ValueError):
    """An edit request (or the file holding it) is malformed."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt`` with ``subject`` filled in, then ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str | None = None
    question: str | None = None  # the fact as a question, '{}' where the subject goes (chat-aware editing)
    # Set only on the chat form the editor derives from a request with a question (prompts.chat_form):
    # the prompt is a rendered chat turn, so no context template goes in front of it and the answer
    # follows the assistant's header without a leading space.
    chat_turn: bool = False
    # Other subjects for which this prompt (and question) must keep its answer: the solve asks W_out
    # not to change at their keys, so the edit does not spread to them (Editor._kept_keys).
    keep_subjects: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Built directly (not parsed), a request must still be usable: one slot for the subject.
        if self.prompt.count(PLACEHOLDER) != 1:
            raise RequestError(f"EditRequest prompt {self.prompt!r} must contain exactly one '{{}}' where the subject goes")
        if self.question is not None and self.question.count(PLACEHOLDER) != 1:
            raise RequestError(f"EditRequest question {self.question!r} must contain exactly one '{{}}' where the subject goes")

    def question_text(self) -> str | None:
        """The question with the subject filled in."""
        return None if self.question is None else self.question.replace(PLACEHOLDER, self.subject, 1)

    def text(self) -> str:
        """The prompt with the subject filled in."""
        # Not str.format: the subject (or the rest of the prompt) may hold braces.
        return self.prompt.replace(PLACEHOLDER, self.subject, 1)

    def to_dict(self) -> dict[str, Any]:
        """MEMIT-style record; :func:`parse_requests` reads it back unchanged."""
        record: dict[str, Any] = {
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": {"str": self.target_new},
        }
        if self.target_true is not None:
            record["target_true"] = {"str": self.target_true}
        if self.case_id is not None:
            record["case_id"] = self.case_id
        if self.question is not None:
            record["question"] = self.question
        if self.keep_subjects:
            record["keep_subjects"] = list(self.keep_subjects)
        return record


@dataclass(frozen=True)
class _Where:
    """Where a record came from, for error messages."""

    source: str
    index: int  # 1-based
    case_id: object = None
    line: int | None = None

    def label(self) -> str:
        notes = []
        if self.line is not None:
            notes.append(f"line {self.line}")
        if isinstance(self.case_id, (int, str)) and not isinstance(self.case_id, bool):
            notes.append(f"case_id {self.case_id}")
        return f"record {self.index}" + (f" ({', '.join(notes)})" if notes else "")

    def __str__(self) -> str:
        return f"{self.source}, {self.label()}"


def _error(where: _Where, field: str, problem: str, fix: str) -> RequestError:
    return RequestError(f"{where}: field '{field}' {problem} — {fix}")


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


# ---------------------------------------------------------------- one record


@dataclass(frozen=True)
class _Raw:
    """A record's values, each paired with the field name it came from."""

    prompt: tuple[str, object]
    subject: tuple[str, object]
    target_new: tuple[str, object]
    target_true: tuple[str, object]
    case_id: tuple[str, object]
    question: tuple[str, object] = ("question", None)


def _near_misses(record: Mapping) -> list[tuple[str, str]]:
    """(field, the request field it is a typo of) for each field of `record` (and of its
    requested_rewrite) within a typo of a request field the record lacks: "tagret_true" would be
    ignored without a word, and the edit would lose its efficacy check. A warning, not an error:
    datasets carry fields of their own that may lie that close ("questions" beside "question")."""
    found = []
    for fields, prefix in ((record, ""), (record.get("requested_rewrite"), "requested_rewrite.")):
        if not isinstance(fields, Mapping):
            continue
        for key in fields:
            if isinstance(key, str) and key not in REQUEST_FIELDS:
                close = difflib.get_close_matches(key, REQUEST_FIELDS, n=1, cutoff=0.8)
                if close and close[0] not in fields:
                    found.append((prefix + key, prefix + close[0]))
    return found


def _extract(record: Mapping, where: _Where) -> _Raw:
    """Pick the fields of whichever format ``record`` is in."""
    if "requested_rewrite" in record:
        raw = _extract_counterfact(record, where)
        inner = record["requested_rewrite"].get("question")  # MQuAKE's rewrites carry one
        field = ("requested_rewrite.question", inner) if inner is not None else ("question", record.get("question"))
        return dataclasses.replace(raw, question=field)
    if "src" in record and "prompt" not in record:
        return dataclasses.replace(_extract_zsre(record), question=("question", record.get("question")))
    true_key = "target_true" if "target_true" in record else "ground_truth"
    return _Raw(
        prompt=("prompt", record.get("prompt", _MISSING)),
        subject=("subject", record.get("subject", _MISSING)),
        target_new=("target_new", record.get("target_new", _MISSING)),
        target_true=(true_key, record.get(true_key)),
        case_id=("case_id", record.get("case_id")),
        question=("question", record.get("question")),
    )


def _extract_counterfact(record: Mapping, where: _Where) -> _Raw:
    rewrite = record["requested_rewrite"]
    if not isinstance(rewrite, Mapping):
        raise _error(
            where, "requested_rewrite", f"is a {type(rewrite).__name__}, not an object",
            'give {"prompt": ..., "subject": ..., "target_new": {"str": ...}}',
        )
    key = "requested_rewrite."
    return _Raw(
        prompt=(key + "prompt", rewrite.get("prompt", _MISSING)),
        subject=(key + "subject", rewrite.get("subject", _MISSING)),
        target_new=(key + "target_new", rewrite.get("target_new", _MISSING)),
        target_true=(key + "target_true", rewrite.get("target_true")),
        case_id=("case_id", record.get("case_id", rewrite.get("case_id"))),
    )


def _extract_zsre(record: Mapping) -> _Raw:
    # MEND zsRE: "alt" is the counterfactual answer to write, "answers" the true
    # ones (EasyEdit's reading; the portability questions assume "alt" holds).
    if "alt" in record:
        new, true = ("alt", record["alt"]), ("answers", record.get("answers"))
    else:
        new, true = ("answers", record.get("answers", _MISSING)), ("alt", None)
    return _Raw(
        prompt=("src", record["src"]),
        subject=("subject", record.get("subject", _MISSING)),
        target_new=new,
        target_true=true,
        case_id=("case_id", record.get("case_id")),
    )


def _subject(raw: _Raw, where: _Where) -> str:
    field, value = raw.subject
    if value is _MISSING:
        raise _error(where, field, "is missing", "add the entity being edited, e.g. \"subject\": \"Paris\"")
    if not isinstance(value, str):
        raise _error(where, field, f"must be a string, got {_describe(value)}", "write the subject as a JSON string")
    if not value.strip():
        raise _error(where, field, "is empty", "give the entity being edited, e.g. \"subject\": \"Paris\"")
    return value


def _prompt(raw: _Raw, subject: str, where: _Where) -> str:
    field, value = raw.prompt
    if value is _MISSING:
        raise _error(where, field, "is missing", "add a prompt with '{}' where the subject goes, e.g. \"{} is located in\"")
    if not isinstance(value, str):
        raise _error(where, field, f"must be a string, got {_describe(value)}", "write the prompt as one JSON string")
    if not value.strip():
        raise _error(where, field, "is empty", "give a prompt with '{}' where the subject goes, e.g. \"{} is located in\"")
    count = value.count(PLACEHOLDER)
    if count > 1:
        raise _error(
            where, field, f"has {count} '{{}}' placeholders",
            "keep exactly one '{}', where the subject goes, and write any other mention of the subject literally",
        )
    if count == 1:
        return value
    if subject in value:
        return value.replace(subject, PLACEHOLDER, 1)
    raise _error(
        where, field, f"has no '{{}}' and does not contain the subject {subject!r}",
        "put '{}' where the subject goes, or write the subject literally in the prompt",
    )


def _question(raw: _Raw, subject: str, where: _Where) -> str | None:
    field, value = raw.question
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _error(where, field, f"must be a non-empty string, got {_describe(value)}",
                     'ask the fact as a question about the subject, e.g. "What is the capital of {}?", or leave it out')
    count = value.count(PLACEHOLDER)
    if count == 1:
        return value
    if count == 0 and subject in value:
        return value.replace(subject, PLACEHOLDER, 1)
    raise _error(where, field, f"has {count} '{{}}' and " + ("does not contain" if count == 0 else "so no single place for")
                 + f" the subject {subject!r}", "put one '{}' where the subject goes, or write the subject literally in the question")


def _target_text(field: str, value: object, where: _Where, allow_list: bool) -> tuple[str, str | None]:
    """Unwrap ``{"str": ...}`` / ``[...]`` to the string inside (None for an empty list)."""
    if isinstance(value, Mapping):
        if "str" not in value:
            raise _error(where, field, "is an object without a 'str' key", 'write it as {"str": "..."} or a plain string')
        field, value = f"{field}.str", value["str"]
    elif allow_list and isinstance(value, list):
        if not value:
            return field, None
        field, value = f"{field}[0]", value[0]
    if not isinstance(value, str):
        raise _error(where, field, f"must be a string, got {_describe(value)}", "write the target as a JSON string")
    return field, value


def _target_new(raw: _Raw, where: _Where) -> str:
    field, value = raw.target_new
    example = '{"str": "English"}' if field.startswith("requested_rewrite.") else '"English"'  # each format's own way
    fix = f'give the text the model should produce after the edit, e.g. "{field.split(".")[-1]}": {example}'
    if value is _MISSING or value is None:
        raise _error(where, field, "is missing", fix)
    # Only zsRE's "answers" is a list by design; a list elsewhere is ambiguous.
    field, text = _target_text(field, value, where, allow_list=field == "answers")
    if text is None or not text.strip():
        raise _error(where, field, "is empty", fix)
    return text


def _target_true(raw: _Raw, where: _Where) -> str | None:
    field, value = raw.target_true
    if value is None:
        return None
    _, text = _target_text(field, value, where, allow_list=True)
    if text is None or not text.strip() or text.strip() == _NO_ANSWER:
        return None
    return text


def _keep_subjects(record: Mapping, subject: str, where: _Where) -> tuple[str, ...]:
    value = record.get("keep_subjects", [])
    fix = 'give a list of other subjects whose answer to this prompt must not change, e.g. "keep_subjects": ["Lyon", "Nice"], or leave it out'
    if not isinstance(value, list):
        raise _error(where, "keep_subjects", f"must be a list of strings, got {_describe(value)}", fix)
    for i, kept in enumerate(value):
        if not isinstance(kept, str) or not kept.strip():
            raise _error(where, f"keep_subjects[{i}]", f"must be a non-empty string, got {_describe(kept)}", fix)
        if kept.strip() == subject.strip():
            raise _error(where, f"keep_subjects[{i}]", f"is the edited subject {subject!r}: its answer is the one that changes",
                         "list other subjects only")
    return tuple(value)


def _case_id(raw: _Raw, where: _Where) -> int | str | None:
    field, value = raw.case_id
    if value is None or (isinstance(value, (int, str)) and not isinstance(value, bool)):
        return value
    raise _error(where, field, f"must be an integer or a string, got {_describe(value)}", "use a number or a string id, or leave case_id out")


def _parse_record(record: object, where: _Where) -> EditRequest:
    if not isinstance(record, Mapping):
        raise RequestError(
            f"{where}: is a {type(record).__name__}, not a JSON object — each request must be an object such as "
            '{"prompt": "{} is located in", "subject": "Paris", "target_new": "Rome"}'
        )
    raw = _extract(record, where)
    subject = _subject(raw, where)
    target_new, target_true = _target_new(raw, where), _target_true(raw, where)
    if target_true is not None and target_new.strip() == target_true.strip():
        if raw.target_true[0].split("[")[0] in GOLD_ANSWER_FIELDS:
            # zsRE/KnowEdit: the gold answer, not what the model says now; writing it is a real edit
            # (the model may not know it), with no old object to compare against
            target_true = None
        else:
            raise _error(where, raw.target_new[0], f"equals {raw.target_true[0]} ({target_new.strip()!r}): the edit would change nothing",
                         "give the new fact's object, or leave this record out")
    return EditRequest(
        prompt=_prompt(raw, subject, where),
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        case_id=_case_id(raw, where),
        question=_question(raw, subject, where),
        keep_subjects=_keep_subjects(record, subject, where),
    )


# ---------------------------------------------------------------- batches


def _raw_case_id(record: object) -> object:
    """The record's case_id if it has one, read before validation, for messages."""
    if not isinstance(record, Mapping):
        return None
    rewrite = record.get("requested_rewrite")
    inner = rewrite.get("case_id") if isinstance(rewrite, Mapping) else None
    return record.get("case_id", inner)


def _check_conflicts(pairs: Sequence[tuple[_Where, EditRequest]]) -> None:
    first: dict[tuple[str, str], tuple[_Where, EditRequest]] = {}
    kept = {(s, r.prompt): (w, r) for w, r in pairs for s in r.keep_subjects}
    for where, request in pairs:
        keeper = kept.get((request.subject, request.prompt))
        if keeper is not None:  # one batch cannot both change and keep the same prompt's answer
            raise RequestError(
                f"{where.source}, {keeper[0].label()} and {where.label()}: {keeper[0].label()} keeps the answer of subject "
                f"{request.subject!r} to prompt {request.prompt!r} (keep_subjects), which {where.label()} edits — drop it from "
                "keep_subjects, or apply the two in separate batches"
            )
        key = (request.subject, request.prompt)
        if key not in first:
            first[key] = (where, request)
            continue
        where0, request0 = first[key]
        # The algorithm normalises the leading space, so " Rome" and "Rome" agree.
        if request0.target_new.strip() != request.target_new.strip():
            raise RequestError(
                f"{where.source}, {where0.label()} and {where.label()}: field 'target_new' differs for the same "
                f"subject {request.subject!r} and prompt {request.prompt!r} ({request0.target_new!r} vs "
                f"{request.target_new!r}), so the edits contradict each other — keep only one of them, "
                "or apply them in separate batches"
            )


def _parse(
    records: Iterable[object], source: str, lines: Sequence[int] | None, allow_conflicts: bool
) -> list[tuple[_Where, EditRequest]]:
    pairs = []
    for i, record in enumerate(records):
        where = _Where(source, i + 1, _raw_case_id(record), lines[i] if lines else None)
        pairs.append((where, _parse_record(record, where)))
    if not pairs:
        raise RequestError(f"{source} has no requests — add at least one record with prompt, subject and target_new")
    if not allow_conflicts:
        _check_conflicts(pairs)
    return pairs


def _warn_about_a_users_file(records: Sequence[object], pairs: list[tuple[_Where, EditRequest]]) -> None:
    """What a file of requests probably did not mean, said but not refused: a field within a typo
    of a request field (ignored as the dataset's own), and a request given twice (applied twice)."""
    misses: dict[tuple[str, str], list[_Where]] = {}  # (field, what it is a typo of) -> records
    for record, (where, _) in zip(records, pairs):
        for miss in _near_misses(record):
            misses.setdefault(miss, []).append(where)
    for (field, meant), found in misses.items():
        others = f" (and {len(found) - 1} more records)" if len(found) > 1 else ""
        warnings.warn(f"{found[0]}{others}: field '{field}' is not a request field and is ignored; did you mean '{meant}'?",
                      stacklevel=3)
    first: dict[str, _Where] = {}
    repeats = []
    for where, request in pairs:
        key = json.dumps(request.to_dict(), sort_keys=True)
        if key in first:
            repeats.append((where, first[key]))
        else:
            first[key] = where
    if repeats:
        (where, earlier), more = repeats[0], f" ({len(repeats)} repeats in all)" if len(repeats) > 1 else ""
        warnings.warn(f"{where} repeats {earlier.label()} exactly{more}; both are applied (leave the repeat out to edit it once)",
                      stacklevel=3)


def parse_requests(
    records: Iterable[Mapping], source: str = "<input>", *, allow_conflicts: bool = False
) -> list[EditRequest]:
    """Validate ``records`` (any of the accepted formats) into edit requests.

    All records are checked before anything is returned; the first bad one
    raises :class:`RequestError`.  Identical duplicates are kept; the same
    subject and prompt with different new targets is an error unless
    ``allow_conflicts`` (use it for whole datasets, then check each batch
    with :func:`check_conflicts`).
    """
    return [request for _, request in _parse(records, source, None, allow_conflicts)]


def check_conflicts(requests: Sequence[EditRequest], source: str = "<input>") -> None:
    """Raise :class:`RequestError` if two requests give one subject+prompt different targets."""
    _check_conflicts([(_Where(source, i + 1, r.case_id), r) for i, r in enumerate(requests)])


# ---------------------------------------------------------------- files


def _json_records(text: str, source: str) -> list[object]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(
            f"{source}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}) — fix the syntax, "
            "or name the file .jsonl if it holds one record per line"
        ) from e
    if isinstance(data, Mapping) and "requests" in data:
        data = data["requests"]
        if not isinstance(data, list):
            raise RequestError(f"{source}: field 'requests' is a {type(data).__name__}, not a list — make it a list of request objects")
    if isinstance(data, Mapping):
        return [data]
    if not isinstance(data, list):
        raise RequestError(
            f"{source}: top level is a {type(data).__name__} — write a list of request objects, "
            'a single request object, or {"requests": [...]}'
        )
    return data


def _jsonl_records(text: str, source: str) -> tuple[list[object], list[int]]:
    records, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise RequestError(
                f"{source}, line {number}, column {e.colno}: not valid JSON ({e.msg}) — "
                "each line of a .jsonl file must hold one complete JSON object"
            ) from e
        lines.append(number)
    return records, lines


def _guess_records(text: str, source: str) -> tuple[list[object], list[int] | None]:
    """Unknown extension: JSON if it parses, else JSONL."""
    try:
        return _json_records(text, source), None
    except RequestError as json_error:
        cause = json_error.__cause__
        # "Extra data" means a first value parsed and more followed: JSONL-shaped.
        if isinstance(cause, json.JSONDecodeError) and cause.msg == "Extra data":
            return _jsonl_records(text, source)
        raise


def _read(path: str | os.PathLike, source: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a BOM from Windows editors
            return f.read()
    except UnicodeDecodeError as e:
        raise RequestError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start}) — save the file as UTF-8") from e
    except OSError as e:
        raise RequestError(f"{source}: cannot read the requests file ({e.strerror}) — check the path") from e


def load_requests(path: str | os.PathLike, *, allow_conflicts: bool = False) -> list[EditRequest]:
    """Load and validate every request in a .json or .jsonl file.

    ``.json`` holds a list of records, one record object, or
    ``{"requests": [...]}``; ``.jsonl`` one record per non-empty line; other
    extensions are tried as JSON, then JSONL.  Nothing is returned unless
    every record is valid (see :func:`parse_requests`).
    """
    source = os.fsdecode(path)
    text = _read(path, source)
    if not text.strip():
        raise RequestError(f"{source} has no requests — the file is empty; add at least one request record")
    suffix = os.path.splitext(source)[1].lower()
    if suffix == ".json":
        records, lines = _json_records(text, source), None
    elif suffix == ".jsonl":
        records, lines = _jsonl_records(text, source)
    else:
        records, lines = _guess_records(text, source)
    pairs = _parse(records, source, lines, allow_conflicts)
    _warn_about_a_users_file(records, pairs)
    return [request for _, request in pairs]
