"""One applied batch, as the editor keeps it and the journal stores it: its report, requests and updates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import torch

from .requests import EditRequest
from .updates import Update, update_from_tensors


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class BatchReport:
    """What one applied batch did; kept in the editor's history and saved with its state."""

    index: int
    requests: int
    started: str  # ISO 8601, UTC
    seconds: float
    z_loss: float  # mean final loss of the z optimisation
    z_steps: float  # mean Adam steps per request
    target_prob: float  # mean target-token probability reached at the z layer
    efficacy: float | None  # fraction of requests whose new object beats the true one after the edit
    delta_norms: dict[str, float] = field(default_factory=dict)  # layer -> ‖Δ‖_F
    # wall-clock split of `seconds`: "z" (target values), "keys" (key passes), "solve" (closed
    # forms and weight writes), "check" (the efficacy probe)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    target_nll: float | None = None  # mean final NLL of the target tokens (absent in journals before 2026-12-02)
    # Monitoring (issue 14; absent in journals before 2026-12-03). After the batch, per edited layer:
    # ‖W‖_F / ‖W_base‖_F and σ_max(W) / σ_max(W_base) -- unbounded growth of these is what precedes
    # collapse in long sequences; the target values: mean ‖z_i‖ and mean ‖δ_i‖ / ‖h0_i‖; and the
    # rank of the null space each layer's update is projected onto.
    weight_growth: dict[str, dict[str, float]] = field(default_factory=dict)
    value_norm: float | None = None
    value_shift: float | None = None
    null_space_rank: dict[str, int] = field(default_factory=dict)
    value_reference: float | None = None  # NAS's μ (EditConfig.value_anchor), measured on the first batch
    values_dropped: int = 0  # requests whose anchored value was dropped (‖v*‖ > 2μ): their edit not written
    kept_columns: int = 0  # zero-change columns in the solve: kept subjects' forms (EditRequest.keep_subjects)
    # rehearsal (EditConfig.rehearse): the share of the earlier requests still standing whose edit
    # held before this batch (the efficacy test), and how many lapsed ones it wrote again; `requests`
    # and `efficacy` count the batch's own requests only
    earlier_held: float | None = None
    rehearsed: int = 0
    rehearsed_z_steps: float | None = None  # the rehearsed requests' mean z steps (z_steps is over every form)
    # the counts behind rehearsal.outlook (absent in journals of older code): the earlier requests
    # that had lapsed at this batch's check, and of the requests the last rehearsing batch wrote
    # again (still standing) how many were counted and how many of them had lapsed again
    earlier_lapsed: int | None = None
    rewrites_counted: int = 0
    rewrites_lapsed: int = 0


@dataclass(frozen=True)
class EditProgress:
    """Where `Editor.edit` is: its phase ("statistics", "context templates", "rehearsal check",
    "editing", "guard check", "committing", "done"), the batch (from 1) of `batches`, and units of
    work done of `total` (one per z iteration and per layer update; early-stopped iterations count
    as done)."""

    phase: str
    batch: int
    batches: int
    done: int
    total: int

    def at(self, phase: str, **changes: int) -> EditProgress:
        return replace(self, phase=phase, **changes)


@dataclass
class AppliedBatch:
    """One batch as applied: enough to save, replay or revert it."""

    report: BatchReport
    requests: list[EditRequest]
    deltas: dict[int, Update]  # layer -> Δ (math orientation): low-rank factors, masked for RECT
    keys: dict[int, torch.Tensor]  # layer -> [u, d0] keys added to C_p (empty if the method keeps none)
    reverted: bool = False
    rehearsed: list[EditRequest] = field(default_factory=list)  # earlier requests written again with it
    # [len(written), d] the z each written request's prompt was optimised to (before any NAS
    # anchoring), kept for a warm-started rehearsal (EditConfig.rehearse_warm); None otherwise
    values: torch.Tensor | None = None

    @property
    def written(self) -> list[EditRequest]:
        """Every request the batch's update was solved for: its own, then the rehearsed ones (the
        order of the columns of its keys, and of requests.json in the journal)."""
        return [*self.requests, *self.rehearsed]

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for layer, delta in self.deltas.items():
            tensors.update(delta.tensors(f"layer.{layer}"))
        tensors.update({f"layer.{layer}.keys": k for layer, k in self.keys.items()})
        if self.values is not None:
            tensors["values"] = self.values
        return tensors

    @classmethod
    def from_tensors(cls, report: BatchReport, written: list[EditRequest], tensors: dict[str, torch.Tensor], layers: Sequence[int]) -> AppliedBatch:
        """The batch from its journal files; `written` as `AppliedBatch.written` lists them."""
        deltas = {l: update_from_tensors(tensors, f"layer.{l}") for l in layers}
        keys = {l: tensors[f"layer.{l}.keys"] for l in layers if f"layer.{l}.keys" in tensors}
        own = len(written) - report.rehearsed
        return cls(report, written[:own], deltas, keys, rehearsed=written[own:], values=tensors.get("values"))
