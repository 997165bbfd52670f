"""Evaluation records from CounterFact, zsRE and KnowEdit files, in one common shape.

`--dataset NAME:PATH` names the benchmark and a local file. The record format is detected from
its fields: CounterFact in ROME's format (`requested_rewrite`) or EasyEdit's flat format
(`prompt`, `subject`, `target_new`, `ground_truth`, `rephrase_prompt`, `locality_prompt`),
zsRE in MEND's format (`src`, `answers`, `rephrase`, `loc`, `loc_ans`), KnowEdit
(`locality`/`portability` dicts). Files are read in place and never modified.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..requests import EditRequest, parse_requests

KINDS = ("counterfact", "zsre")


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
    reference_texts: list[str] = field(default_factory=list)  # for consistency (TF-IDF)


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
    return EvalRecord(
        "zsre",
        index,
        request,
        paraphrases=[rec["rephrase"]],
        neighbourhood=[rec["loc"] + "?"],
        neighbourhood_answers=[rec["loc_ans"]],
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


def load_dataset(spec: str) -> list[EvalRecord]:
    """`counterfact:PATH`, `zsre:PATH` or `knowedit:PATH` (format detected per file)."""
    name, sep, path = spec.partition(":")
    if not sep or name not in ("counterfact", "zsre", "knowedit"):
        raise ValueError(f"--dataset must be counterfact:PATH, zsre:PATH or knowedit:PATH, got {spec!r}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"--dataset {spec}: {file} is not a file")
    raw = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{file}: expected a non-empty JSON list of records")
    first = raw[0]
    if "src" in first and "answers" in first:
        return [_zsre_mend(rec, i) for i, rec in enumerate(raw)]
    requests = parse_requests(raw, source=str(file), allow_conflicts=True)
    if "requested_rewrite" in first:
        return [_cf_rome(rec, req) for rec, req in zip(raw, requests)]
    if "locality" in first or "portability" in first:
        return [_knowedit(rec, req, i) for i, (rec, req) in enumerate(zip(raw, requests))]
    return [_cf_flat(rec, req) for rec, req in zip(raw, requests)]


def select(records: list[EvalRecord], n: int, seed: int | None) -> list[EvalRecord]:
    """The first n records (the reference code), or n drawn with a fixed seed (the paper's text)."""
    if n > len(records):
        raise ValueError(f"asked for {n} records, the dataset has {len(records)}")
    if seed is None:
        return records[:n]
    return random.Random(seed).sample(records, n)
