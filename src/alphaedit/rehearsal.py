"""Rehearsal (EditConfig.rehearse; not in the paper): before a batch, every earlier edit still
standing is checked, and the lapsed ones are written again with the batch.

Later batches undo some of what earlier ones wrote (on SmolLM2 about one edit in ten over 2,000
CounterFact edits, BENCHMARKS.md). The journal holds every request, so the editor can find those
whose edit no longer holds and write them again as extra columns of the next batch.

    standing = the latest edit of each (subject, prompt), its batch not reverted, oldest first
    holds    = the efficacy test on the model now (edit_holds)
    lapsed   = choose_lapsed(standing, holds, batch, most): not held, not in conflict, oldest
               first, at most `most` (EditConfig.rehearse_cap; by default as many as the batch has)
    f        = of the requests the latest batch wrote again (still standing), the share not held

f says whether rehearsal keeps up. With κ the edits lapsed per column a batch writes, a backlog B of
re-writes settles where B = f·B + κ·(new + B), and runs away as f + κ nears 1: on SmolLM2 past
7,000 edits, as f passed one half (BENCHMARKS.md).

The lapsed requests are written as more columns of the batch, their z optimised as the batch's
own, from δ = 0 or (EditConfig.rehearse_warm) from the value each was last written with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .batch import AppliedBatch
from .layouts import Layout
from .requests import EditRequest
from .teacher_forcing import continuation_accuracy, prefers_new


# The backlog is said to run away when, pooled over the last RUNAWAY_BATCHES batches whose check
# counted re-writes, fewer than half of at least RUNAWAY_REWRITES re-writes held: one batch's share
# swings by about ±0.09 at 30 re-writes around the 0.65 SmolLM2 held through 3,000 edits, five
# batches' by ±0.04, so a steady rehearsal is not mistaken for a runaway one
RUNAWAY_BATCHES = 5
RUNAWAY_REWRITES = 50


@dataclass
class Rehearsal:
    """Before a rehearsing batch: the earlier requests it writes again and the check's result."""

    lapsed: list[EditRequest]  # earlier requests whose edit no longer holds, oldest first
    held: float | None  # the share of the earlier requests still standing whose edit held
    seconds: float  # the check's time
    # of the requests the latest applied batch wrote again and still standing, the share that held
    # (1 − f above) and how many; None where it wrote none again
    rewrites_held: float | None = None
    rewrites_counted: int = 0


def edit_holds(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
               layout: Layout | None = None) -> list[bool]:
    """Per request: does its edit hold on the model now? The batch report's efficacy test: the new
    object preferred over the true one (lower mean token NLL); where no true object is known
    (zsRE), every target token top-1."""
    holds = [False] * len(requests)
    known = [i for i, r in enumerate(requests) if r.target_true]
    if known:
        wins = prefers_new(model, tokenizer, [requests[i].text() for i in known], [requests[i].target_new for i in known],
                           [requests[i].target_true for i in known], layout=layout)
        for i, win in zip(known, wins.tolist()):
            holds[i] = bool(win)
    unknown = [i for i, r in enumerate(requests) if not r.target_true]
    if unknown:
        accuracy = continuation_accuracy(model, tokenizer, [requests[i].text() for i in unknown],
                                         [requests[i].target_new for i in unknown], layout=layout)
        for i, a in zip(unknown, accuracy):
            holds[i] = a == 1.0
    return holds


def standing_requests(batches: Sequence[AppliedBatch]) -> list[EditRequest]:
    """The requests still standing: the latest edit of each (subject, prompt) whose batch is not
    reverted, ordered by that latest edit (a batch's rehearsed requests are re-writes, not edits)."""
    standing: dict[tuple[str, str], EditRequest] = {}
    for applied in batches:
        if applied.reverted:
            continue
        for request in applied.requests:
            standing.pop((request.subject, request.prompt), None)  # re-inserted: ordered by its latest edit
            standing[(request.subject, request.prompt)] = request
    return list(standing.values())


def choose_lapsed(earlier: list[EditRequest], holds: list[bool], batch: list[EditRequest], most: int = 0) -> list[EditRequest]:
    """Of the earlier requests still standing (oldest first) and whether each holds, those to write
    again with `batch`: the lapsed ones, oldest first, at most `most` (0: as many as the batch has), leaving
    out any that would conflict with it (about a subject the batch edits or keeps, or keeping a
    subject it edits) or that a newer standing request contradicts (it edits what the older one
    keeps, or keeps what it edits; the newer fact wins, held or not)."""
    named = {r.subject for r in batch} | {s for r in batch for s in r.keep_subjects}
    edited: set[tuple[str, str]] = set()  # (subject, prompt) of the standing requests newer than the one looked at
    kept: set[tuple[str, str]] = set()
    chosen: list[EditRequest] = []
    for request, held in reversed(list(zip(earlier, holds))):
        keeps = {(s, request.prompt) for s in request.keep_subjects}
        contradicted = (request.subject, request.prompt) in kept or bool(keeps & edited)
        edited.add((request.subject, request.prompt))
        kept |= keeps
        if held or contradicted or request.subject in named or named.intersection(request.keep_subjects):
            continue
        chosen.append(request)
    return chosen[::-1][: most or len(batch)]


def rehearsal_for(batches: Sequence[AppliedBatch], batch: list[EditRequest],
                  check: Callable[[list[EditRequest]], list[bool]], most: int = 0) -> Rehearsal:
    """What to rehearse with `batch`, after the applied `batches`: the standing requests checked by
    `check` (edit_holds on the model as it is), the lapsed ones chosen by choose_lapsed (at most `most`)."""
    start = time.perf_counter()
    earlier = standing_requests(batches)
    if not earlier:
        return Rehearsal([], None, time.perf_counter() - start)
    holds = check(earlier)
    rewrites = rewrites_holding(batches, earlier, holds)
    return Rehearsal(choose_lapsed(earlier, holds, batch, most), sum(holds) / len(holds), time.perf_counter() - start,
                     sum(rewrites) / len(rewrites) if rewrites else None, len(rewrites))


def rewrites_holding(batches: Sequence[AppliedBatch], earlier: list[EditRequest], holds: list[bool]) -> list[bool]:
    """Per request the latest applied batch wrote again that still stands (`earlier`, checked as
    `holds`): does it hold? One replaced since by a newer edit of its subject and prompt is not
    counted, nor are the re-writes of a reverted batch (the latest applied one's are)."""
    latest = next((applied for applied in reversed(batches) if not applied.reverted), None)
    if latest is None:
        return []
    held = dict(zip(earlier, holds))
    return [held[request] for request in latest.rehearsed if request in held]



def rewrites_pooled(batches: Sequence[AppliedBatch]) -> tuple[int, int]:
    """(held, counted): the re-writes that held to the next check, pooled over the last
    RUNAWAY_BATCHES applied batches whose report counted any."""
    counted = [b.report for b in batches if not b.reverted and b.report.rewrites_counted][-RUNAWAY_BATCHES:]
    return (round(sum(r.rewrites_held * r.rewrites_counted for r in counted)), sum(r.rewrites_counted for r in counted))


def backlog_runs_away(batches: Sequence[AppliedBatch]) -> tuple[int, int] | None:
    """(held, counted) where rewrites_pooled says that fewer than half of at least RUNAWAY_REWRITES
    re-writes held: each lapsed re-write is written again, so the re-writes a batch needs then grow
    without end (f > 1/2 in the module's note); None otherwise."""
    held, counted = rewrites_pooled(batches)
    return (held, counted) if counted >= RUNAWAY_REWRITES and 2 * held < counted else None
