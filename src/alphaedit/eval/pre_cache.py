"""The unedited model's scores, computed once per model, records and evaluation settings.

Every run of the protocol starts by scoring the unedited model: its records, the general check,
the perplexity. A comparison of methods (MEMIT, PRUNE, RECT, each with and without the
projection) repeats that identical work once per row, and on a CPU it is half an hour for 2,000
CounterFact records. So the pre-edit evaluation is kept under `<home>/pre-eval/<key>.json`,
one file written atomically, and a later run with the same key copies it instead of recomputing.

The key is everything the numbers depend on: the model (its config, every weight, the
tokenizer), the records, the evaluation settings (corpus files by content, not by path), the
general check's tasks and files, and the source of the modules that compute scores, so that a
change to the scoring code never serves a stale number.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import generate, prompts, teacher_forcing
from ..files import alphaedit_home, atomic_write_text, content_digest
from ..stats.cache import config_digest, tensors_digest, tokenizer_digest
from . import consistency, evaluator as evaluator_module, general as general_module, judge as judge_module, metrics, questions, scoring

FORMAT = "1"
# what decides a pre-edit score: a change to any of them computes it again (evaluator: which records,
# scorers and summary; the rest: the scores themselves)
SCORING_MODULES = (evaluator_module, scoring, metrics, general_module, consistency, questions, judge_module, teacher_forcing, generate, prompts)


def model_digest(model: torch.nn.Module) -> str:
    """The config, then every parameter and buffer, by name, dtype, shape and bytes (a tied weight
    counted once, under its first name)."""
    unique: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            unique[name] = tensor
    return tensors_digest(unique, hashlib.sha256(config_digest(model).encode()))


def _file_or_name(value: str | None) -> str | None:
    """A corpus by its content when it is a file or folder here, else as written (e.g. 'rome')."""
    if value is None:
        return None
    path = Path(value.split(":", 1)[1] if value.startswith("rome:") else value)
    return content_digest(path) if path.exists() else value


def pre_eval_key(evaluator, general) -> dict:
    """What the pre-edit numbers depend on, as a JSON-able description (hashed into the file name)."""
    settings = asdict(evaluator.settings)
    for name in ("perplexity_corpus", "idf_corpus", "consistency"):
        settings[name] = _file_or_name(settings[name])
    # a request's question only steers chat-aware editing, not what the unedited model scores
    records = [{**asdict(r), "request": {k: v for k, v in r.request.to_dict().items() if k != "question"}} for r in evaluator.records]
    code = hashlib.sha256("".join(Path(m.__file__).read_text(encoding="utf-8") for m in SCORING_MODULES).encode())
    description = {
        "format": FORMAT,
        "model": model_digest(evaluator.model),
        "tokenizer": tokenizer_digest(evaluator.tokenizer),
        "records": hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest(),
        "settings": settings,
        "code": code.hexdigest(),
        "general": None,
    }
    if evaluator.judge is not None:  # its verdicts are part of the scores: the judge's weights too
        description["judge"] = {"model": model_digest(evaluator.judge.model), "tokenizer": tokenizer_digest(evaluator.judge.tokenizer)}
    if general is not None:
        description["general"] = {
            "tasks": list(general.tasks), "tests": general.tests, "gen_len": general.gen_len,
            "teacher_forced_labels": general.teacher_forced_labels,
            "records": hashlib.sha256(json.dumps(general.records, sort_keys=True, default=str).encode()).hexdigest(),
        }
    return description


class PreEvalCache:
    """`<home>/pre-eval/<sha256 of the key>.json`: {key, created, records, summary, general, general_rows}."""

    def __init__(self, root: Path | None = None):
        self.root = (root or alphaedit_home()) / "pre-eval"

    def path(self, key: dict) -> Path:
        return self.root / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24] + ".json")

    def load(self, key: dict) -> dict | None:
        path = self.path(key)
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # absent, or unreadable: recompute (and overwrite it)
        return stored if stored.get("key") == key else None

    def store(self, key: dict, entry: dict) -> Path:
        path = self.path(key)
        atomic_write_text(path, json.dumps({"key": key, "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **entry}))
        return path
