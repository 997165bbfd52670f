"""The edit journal: an append-only record of every batch, on disk, that survives any crash.

    STATE/journal.json              the index, rewritten atomically: it is the commit point
    STATE/batches/000000/           one folder per applied batch
        requests.json               the batch's requests (MEMIT form)
        report.json                 timings and edit-time metrics
        update.safetensors          per layer: Δ = left @ rightᵀ (rank ≤ batch size) and the
                                    keys the batch added to C_p

A batch folder is written under a temporary name, renamed into place, and only then listed in
the index, so a kill at any moment leaves the journal with or without the whole batch. Every
file's sha256 is in the index and checked on open. The index is JSON, tensors are safetensors:
nothing is unpickled, and entry paths are validated so none can point outside the journal.
Reverting a batch appends a "revert" entry; nothing already written is ever changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .files import atomic_write_text, fsync_file, sha256

JOURNAL_FORMAT = 1
INDEX = "journal.json"
BATCH_DIR = re.compile(r"^batches/\d{6}$")
BATCH_FILES = ("requests.json", "report.json", "update.safetensors")


class JournalError(ValueError):
    """A journal is missing, corrupted, or does not belong to the model at hand."""


@dataclass
class BatchFiles:
    """One committed batch as stored: its tensors are read on demand."""

    id: int
    path: Path
    requests: list[dict]
    report: dict[str, Any]

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / "update.safetensors"))


class Journal:
    """Read and append to the journal in one state folder."""

    def __init__(self, root: Path, index: dict[str, Any]):
        self.root = root
        self.index = index
        self._stamp: tuple[int, int] | None = self._index_stamp() if (root / INDEX).exists() else None

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def exists(cls, root: str | os.PathLike) -> bool:
        return (Path(root) / INDEX).exists()

    @classmethod
    def create(cls, root: str | os.PathLike, header: dict[str, Any]) -> Journal:
        path = Path(root)
        if cls.exists(path):
            raise JournalError(f"{path} already holds a journal; open it to continue")
        path.mkdir(parents=True, exist_ok=True)
        journal = cls(path, {"format": JOURNAL_FORMAT, "header": header, "entries": []})
        journal._write_index()
        return journal

    @classmethod
    def open(cls, root: str | os.PathLike) -> Journal:
        """Open and verify: format, entry paths and every file's checksum."""
        path = Path(root)
        if not cls.exists(path):
            raise JournalError(f"{path} is not an alphaedit state: it has no {INDEX}")
        try:
            index = json.loads((path / INDEX).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise JournalError(f"{path / INDEX} is not valid JSON ({e.msg}); the journal is corrupted") from e
        if index.get("format") != JOURNAL_FORMAT:
            raise JournalError(f"{path / INDEX}: unsupported journal format {index.get('format')!r} (this alphaedit reads {JOURNAL_FORMAT})")
        journal = cls(path, index)
        journal._verify()
        return journal

    def _verify(self) -> None:
        seen: set[int] = set()
        for entry in self.entries:
            if entry.get("kind") == "batch":
                if not isinstance(entry.get("path"), str) or not BATCH_DIR.match(entry["path"]):
                    raise JournalError(f"{self.root / INDEX}: batch {entry.get('id')} has an invalid path {entry.get('path')!r}")
                for name in BATCH_FILES:
                    file = self.root / entry["path"] / name
                    if not file.is_file():
                        raise JournalError(f"batch {entry['id']}: {file} is missing; the journal is damaged")
                    if sha256(file) != entry["files"][name]:
                        raise JournalError(f"batch {entry['id']}: {file} does not match its checksum in {INDEX}; the journal is corrupted")
                seen.add(entry["id"])
            elif entry.get("kind") == "revert":
                if entry.get("batch") not in seen:
                    raise JournalError(f"{self.root / INDEX}: a revert names batch {entry.get('batch')!r}, which is not committed before it")
            else:
                raise JournalError(f"{self.root / INDEX}: unknown entry kind {entry.get('kind')!r}")

    # -- reading -----------------------------------------------------------------------------

    @property
    def header(self) -> dict[str, Any]:
        return self.index["header"]

    @property
    def entries(self) -> list[dict[str, Any]]:
        return self.index["entries"]

    def batch_ids(self) -> list[int]:
        return [e["id"] for e in self.entries if e["kind"] == "batch"]

    def reverted(self) -> set[int]:
        return {e["batch"] for e in self.entries if e["kind"] == "revert"}

    def batch(self, batch_id: int) -> BatchFiles:
        for entry in self.entries:
            if entry["kind"] == "batch" and entry["id"] == batch_id:
                folder = self.root / entry["path"]
                return BatchFiles(
                    batch_id,
                    folder,
                    json.loads((folder / "requests.json").read_text(encoding="utf-8")),
                    json.loads((folder / "report.json").read_text(encoding="utf-8")),
                )
        raise JournalError(f"{self.root} has no batch {batch_id}; `alphaedit log` lists the batches")

    # -- appending ---------------------------------------------------------------------------

    def append_batch(self, batch_id: int, requests: list[dict], report: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Write the batch folder under a temporary name, rename it into place, then commit."""
        if batch_id in self.batch_ids():
            raise JournalError(f"batch {batch_id} is already in {self.root}")
        relative = f"batches/{batch_id:06d}"
        final = self.root / relative
        final.parent.mkdir(exist_ok=True)
        if final.exists():  # left by a crash after the rename and before the commit: never committed
            shutil.rmtree(final)
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{batch_id:06d}-"))
        try:
            (staging / "requests.json").write_text(json.dumps(requests, indent=1), encoding="utf-8")
            (staging / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / "update.safetensors"))
            for name in BATCH_FILES:
                fsync_file(staging / name)
            files = {name: sha256(staging / name) for name in BATCH_FILES}
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.entries.append({"kind": "batch", "id": batch_id, "path": relative, "files": files})
        self._write_index()

    def append_revert(self, batch_id: int, time: str) -> None:
        if batch_id not in self.batch_ids():
            raise JournalError(f"{self.root} has no batch {batch_id}; `alphaedit log` lists the batches")
        if batch_id in self.reverted():
            raise JournalError(f"batch {batch_id} is already reverted")
        self.entries.append({"kind": "revert", "batch": batch_id, "time": time})
        self._write_index()

    def _write_index(self) -> None:
        atomic_write_text(self.root / INDEX, json.dumps(self.index, indent=1))
        self._stamp = self._index_stamp()
        self._remove_leftovers()

    def _index_stamp(self) -> tuple[int, int]:
        stat = (self.root / INDEX).stat()
        return stat.st_mtime_ns, stat.st_size

    def unchanged_on_disk(self) -> bool:
        """True while nobody else has rewritten the index since this object last read or wrote it."""
        return (self.root / INDEX).exists() and self._index_stamp() == self._stamp

    def _remove_leftovers(self) -> None:
        """Staging folders and uncommitted batch folders from an interrupted run."""
        batches = self.root / "batches"
        if not batches.is_dir():
            return
        committed = {e["path"] for e in self.entries if e["kind"] == "batch"}
        for child in batches.iterdir():
            if f"batches/{child.name}" not in committed:
                shutil.rmtree(child, ignore_errors=True)

