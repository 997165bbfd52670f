"""One writer per folder: advisory locks on state and run folders.

Two processes writing the same journal would each commit an index that lacks the other's batch,
and each would then delete the other's batch folder as a leftover of a crash; two `eval --resume`
of one run would interleave their batches. So:

- a command that writes a folder for as long as it runs (`edit --state`, `serve`, `revert`,
  `recover`, `eval --out/--resume`) *claims* it first and is refused at once, before anything
  changes, while another live process holds it; the refusal names that process;
- every journal write (`Editor.save_state`, a revert, a recovery) also takes the journal's own
  short *write lock*, waiting for another writer's write to end, so library users who share a
  state between processes get the journal's "different edit history" error instead of a loss.

Both are `fcntl.flock` locks, which the operating system drops when the process ends, however
it ends (SIGKILL included), so a killed run never leaves a stale lock to clear by hand. A claim
locks the folder itself and, while held, keeps one line naming its holder in `.alphaedit.lock`
(removed on release, so a command refused for bad input after claiming leaves the folder as it
was; a killed holder's line stays until the next holder rewrites it, and is only read by a process
refused while someone holds the lock). The write lock is a file of its own, `.journal-write.lock`, kept: one process may hold a claim
and a write lock on the same folder, which two flocks on the folder itself would not allow. Where
the platform has no flock (Windows), nothing is locked.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the journal's history check still applies
    fcntl = None

CLAIM_FILE = ".alphaedit.lock"
JOURNAL_WRITE_FILE = ".journal-write.lock"


class FolderInUse(ValueError):
    """Another live process holds the folder."""


class Claim:
    """A held claim (claim_folder); `close` releases it."""

    def __init__(self, folder: Path, lock: int | IO[str], note: Path | None):
        self.folder, self._lock, self._note = folder, lock, note

    def close(self) -> None:
        if self._lock is None:
            return
        if self._note is not None:
            self._note.unlink(missing_ok=True)  # before the release: the next holder's line is never removed
        _release(self._lock)
        self._lock = None


def _release(lock: int | IO[str]) -> None:
    """Closing the descriptor (the folder's) or the file is what drops a flock."""
    if isinstance(lock, int):
        os.close(lock)
    else:
        lock.close()


def claim_folder(folder: str | os.PathLike, purpose: str, *, lock_file: str | None = None, wait_s: float = 0.0) -> Claim | None:
    """Hold `folder` (created if missing) until the returned claim is closed or the process ends.

    Locks the folder itself, or, with `lock_file`, that file in it (created and kept). `purpose`
    describes the holder to a refused process ("alphaedit eval"). Waits up to `wait_s` seconds for
    another holder, then raises FolderInUse naming it and the way out. None where nothing is locked.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return None
    note = folder / (lock_file or CLAIM_FILE)
    lock = open(note, "a+", encoding="utf-8") if lock_file else os.open(folder, os.O_RDONLY)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                _release(lock)
                holder = note.read_text(encoding="utf-8").strip() if note.exists() else ""
                raise FolderInUse(
                    f"{folder} is in use by {holder or 'another process'}. Nothing was changed. Wait for that process to finish "
                    "(or stop it: a stopped or killed run resumes from its last committed batch), or use another folder"
                ) from None
            time.sleep(0.05)
        except OSError as e:  # a file system without flock (NFS locks no directory, ENOLCK): no guard, said once
            _release(lock)
            warnings.warn(f"{folder}: cannot lock it here ({e.strerror}); alphaedit carries on without the guard "
                          "against a second process writing the same folder", stacklevel=2)
            return None
    try:
        since = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        note.write_text(f"{purpose} (pid {os.getpid()}, since {since})\n", encoding="utf-8")
    except BaseException:
        _release(lock)  # never keep a lock nobody can release
        raise
    return Claim(folder, lock, None if lock_file else note)


@contextmanager
def folder_claimed(folder: str | os.PathLike, purpose: str, *, lock_file: str | None = None, wait_s: float = 0.0) -> Iterator[None]:
    """`claim_folder` for the length of a `with` block."""
    handle = claim_folder(folder, purpose, lock_file=lock_file, wait_s=wait_s)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


def journal_write_lock(root: str | os.PathLike) -> AbstractContextManager[None]:
    """The journal's write lock (see the module docstring): another writer's write is waited for,
    for up to two minutes (a batch's files take seconds to write)."""
    return folder_claimed(root, "a journal write", lock_file=JOURNAL_WRITE_FILE, wait_s=120.0)
