"""Crash-safe file writing: a kill at any moment leaves the old file or the new one, never half.

Every file or folder that alphaedit commits goes through `commit` (an os.replace). For fault
injection, `ALPHAEDIT_FAULT_LOG=FILE` appends one line per commit point reached, and
`ALPHAEDIT_FAULT_AT=N` kills the process with SIGKILL just before the N-th (1-based), so a test
can enumerate every commit point of a command and kill it at each in turn.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def alphaedit_home() -> Path:
    """Where alphaedit keeps converted models, downloaded data and statistics ($ALPHAEDIT_HOME)."""
    return Path(os.environ.get("ALPHAEDIT_HOME", Path.home() / ".cache" / "alphaedit")).expanduser()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, in name order)."""
    path = Path(path)
    if not path.is_dir():
        return sha256(path)
    lines = "".join(f"{p.relative_to(path)}\t{sha256(p)}\n" for p in sorted(path.rglob("*")) if p.is_file())
    return hashlib.sha256(lines.encode()).hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class _FaultInjection:
    """Counts commit points in this process (read from the environment once, at import)."""

    def __init__(self) -> None:
        self.log = os.environ.get("ALPHAEDIT_FAULT_LOG")
        self.kill_at = int(os.environ.get("ALPHAEDIT_FAULT_AT", "0"))
        self.reached = 0

    def point(self, target: os.PathLike | str) -> None:
        if not (self.log or self.kill_at):
            return
        self.reached += 1
        if self.log:
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(f"{self.reached}\t{target}\n")
        if self.reached == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


_faults = _FaultInjection()


def commit(source: os.PathLike | str, target: os.PathLike | str) -> None:
    """os.replace a fully written file or folder onto its final name: the one way anything is committed."""
    _faults.point(target)
    os.replace(source, target)


def _replace_from_temp(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_file(Path(tmp))
        commit(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    _replace_from_temp(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _replace_from_temp(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))
