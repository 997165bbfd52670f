"""Rehearsal (EditConfig.rehearse; not in the paper): before a batch, every earlier edit still
standing is checked, and the lapsed ones are written again with the batch.

Later batches undo some of what earlier ones wrote (on SmolLM2 about one edit in ten over 2,000
CounterFact edits, BENCHMARKS.md). The journal holds every request, so the editor can find those
whose edit no longer holds and write them again as extra columns of the next batch.

    standing = the latest edit of each (subject, prompt), its batch not reverted, oldest first
    holds    = the efficacy test on the model now (edit_holds)
    lapsed   = choose_lapsed(standing, holds, batch, most): not held, not in conflict, oldest
               first, at most `most` (EditConfig.rehearse_cap; by default as many as the batch has)
    f        = of the requests the last rehearsing batch wrote again (still standing), the share
               lapsed again at this check
    κ        = the edits newly lapsed per request written since the check before (new or
               re-written; the batches' own edits that did not take count as lapsed), the sum of
               two parts with different causes: the own misses (a batch that writes poorly) and
               the earlier edits knocked out (a batch that disturbs what is stored)

f and κ say whether rehearsal keeps up (outlook): with `new` requests of their own written between
two checks, the B re-writes of a rehearsing batch settle where B = f·B + κ·(new + B), that is
B = κ·new / (1 − f − κ), and grow without end as f + κ nears 1. On SmolLM2's five layers κ grew
by about 0.07 for every 1,000 edits stored while f stayed near a third, and f + κ was 0.94 over
6,100-7,000 edits, where the backlog ran away (BENCHMARKS.md, "What sets where rehearsal gives out").

The lapsed requests are written as more columns of the batch, their z optimised as the batch's
own, from δ = 0 or (EditConfig.rehearse_warm) from the value each was last written with. C_p
still holds each of them where it was written before, at the answer that lapsed; with
EditConfig.replace_holds those columns leave C_p before the batch is solved (Editor._held_rows),
so that a re-write is not solved against a hold on its own key, and with EditConfig.rewrite_weight
the re-written columns weigh more than the batch's own in the solve (Editor._column_weights).
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


# The outlook pools the most recent checks until they count at least OUTLOOK_REWRITES re-writes
# (one batch's share of re-writes held swings by about ±0.09 at 30 of them around the 0.65 SmolLM2
# held through 3,000 edits; 150 by ±0.04), and says rehearsal gives out where f + κ reaches
# GIVES_OUT: the backlog then settles, if at all, at ten times κ·new or more
# (SmolLM2's five layers: 0.63 at 3,000 edits, 0.94 at 6,100-7,000, where it ran away)
OUTLOOK_REWRITES = 150
GIVES_OUT = 0.9


@dataclass
class Rehearsal:
    """Before a rehearsing batch: the earlier requests it writes again and the check's result."""

    lapsed: list[EditRequest]  # earlier requests whose edit no longer holds, oldest first
    held: float | None  # the share of the earlier requests still standing whose edit held
    seconds: float  # the check's time
    earlier_lapsed: int = 0  # the earlier requests still standing whose edit did not hold (before the cap)
    # of the requests the last rehearsing batch wrote again and still standing: how many, and how many
    # of them lapsed again (f above, over a few checks)
    rewrites_counted: int = 0
    rewrites_lapsed: int = 0


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
                     earlier_lapsed=holds.count(False), rewrites_counted=len(rewrites), rewrites_lapsed=rewrites.count(False))


def rewrites_holding(batches: Sequence[AppliedBatch], earlier: list[EditRequest], holds: list[bool]) -> list[bool]:
    """Per request the last rehearsing batch wrote again that still stands (`earlier`, checked as
    `holds`): does it hold? The last rehearsing batch is the latest applied one that was checked
    (with `rehearse N`, N batches back); a re-write replaced since by a newer edit of its subject
    and prompt is not counted, nor are a reverted batch's."""
    last = next((applied for applied in reversed(batches) if not applied.reverted and applied.report.earlier_held is not None), None)
    if last is None:
        return []
    held = dict(zip(earlier, holds))
    return [held[request] for request in last.rehearsed if request in held]


@dataclass(frozen=True)
class Outlook:
    """Whether rehearsal keeps up, from the most recent checks (the module's note): f, κ and the
    backlog they settle at."""

    f: float  # the share of re-writes lapsed again by the next check
    kappa: float  # edits newly lapsed per request written between two checks (the batches' own misses included)
    rewrites: int  # the re-writes f is over
    new_per_check: float  # the batches' own requests between two checks, on average (the batch size × rehearse N)
    # of κ, the batches' own requests that did not take, per request written (None where a batch's
    # efficacy is unknown, as on zsRE, whose requests have no true object); the rest is knocked_out
    own_missed: float | None = None

    @property
    def knocked_out(self) -> float | None:
        """Of κ, the earlier edits that held at the first check and lapsed by the next, per request
        written: what the batches between disturbed rather than failed to write (re-writes that lapse
        again are f's)."""
        return None if self.own_missed is None else self.kappa - self.own_missed

    @property
    def gives_out(self) -> bool:
        """f + κ at GIVES_OUT or past it."""
        return self.f + self.kappa >= GIVES_OUT

    @property
    def settles_at(self) -> float | None:
        """The re-writes a rehearsing batch settles at, B = κ·new / (1 − f − κ); None where f + κ ≥ 1."""
        room = 1 - self.f - self.kappa
        return self.kappa * self.new_per_check / room if room > 0 else None


def outlook(batches: Sequence[AppliedBatch], at_least: int | None = None) -> Outlook | None:
    """f and κ over the most recent pairs of consecutive checks, pooled until they count at least
    `at_least` (OUTLOOK_REWRITES) re-writes; None before that (or where the journal predates the
    counts). Between a check and the next, κ's newly lapsed are those lapsed at the next check that
    were neither re-written and lapsed again nor left lapsed at the first (its lapsed beyond what it
    wrote back, taken to stay lapsed: a slight underestimate where some were replaced or recovered
    since), over the requests the batches between wrote. Of them, own_missed counts the batches' own
    requests that failed their efficacy test (requests × (1 − efficacy): exact where every request
    has a true object, as in CounterFact), the rest are earlier edits knocked out. A pair with a
    reverted batch from its first check to its second is skipped: the second check's counts were
    taken with that batch applied."""
    reports = [b.report for b in batches]
    reverted = [b.reverted for b in batches]
    checks = [i for i, r in enumerate(reports) if r.earlier_held is not None and r.earlier_lapsed is not None]
    counted = lapsed_again = newly = written = new = pairs = 0
    missed: int | None = 0  # of newly, the batches' own requests that did not take (None once an efficacy is unknown)
    for before, at in reversed(list(zip(checks, checks[1:]))):
        if any(reverted[before : at + 1]):
            continue
        first, then, between = reports[before], reports[at], reports[before:at]
        counted += then.rewrites_counted
        lapsed_again += then.rewrites_lapsed
        left = first.earlier_lapsed - first.rehearsed  # lapsed at the first check and not written back
        fresh = max(0, then.earlier_lapsed - then.rewrites_lapsed - left)
        newly += fresh
        written += sum(r.requests + r.rehearsed for r in between)
        new += sum(r.requests for r in between)
        # a batch's efficacy is the check's test (edit_holds) on the weights the next check reads when
        # it follows at once (rehearse 1): its misses are exactly the own edits lapsed there
        if missed is not None and all(r.efficacy is not None for r in between):
            missed += min(fresh, sum(round(r.requests * (1 - r.efficacy)) for r in between))
        else:
            missed = None
        pairs += 1
        if counted >= (OUTLOOK_REWRITES if at_least is None else at_least):
            return Outlook(lapsed_again / counted, newly / written, counted, new / pairs,
                           None if missed is None else missed / written)
    return None
