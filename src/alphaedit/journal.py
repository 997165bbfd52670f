"""The edit journal: an append-only record of every batch, on disk, that survives any crash.

    STATE/journal.json              the index, rewritten atomically: it is the commit point
    STATE/header.json               a copy of the index's header (model, layout, config, ...)
    STATE/batches/000000/           one folder per applied batch
        requests.json               the batch's requests (MEMIT form), then any earlier ones it
                                    wrote again (rehearsal; report.json says how many)
        report.json                 timings and edit-time metrics
        update.safetensors          per layer: Δ = left @ rightᵀ (rank ≤ the batch's forms: its
                                    requests and, with chat-aware editing other than chat_values "trained", their chat forms), RECT's
                                    mask of it where the method has one, the keys the batch
                                    added to C_p, and with a warm-started rehearsal the z each
                                    written request was optimised to ("values")
        manifest.json               the batch id and the sha256 of the three files above
    STATE/reverts/000003.json       one per revert: when, and where it sits among the entries
    STATE/.journal-write.lock       the write lock (locks.py): one line naming its last holder;
                                    .alphaedit.lock names the command that holds the state, while it runs

A batch folder is written under a temporary name, renamed into place, and only then listed in
the index, so a kill at any moment leaves the journal with or without the whole batch. Every
file's sha256 is in the index and checked on open. The index is JSON, tensors are safetensors:
nothing is unpickled, and entry paths are validated so none can point outside the journal.
Reverting a batch appends a "revert" entry; nothing already written is ever changed.

The header copy, the manifests and the revert files make the state self-describing: if
journal.json is lost, `Journal.recover` (`alphaedit recover`) rebuilds it from them, checking
every file against its manifest. A folder that holds batches but no journal.json is never
taken for a new state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .files import atomic_write_text, commit, fsync_file, sha256

JOURNAL_FORMAT = 1
INDEX = "journal.json"
HEADER = "header.json"
MANIFEST = "manifest.json"
BATCH_DIR = re.compile(r"^batches/\d{6}$")
BATCH_NAME = re.compile(r"^\d{6}$")
REVERT_NAME = re.compile(r"^(\d{6})\.json$")
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
        self.damaged_index: Path | None = None  # where `recover` kept a journal.json it could not open

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def exists(cls, root: str | os.PathLike) -> bool:
        return (Path(root) / INDEX).exists()

    @classmethod
    def check_new(cls, root: str | os.PathLike) -> None:
        """Refuse to start a journal where one was lost: batch folders without journal.json."""
        path = Path(root)
        if path.exists() and not path.is_dir():
            raise JournalError(f"--state {path} is a file; a state is a folder (give a new or existing folder)")
        batches = path / "batches"
        found = sorted(c.name for c in batches.iterdir() if BATCH_NAME.match(c.name)) if batches.is_dir() else []
        if found and not cls.exists(path):
            raise JournalError(
                f"{path} holds {len(found)} batch folder(s) ({found[0]}..{found[-1]}) but no {INDEX}: the state is damaged. "
                f"Nothing was changed. Rebuild the journal from the batch folders with `alphaedit recover --state {path}`, "
                "or give a new folder"
            )

    @classmethod
    def create(cls, root: str | os.PathLike, header: dict[str, Any]) -> Journal:
        path = Path(root)
        if cls.exists(path):
            raise JournalError(f"{path} already holds a journal; open it to continue")
        cls.check_new(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / HEADER, json.dumps(header, indent=1))
        journal = cls(path, {"format": JOURNAL_FORMAT, "header": header, "entries": []})
        journal._write_index()
        return journal

    @classmethod
    def recover(cls, root: str | os.PathLike) -> Journal:
        """Rebuild a lost or damaged journal.json from header.json, the batch manifests and the
        revert files.

        Every batch file is checked against its manifest and the batch ids must run 0, 1, 2, ...
        without a gap; anything else is refused with the reason, and nothing is written. A
        journal.json that cannot be opened is kept, moved aside (`damaged_index` names where),
        once the rebuilt one is complete; one that opens is left alone.
        """
        path = Path(root)
        damaged = False
        if cls.exists(path):
            try:
                cls.open(path)
            except JournalError:
                damaged = True
            else:
                raise JournalError(f"{path} already has a {INDEX} that opens; nothing to recover (`alphaedit log` reads it)")
        if not (path / HEADER).is_file():
            raise JournalError(f"{path} has no {HEADER} (written by alphaedit since 2026-12-02): the journal cannot be rebuilt")
        try:
            header = json.loads((path / HEADER).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise JournalError(f"{path / HEADER} is not valid JSON ({e.msg}); the journal cannot be rebuilt") from e
        batches_dir = path / "batches"
        names = sorted(c.name for c in batches_dir.iterdir() if BATCH_NAME.match(c.name)) if batches_dir.is_dir() else []
        batches = []
        for expected, name in enumerate(names):
            if int(name) != expected:
                raise JournalError(f"{batches_dir}: batch {expected} is missing (the next folder is {name}); the journal cannot be rebuilt")
            folder = batches_dir / name
            try:
                manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise JournalError(f"batch {expected}: {folder / MANIFEST} is missing or unreadable ({e}); the journal cannot be rebuilt") from e
            for file in BATCH_FILES:
                if not (folder / file).is_file() or sha256(folder / file) != (manifest.get("files") or {}).get(file):
                    raise JournalError(f"batch {expected}: {folder / file} is missing or does not match its manifest; the journal cannot be rebuilt")
            batches.append({"kind": "batch", "id": expected, "path": f"batches/{name}", "files": manifest["files"]})
        reverts = []
        for child in sorted((path / "reverts").iterdir()) if (path / "reverts").is_dir() else []:
            if REVERT_NAME.match(child.name):
                try:
                    record = json.loads(child.read_text(encoding="utf-8"))
                    reverts.append({"kind": "revert", "batch": record["batch"], "time": record["time"], "position": int(record["position"])})
                except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise JournalError(f"{child} is unreadable or lacks a field ({e!r}); the journal cannot be rebuilt — "
                                       "move the file aside to rebuild without that revert") from e
        entries: list[dict[str, Any]] = []
        pending = sorted(reverts, key=lambda r: r["position"])
        for batch in batches:
            while pending and pending[0]["position"] <= len(entries):
                entries.append({k: v for k, v in pending.pop(0).items() if k != "position"})
            entries.append(batch)
        entries += [{k: v for k, v in r.items() if k != "position"} for r in pending]
        journal = cls(path, {"format": JOURNAL_FORMAT, "header": header, "entries": entries})
        journal._verify()
        if damaged:  # kept for whoever wants to see what went wrong
            journal.damaged_index = path / f"{INDEX}.damaged-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
            os.replace(path / INDEX, journal.damaged_index)
        atomic_write_text(path / INDEX, json.dumps(journal.index, indent=1))
        journal._stamp = journal._index_stamp()
        return journal

    @classmethod
    def open(cls, root: str | os.PathLike) -> Journal:
        """Open and verify: format, entry paths and every file's checksum."""
        path = Path(root)
        if not cls.exists(path):
            cls.check_new(path)  # batch folders without a journal: damaged, and `recover` is the way out
            raise JournalError(f"{path} is not an alphaedit state: it has no {INDEX}")
        try:
            index = json.loads((path / INDEX).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise JournalError(f"{path / INDEX} is not valid JSON ({getattr(e, 'msg', e)}); the journal is damaged. If the batch "
                               f"folders are intact, `alphaedit recover --state {path}` rebuilds it (keeping this one aside)") from e
        if not isinstance(index, dict) or index.get("format") != JOURNAL_FORMAT:
            found = index.get("format") if isinstance(index, dict) else type(index).__name__
            raise JournalError(f"{path / INDEX}: unsupported journal format {found!r} (this alphaedit reads {JOURNAL_FORMAT})")
        for key, kind in (("header", dict), ("entries", list)):
            if not isinstance(index.get(key), kind):
                raise JournalError(
                    f"{path / INDEX} has no valid '{key}' ({kind.__name__}); the journal is damaged. "
                    f"If the batch folders are intact, `alphaedit recover --state {path}` rebuilds it (keeping this one aside)"
                )
        journal = cls(path, index)
        journal._verify()
        return journal

    def _verify(self) -> None:
        seen: set[int] = set()
        for position, entry in enumerate(self.entries):
            if not isinstance(entry, dict):
                raise JournalError(f"{self.root / INDEX}: entry {position} is a {type(entry).__name__}, not an object; the journal is damaged")
            if entry.get("kind") == "batch":
                if not isinstance(entry.get("id"), int):
                    raise JournalError(f"{self.root / INDEX}: entry {position} is a batch without an id; the journal is damaged")
                if not isinstance(entry.get("path"), str) or not BATCH_DIR.match(entry["path"]):
                    raise JournalError(f"{self.root / INDEX}: batch {entry.get('id')} has an invalid path {entry.get('path')!r}")
                for name in BATCH_FILES:
                    file = self.root / entry["path"] / name
                    if not file.is_file():
                        raise JournalError(f"batch {entry.get('id')}: {file} is missing; the journal is damaged")
                    if not isinstance(entry.get("files"), dict) or sha256(file) != entry["files"].get(name):
                        raise JournalError(f"batch {entry.get('id')}: {file} does not match its checksum in {INDEX}; the journal is corrupted")
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

    def applied_batch_ids(self) -> list[int]:
        """The batches the model carries, in order: every batch but the reverted ones."""
        reverted = self.reverted()
        return [i for i in self.batch_ids() if i not in reverted]

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
            # the batch describes itself, so a lost index can be rebuilt (Journal.recover)
            (staging / MANIFEST).write_text(json.dumps({"id": batch_id, "files": files}, indent=1), encoding="utf-8")
            fsync_file(staging / MANIFEST)
            commit(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.entries.append({"kind": "batch", "id": batch_id, "path": relative, "files": files})
        self._write_index()

    def append_revert(self, batch_id: int, time: str) -> None:
        if batch_id not in self.batch_ids():
            raise JournalError(f"{self.root} has no batch {batch_id}; `alphaedit log` lists the batches")
        if batch_id in self.reverted():
            raise JournalError(f"batch {batch_id} is already reverted")
        record = {"batch": batch_id, "time": time, "position": len(self.entries)}
        atomic_write_text(self.root / "reverts" / f"{batch_id:06d}.json", json.dumps(record))
        self.entries.append({"kind": "revert", "batch": batch_id, "time": time})
        self._write_index()

    def _write_index(self) -> None:
        if not (self.root / HEADER).exists():  # a state written before header.json existed
            atomic_write_text(self.root / HEADER, json.dumps(self.header, indent=1))
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
        """Staging folders, uncommitted batch folders and revert files, and temporary index files
        from an interrupted run (only ever called right after this index was committed)."""
        for stale in self.root.glob(f".{INDEX}*.tmp"):
            stale.unlink(missing_ok=True)
        batches = self.root / "batches"
        if batches.is_dir():
            committed = {e["path"] for e in self.entries if e["kind"] == "batch"}
            for child in batches.iterdir():
                if f"batches/{child.name}" not in committed:
                    shutil.rmtree(child, ignore_errors=True)
        reverts = self.root / "reverts"
        if reverts.is_dir():
            reverted = self.reverted()
            for child in reverts.iterdir():
                match = REVERT_NAME.match(child.name)
                if not match or int(match.group(1)) not in reverted:
                    child.unlink(missing_ok=True)

