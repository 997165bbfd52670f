"""Where consistency's TF-IDF statistics and reference texts come from: ROME's files, or a local stand-in.

ROME scores consistency (eval_utils_counterfact.py, test_generation) as the TF-IDF cosine between a
record's generated texts and the Wikipedia snippets about other subjects that truly have the new
object, `attribute_snippets.json[relation_id][target_new.id]`, under sklearn's TfidfVectorizer
fitted with their `idf.npy` and `tfidf_vocab.json`.

    --consistency rome        those three files, fetched once from ROME's data folder into
                              $ALPHAEDIT_HOME/data/rome ($ALPHAEDIT_ROME_URL overrides the host)
    --consistency rome:DIR    the same files from a folder you have
    --consistency local       (the default, and the only choice offline) idf from a local corpus
                              (--idf-corpus), references made of the record's own attribute prompts
                              completed with the new object

The two give different numbers; the report says which one it used, so they are never mixed.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import alphaedit_home, commit
from .metrics import TfIdf

ROME_URL = "https://rome.baulab.info/data/dsets"
ROME_FILES = ("idf.npy", "tfidf_vocab.json", "attribute_snippets.json")


@dataclass
class RomeReferences:
    tfidf: TfIdf
    snippets: dict[tuple[str, str], list[str]]  # (relation_id, target_new id) -> snippet texts
    folder: Path

    def texts(self, relation_id: str | None, target_id: str | None) -> list[str]:
        return self.snippets.get((relation_id or "", target_id or ""), [])


def rome_folder(spec: str) -> Path:
    """The folder holding ROME's three files: given (rome:DIR), or downloaded once (rome)."""
    if spec.startswith("rome:"):
        folder = Path(spec[len("rome:") :]).expanduser()
        missing = [name for name in ROME_FILES if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"--consistency {spec}: {folder} lacks {', '.join(missing)} (ROME's data/dsets files)")
        return folder
    folder = alphaedit_home() / "data" / "rome"
    base = os.environ.get("ALPHAEDIT_ROME_URL", ROME_URL).rstrip("/")
    for name in ROME_FILES:
        target = folder / name
        if target.exists():
            continue
        try:
            with urllib.request.urlopen(f"{base}/{name}", timeout=120) as response:
                data = response.read()
        except OSError as e:
            raise ValueError(f"--consistency rome: could not download {base}/{name} ({e}); offline, use --consistency local, "
                             "or give the files as --consistency rome:DIR") from e
        folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{name}.partial")
        partial.write_bytes(data)
        _read_one(partial, name)  # never keep a truncated or foreign answer
        commit(partial, target)
    return folder


def _read_one(path: Path, name: str):
    try:
        if name.endswith(".npy"):
            return np.load(path, allow_pickle=False)
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not ROME's {name} ({e})") from None


def load_rome(spec: str) -> RomeReferences:
    folder = rome_folder(spec)
    idf = _read_one(folder / "idf.npy", "idf.npy")
    vocabulary = _read_one(folder / "tfidf_vocab.json", "tfidf_vocab.json")
    snippets: dict[tuple[str, str], list[str]] = {}
    for entry in _read_one(folder / "attribute_snippets.json", "attribute_snippets.json"):
        key = (entry["relation_id"], entry["target_id"])
        snippets.setdefault(key, []).extend(sample["text"] for sample in entry["samples"])
    return RomeReferences(TfIdf.from_idf(vocabulary, idf), snippets, folder)
