"""Text for the preserved-knowledge statistics, as fixed-length token windows.

A corpus spec is a local path (a text file, or a folder of .txt/.raw/.jsonl/.json files),
"self" (text sampled from the model itself with a fixed seed: no data, no network), or
`hf:NAME[:CONFIG[:SPLIT]]`, a Hugging Face dataset streamed in order (needs a network and the
`datasets` package: `pip install alphaedit[hf]`). The same spec, tokenizer and budget always
give the same windows.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..files import content_digest, sha256
from ..prompts import bos_prefix

SELF = "self"
IMPORT = "import:"  # `--corpus import:FILE`: statistics another tool computed (stats/importing.py)
TEXT_SUFFIXES = (".txt", ".raw", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
SELF_SEED_WORDS = ("The", "In", "A", "It", "This", "He", "She", "On", "When", "After", "There", "One")


HF = "hf:"
SAMPLINGS = ("stream", "documents")


def describe(spec: str) -> str:
    """A canonical form of the spec for cache keys: "self", the hf: spec, or for local text the
    absolute path and a digest of its files' names, sizes and contents, so a changed file never
    returns the statistics of its old text."""
    if spec == SELF or spec.startswith(HF):
        return spec
    root = Path(spec).expanduser().resolve()
    files = corpus_files(spec)
    return f"{root}#{_content_digest(tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files))}"


@functools.lru_cache(maxsize=32)
def _content_digest(files: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over the files' relative order, sizes and bytes (memoised on path, size and mtime)."""
    digest = hashlib.sha256()
    for name, size, _ in files:
        digest.update(f"{Path(name).name}:{size}:{sha256(Path(name))}\n".encode())
    return digest.hexdigest()[:16]


def hf_documents(spec: str, shuffle_seed: int | None = None) -> Iterator[str]:
    """Texts of a streamed Hugging Face dataset: hf:NAME[:CONFIG[:SPLIT]] (split defaults to train),
    in order or through a seeded shuffle buffer."""
    name, config, split = (spec[len(HF) :].split(":") + [None, None])[:3]
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"--corpus {spec} needs the `datasets` package: pip install 'alphaedit[hf]'") from e
    stream = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    if shuffle_seed is not None:
        stream = stream.shuffle(seed=shuffle_seed, buffer_size=10_000)
    for record in stream:
        text = record.get("text") if isinstance(record, dict) else None
        if text and text.strip():
            yield text


def corpus_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSON_SUFFIXES)
        if files:
            return files
        raise ValueError(f"corpus folder {spec} has no .txt/.raw/.md/.jsonl/.json files")
    raise ValueError(f"--corpus {spec!r} is neither 'self' nor an existing file or folder")


def _json_texts(path: Path) -> Iterator[str]:
    def text_of(record: object) -> str | None:
        if isinstance(record, str):
            return record
        if isinstance(record, dict):
            for key in ("text", "content", "document", "article"):
                if isinstance(record.get(key), str):
                    return record[key]
        return None

    raw = path.read_text(encoding="utf-8")
    records = [json.loads(line) for line in raw.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(raw)
    for record in records if isinstance(records, list) else [records]:
        text = text_of(record)
        if text:
            yield text


def documents(spec: str) -> Iterator[str]:
    """Paragraph-sized documents from the files of a local corpus (or a streamed hf: one), in order."""
    if spec.startswith(HF):
        yield from hf_documents(spec)
        return
    for path in corpus_files(spec):
        if path.suffix in JSON_SUFFIXES:
            yield from _json_texts(path)
            continue
        block: list[str] = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                block.append(line.strip())
            elif block:
                yield " ".join(block)
                block = []
        if block:
            yield " ".join(block)


def file_windows(spec: str, tokenizer: PreTrainedTokenizerBase, tokens: int, max_length: int) -> list[list[int]]:
    """Documents tokenised and cut into windows of at most `max_length` tokens, `tokens` in all."""
    windows: list[list[int]] = []
    total = 0
    prefix = bos_prefix(tokenizer)
    stream: list[int] = []
    for doc in documents(spec):
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"]
        while len(stream) >= max_length - len(prefix):
            take = min(max_length - len(prefix), tokens - total)
            windows.append(prefix + stream[:take])
            stream = stream[take:]
            total += take
            if total >= tokens:
                return windows
    if stream and total < tokens:
        windows.append(prefix + stream[: tokens - total])
    return windows


def document_windows(spec: str, tokenizer: PreTrainedTokenizerBase, tokens: int, max_length: int, seed: int) -> list[list[int]]:
    """The authors' sampling (ROME/MEMIT `layer_stats`): documents drawn in a random order (their
    `random_sample=1` is seed 1), each truncated to one window of `max_length` tokens, until `tokens`.

    A local corpus is shuffled whole; a streamed hf: corpus through a 10,000-document shuffle
    buffer (the authors draw from the whole downloaded dataset, which streaming cannot).
    """
    prefix = bos_prefix(tokenizer)
    if spec.startswith(HF):
        texts: Iterator[str] = hf_documents(spec, shuffle_seed=seed)
    else:
        ordered = list(documents(spec))
        order = list(range(len(ordered)))
        random.Random(seed).shuffle(order)
        texts = (ordered[i] for i in order)
    windows: list[list[int]] = []
    total = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_length - len(prefix)]
        take = ids[: tokens - total]
        if not take:
            continue
        windows.append(prefix + take)
        total += len(take)
        if total >= tokens:
            break
    return windows


def self_windows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tokens: int,
    max_length: int,
    seed: int,
    batch: int = 16,
) -> Iterator[list[list[int]]]:
    """Windows sampled from the model (nucleus 0.95), one seed word per batch, until `tokens`."""
    from ..generate import Sampling, generate_rows, prompt_ids, seeded

    produced, step = 0, 0
    with seeded(model, seed):
        while produced < tokens:
            start = prompt_ids(tokenizer, SELF_SEED_WORDS[step % len(SELF_SEED_WORDS)])
            rows = min(batch, -(-(tokens - produced) // max_length))
            new = generate_rows(model, tokenizer, [start] * rows, max_length - len(start), Sampling(top_p=0.95), rows_per_pass=rows)
            # Cut each sample at its first end-of-text so padding after it is never counted.
            sampled = [start + _until_eos(row, tokenizer.eos_token_id) for row in new]
            sampled = [s[: len(start) + max(0, tokens - produced)] for s in sampled]
            produced += sum(len(s) for s in sampled)
            step += 1
            yield sampled


def _until_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


@dataclass(frozen=True)
class CorpusSpec:
    """Where the statistics' text comes from and how much of it to use."""

    corpus: str = SELF
    tokens: int = 20_000
    max_length: int = 256
    seed: int = 0
    batch_tokens: int = 4096
    # a text corpus: "stream" (documents in order, concatenated and cut into windows) or "documents"
    # (the authors': documents in a seeded random order, each truncated to one window)
    sampling: str = "stream"

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"corpus sampling must be one of {', '.join(SAMPLINGS)}, not {self.sampling!r}")

    @property
    def imported(self) -> Path | None:
        """The file of `import:FILE` (statistics another tool computed), else None."""
        return Path(self.corpus[len(IMPORT) :]) if self.corpus.startswith(IMPORT) else None

    @property
    def imports_projectors(self) -> bool:
        """Does it import AlphaEdit's null_space_project.pt (projectors only, no second moments)?"""
        return self.imported is not None and self.imported.suffix in (".pt", ".pth")

    def description(self) -> dict[str, str]:
        if self.imported is not None:
            # the file's contents decide; budget and windowing were the other tool's
            return {"corpus": IMPORT + content_digest(self.imported)[:16], "tokens": "-", "max_length": "-", "seed": "-"}
        described = {
            "corpus": describe(self.corpus),
            "tokens": str(self.tokens),
            "max_length": str(self.max_length),
            "seed": str(self.seed) if self.corpus == SELF or self.sampling == "documents" else "-",
        }
        if self.sampling != "stream" and self.corpus != SELF:  # absent for the default: earlier caches stay valid
            described["sampling"] = self.sampling
        return described
