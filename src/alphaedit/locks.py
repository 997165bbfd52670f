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

Both are `fcntl.flock` locks on a file in the folder. The operating system drops them when the
process ends, however it ends (SIGKILL included), so a killed run never leaves a stale lock to
clear by hand; the file stays, holding the last holder's description. Where the platform has no
flock (Windows), nothing is locked. Locks are per open file, so one process must not claim the
same lock file twice: the two kinds use different files.
"""

from __future__ import annotations

import os
import time
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


def claim_folder(folder: str | os.PathLike, purpose: str, *, lock_file: str = CLAIM_FILE, wait_s: float = 0.0) -> IO[str] | None:
    """Hold `folder` (created if missing) until the returned handle is closed or the process ends.

    `purpose` describes the holder to a refused process ("alphaedit eval"). Waits up to `wait_s`
    seconds for another holder, then raises FolderInUse naming it and the way out.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return None
    handle = open(folder / lock_file, "a+", encoding="utf-8")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise FolderInUse(
                    f"{folder} is in use by {holder}. Nothing was changed. Wait for that process to finish (or stop it: "
                    "a stopped or killed run resumes from its last committed batch), or use another folder"
                ) from None
            time.sleep(0.05)
    since = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{purpose} (pid {os.getpid()}, since {since})\n")
    handle.flush()
    return handle


@contextmanager
def folder_claimed(folder: str | os.PathLike, purpose: str, *, lock_file: str = CLAIM_FILE, wait_s: float = 0.0) -> Iterator[None]:
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
