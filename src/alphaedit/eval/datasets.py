"""Evaluation records from CounterFact, zsRE and KnowEdit files, in one common shape.

`--dataset NAME:PATH` names the benchmark and a local file; `--dataset NAME` alone downloads the
public file once (ROME/MEMIT's data host, or $ALPHAEDIT_DATA_URL) into $ALPHAEDIT_HOME/data.
The record format is detected from
its fields: CounterFact in ROME's format (`requested_rewrite`) or EasyEdit's flat format
(`prompt`, `subject`, `target_new`, `ground_truth`, `rephrase_prompt`, `locality_prompt`),
zsRE in MEND's format (`src`, `answers`, `rephrase`, `loc`, `loc_ans`), KnowEdit
(`locality`/`portability` dicts). Files are read in place and never modified.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..files import alphaedit_home, atomic_write_text
from ..requests import EditRequest, RequestError, parse_requests
from .questions import ChatProbes, counterfact_probes, fill_subject, relation_question

KINDS = ("counterfact", "zsre")
DATA_URL = "https://memit.baulab.info/data/dsets"
PUBLIC_FILES = {"counterfact": "multi_counterfact.json", "zsre": "zsre_mend_eval.json"}  # what the paper's runs use


@dataclass
class EvalRecord:
    """One edit and the prompts that test it."""

    kind: str  # "counterfact" (NLL comparison metrics) or "zsre" (token accuracy metrics)
    case_id: int | str
    request: EditRequest
    paraphrases: list[str] = field(default_factory=list)
    # CounterFact: prompts whose true object should stay preferred over the new one.
    # zsRE/KnowEdit: (prompt, answer) pairs whose answer tokens should still be predicted.
    neighbourhood: list[str] = field(default_factory=list)
    neighbourhood_answers: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    reference_texts: list[str] = field(default_factory=list)  # for consistency (TF-IDF): the local stand-in
    # CounterFact: where ROME's attribute_snippets.json keeps this record's references (consistency.py)
    relation_id: str | None = None
    target_new_id: str | None = None
    chat: ChatProbes | None = None  # the generation-based evaluation's questions (questions.py)


def _cf_rome(rec: dict, request: EditRequest) -> EvalRecord:
    new = request.target_new
    return EvalRecord(
        "counterfact",
        rec["case_id"],
        request,
        paraphrases=list(rec.get("paraphrase_prompts", [])),
        neighbourhood=list(rec.get("neighborhood_prompts", [])),
        generation_prompts=list(rec.get("generation_prompts", [])),
        # ROME's attribute snippets are not available offline: the record's own attribute
        # prompts (other subjects that truly have the new object) completed with it stand in.
        reference_texts=[f"{p} {new}." for p in rec.get("attribute_prompts", [])],
        relation_id=rec["requested_rewrite"].get("relation_id"),
        target_new_id=(rec["requested_rewrite"].get("target_new") or {}).get("id"),
    )


def _cf_flat(rec: dict, request: EditRequest) -> EvalRecord:
    return EvalRecord(
        "counterfact",
        rec.get("case_id", ""),
        request,
        paraphrases=[rec["rephrase_prompt"]] if rec.get("rephrase_prompt") else [],
        neighbourhood=[rec["locality_prompt"]] if rec.get("locality_prompt") else [],
        neighbourhood_answers=[rec["locality_ground_truth"]] if rec.get("locality_ground_truth") else [],
    )


def _zsre_mend(rec: dict, index: int) -> EvalRecord:
    # ROME/MEMIT's zsRE loader (ALGORITHM.md §3.4): the new target is answers[0].
    request = EditRequest(rec["src"].replace(rec["subject"], "{}", 1), rec["subject"], rec["answers"][0], None, index)
    loc = rec["loc"].removeprefix("nq question:").strip()
    return EvalRecord(
        "zsre",
        index,
        request,
        paraphrases=[rec["rephrase"]],
        neighbourhood=[rec["loc"] + "?"],
        neighbourhood_answers=[rec["loc_ans"]],
        # zsRE's prompts are questions already; its neighbour is a Natural Questions question
        chat=ChatProbes(rec["src"], [rec["rephrase"]], [loc[:1].upper() + loc[1:] + "?"], [rec["loc_ans"]]),
    )


def _knowedit(rec: dict, request: EditRequest, index: int) -> EvalRecord:
    prompts, answers = [], []
    for items in (rec.get("locality") or {}).values():
        for item in items:
            truth = item["ground_truth"]
            prompts.append(item["prompt"])
            answers.append(truth[0] if isinstance(truth, list) else truth)
    return EvalRecord(
        "zsre",
        index,
        request,
        paraphrases=[rec["rephrase_prompt"]] if rec.get("rephrase_prompt") else [],
        neighbourhood=prompts,
        neighbourhood_answers=answers,
    )


def download(name: str) -> Path:
    """The public file for `name`, fetched once into $ALPHAEDIT_HOME/data (atomically)."""
    target = alphaedit_home() / "data" / PUBLIC_FILES[name]
    if target.exists():
        return target
    url = f"{os.environ.get('ALPHAEDIT_DATA_URL', DATA_URL).rstrip('/')}/{PUBLIC_FILES[name]}"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            text = response.read().decode("utf-8")
    except OSError as e:
        raise ValueError(f"--dataset {name}: could not download {url} ({e}); give a local file as {name}:PATH") from e
    json.loads(text)  # never cache a truncated or non-JSON answer
    atomic_write_text(target, text)
    return target


def _valid_records(raw: list, source: str, skipped: list[str] | None) -> tuple[list, list[EditRequest]]:
    """Records that make valid edit requests; the others are reported in `skipped` (or raise)."""
    kept, requests = [], []
    for i, record in enumerate(raw):
        try:
            (request,) = parse_requests([record], source=f"{source}, record {i + 1}")
        except RequestError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
            continue
        kept.append(record)
        requests.append(request)
    if not kept:
        raise ValueError(f"{source}: no record makes a valid edit request")
    return kept, requests


def load_dataset(spec: str, skipped: list[str] | None = None) -> list[EvalRecord]:
    """`counterfact[:PATH]`, `zsre[:PATH]` or `knowedit:PATH` (format detected per file).

    Records that cannot be edited (e.g. a KnowEdit question that never names its subject) are
    left out and described in `skipped` when a list is given; otherwise they raise.

    PATH may list several files, comma-separated, chained into one stream in that order (a long
    sequence, e.g. EasyEdit's CounterFact edit and train files). A stream drops, and reports in
    `skipped`, a record that repeats an earlier one's subject and prompt: with the same new object
    it would edit nothing new, with another it would contradict it (a single file keeps its
    records as published, as the paper's runs do).
    """
    name, sep, path = spec.partition(":")
    if sep and "," in path:
        records: list[EvalRecord] = []
        kinds: dict[str, str] = {}  # each kind of record, with the first file that gave it
        for part in path.split(","):
            loaded = load_dataset(f"{name}:{part.strip()}", skipped)
            for kind in {r.kind for r in loaded}:
                kinds.setdefault(kind, part.strip())
            records += loaded
        if len(kinds) > 1:  # CounterFact's NLL comparisons and zsRE's token accuracies do not average
            found = ", ".join(f"{kind} records from {file}" for kind, file in kinds.items())
            raise ValueError(f"--dataset {spec}: a stream must hold one kind of record to be scored as one run, "
                             f"but it has {found}; evaluate them as separate runs")
        return _without_repeats(records, skipped)
    if name not in ("counterfact", "zsre", "knowedit") or (not sep and name not in PUBLIC_FILES):
        raise ValueError(f"--dataset must be counterfact[:PATH], zsre[:PATH] or knowedit:PATH, got {spec!r}")
    file = Path(path).expanduser() if sep else download(name)
    if not file.is_file():
        raise ValueError(f"--dataset {spec}: {file} is not a file")
    raw = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{file}: expected a non-empty JSON list of records")
    first = raw[0]
    if "src" in first and "answers" in first:
        return [_zsre_mend(rec, i) for i, rec in enumerate(raw)]
    raw, requests = _valid_records(raw, str(file), skipped)
    if "requested_rewrite" in first:
        return _with_chat_probes([_cf_rome(rec, req) for rec, req in zip(raw, requests)])
    if "locality" in first or "portability" in first:
        return [_knowedit(rec, req, i) for i, (rec, req) in enumerate(zip(raw, requests))]
    return [_cf_flat(rec, req) for rec, req in zip(raw, requests)]


def _without_repeats(records: list[EvalRecord], skipped: list[str] | None) -> list[EvalRecord]:
    first: dict[tuple[str, str], EvalRecord] = {}
    kept, dropped = [], []
    for rec in records:
        key = (rec.request.subject, rec.request.prompt)
        if key not in first:
            first[key] = rec
            kept.append(rec)
            continue
        earlier = first[key]
        same = earlier.request.target_new.strip() == rec.request.target_new.strip()
        message = (f"case_id {rec.case_id}: {rec.request.text()!r} → {rec.request.target_new!r} "
                   + (f"repeats case_id {earlier.case_id}" if same else f"contradicts case_id {earlier.case_id} (→ {earlier.request.target_new!r})"))
        dropped.append(message)
    if skipped is not None:
        skipped += dropped
    elif dropped:
        warnings.warn(f"{len(dropped)} records of the stream left out, one per repeated subject and prompt (first: {dropped[0]})", stacklevel=3)
    return kept


def _with_chat_probes(records: list[EvalRecord]) -> list[EvalRecord]:
    """CounterFact: each record's questions, the neighbours' subjects found with the cloze
    templates of all the file's records of the same relation."""
    templates: dict[str | None, set[str]] = {}
    for rec in records:
        templates.setdefault(rec.relation_id, set()).add(rec.request.prompt)
    for rec in records:
        rec.chat = counterfact_probes(rec.relation_id, rec.request.subject, rec.neighbourhood, rec.request.target_true,
                                      templates[rec.relation_id])
    return records


def with_questions(records: list[EvalRecord]) -> list[EvalRecord]:
    """The records with a question on each edit request, so that chat-aware editing writes the
    fact in the chat form too (`alphaedit eval --chat`): a CounterFact relation's first question
    form; zsRE's prompt, which is a question already. Records without one are left as they are."""
    out = []
    for rec in records:
        question = rec.request.question
        if question is None:
            question = relation_question(rec.relation_id) if rec.kind == "counterfact" else rec.request.prompt
        out.append(dataclasses.replace(rec, request=dataclasses.replace(rec.request, question=question)) if question else rec)
    return out


def select(records: list[EvalRecord], n: int, seed: int | None) -> list[EvalRecord]:
    """The first n records (the reference code), or n drawn with a fixed seed (the paper's text)."""
    if n > len(records):
        raise ValueError(f"asked for {n} records, the dataset has {len(records)}")
    if seed is None:
        return records[:n]
    return random.Random(seed).sample(records, n)


def _unnamed_subjects(records: list[EvalRecord], dataset: list[EvalRecord]) -> dict[str | None, list[str]]:
    """relation -> subjects of the dataset's records that are not evaluated and that no evaluated
    record names (its own subject, or in its neighbourhood and paraphrase prompts), in dataset
    order: what may be kept or held without being what the evaluation tests."""
    evaluated = {id(rec) for rec in records}
    named = [rec.request.subject for rec in records] + [p for rec in records for p in (*rec.neighbourhood, *rec.paraphrases)]
    text = "\n".join(named)
    pool: dict[str | None, list[str]] = {}
    pooled: set[tuple[str | None, str]] = set()
    for rec in dataset:
        subject = rec.request.subject
        if id(rec) in evaluated or (rec.relation_id, subject) in pooled or subject in text:
            continue
        pooled.add((rec.relation_id, subject))
        pool.setdefault(rec.relation_id, []).append(subject)
    return pool


def with_kept_subjects(records: list[EvalRecord], dataset: list[EvalRecord], k: int, seed: int = 0) -> list[EvalRecord]:
    """The records with `keep_subjects` on each edit request: k subjects of other records of the
    dataset with the same relation (`alphaedit eval --keep-same-relation K`), so that an edit is
    solved not to change the relation's answer for them. Drawn from the records not being
    evaluated, and never a subject that an evaluated record names: the kept subjects must not be
    the ones the evaluation tests."""
    if any(rec.relation_id is None for rec in records):
        raise ValueError("--keep-same-relation draws subjects of the same relation, which only CounterFact records carry "
                         "(a relation_id); leave it out for this dataset")
    pool = _unnamed_subjects(records, dataset)
    rng = random.Random(seed)
    out = []
    for rec in records:
        candidates = pool.get(rec.relation_id, [])
        kept = tuple(rng.sample(candidates, min(k, len(candidates))))
        out.append(dataclasses.replace(rec, request=dataclasses.replace(rec.request, keep_subjects=kept)))
    return out


def held_questions(records: list[EvalRecord], dataset: list[EvalRecord], n: int, seed: int = 0) -> list[str]:
    """n questions about subjects nobody edits, for the edits to leave the model's answers to
    alone (`alphaedit eval --keep-conversations N`, held.py): a CounterFact relation's first
    question form about a subject of a record that is not evaluated and that no evaluated record
    names, drawn with a fixed seed from all relations."""
    if any(rec.relation_id is None for rec in dataset):
        raise ValueError("--keep-conversations asks questions of CounterFact's relations, which only CounterFact records carry "
                         "(a relation_id); leave it out for this dataset")
    pool = [(relation, subject) for relation, subjects in _unnamed_subjects(records, dataset).items()
            if relation_question(relation) is not None for subject in subjects]
    if n > len(pool):
        raise ValueError(f"--keep-conversations {n}: the dataset has {len(pool)} subjects that the evaluated records do not name; "
                         "ask for fewer")
    return [fill_subject(relation_question(relation), subject) for relation, subject in random.Random(seed).sample(pool, n)]
