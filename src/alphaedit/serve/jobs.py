"""An edit job of `alphaedit serve`: one submission of requests, applied batch after batch.

A job only records where it is; the workbench's single worker thread runs it. Every change
bumps `version`, which the server-sent-events stream waits on.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

from ..batch import EditProgress
from ..requests import EditRequest


@dataclass
class Job:
    requests: list[EditRequest]
    batch_size: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    status: str = "queued"  # queued | running | done | failed
    phase: str = "queued"  # the editor's phase while running (EditProgress.phase)
    batch: int = 0  # the batch being applied, from 1
    done: int = 0  # units of work done (z iterations and layer updates) of `total`
    total: int = 0
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    batch_ids: list[int] = field(default_factory=list)  # journal ids of the committed batches
    version: int = 0
    _editing_since: tuple[float, int] | None = None  # (time, units done) when the first batch began
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def batches(self) -> int:
        return -(-len(self.requests) // self.batch_size)

    @property
    def finished_or_failed(self) -> bool:
        return self.status in ("done", "failed")

    def eta(self) -> float | None:
        """Seconds left, from the pace since editing began (statistics, measured once, excluded)."""
        if self.status != "running" or self._editing_since is None:
            return None
        since, units = self._editing_since
        pace = (time.time() - since) / max(self.done - units, 1e-9)
        return None if self.done <= units else pace * (self.total - self.done)

    # -- changes, each announced to waiting streams ------------------------------------------

    def _announce(self) -> None:
        with self._changed:
            self.version += 1
            self._changed.notify_all()

    def start(self, units_per_batch: int) -> None:
        self.status, self.phase, self.started, self.total = "running", "starting", time.time(), self.batches * units_per_batch
        self._announce()

    def progress(self, batch: int, units_before: int, p: EditProgress) -> None:
        """The editor's progress within batch `batch` (whose units start at `units_before`)."""
        self.phase, self.batch, self.done = p.phase, batch, units_before + p.done
        if p.phase == "editing" and self._editing_since is None:
            self._editing_since = (time.time(), self.done)
        self._announce()

    def committed(self, batch_id: int) -> None:
        self.batch_ids.append(batch_id)
        self._announce()

    def finish(self, error: str | None = None) -> None:
        self.status, self.error, self.finished = ("failed" if error else "done"), error, time.time()
        self.phase = self.status
        if not error:
            self.done = self.total
        self._announce()

    def wait_for_change(self, seen: int, timeout: float) -> int:
        """Block until `version` passes `seen` (or `timeout` seconds); the version now."""
        with self._changed:
            self._changed.wait_for(lambda: self.version > seen, timeout)
            return self.version

    def to_dict(self) -> dict:
        eta = self.eta()
        return {
            "id": self.id,
            "status": self.status,
            "phase": self.phase,
            "requests": len(self.requests),
            "batch_size": self.batch_size,
            "batch": self.batch,
            "batches": self.batches,
            "done": self.done,
            "total": self.total,
            "fraction": self.done / self.total if self.total else 0.0,
            "eta_seconds": None if eta is None else round(eta, 1),
            "submitted": self.submitted,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
            "batch_ids": list(self.batch_ids),
            "subjects": [r.subject for r in self.requests[:20]],
        }
