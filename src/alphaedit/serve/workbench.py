"""The workbench behind `alphaedit serve`: one model, one Editor, one journal, many clients.

Everything that touches the model takes `self.lock` (first come, first served): a batch (its z optimisation hooks the
model's forward pass and its layer updates write W_out one layer at a time), an answer, a revert,
an export. A job's batches each take the lock on their own, so answers interleave with a long
job between its batches and always see the model before or after a batch, never half-way.

Jobs wait in a FIFO queue for the single worker thread; each committed batch is appended to the
journal before the next starts, so a killed server loses at most the batch in flight.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..editor import Editor
from ..generate import Sampling, decoding_options, end_of_turn_ids, generate_rows, prompt_ids, seeded, until_end
from ..guard import GuardTripped
from ..persistence import check_deltas_file, check_export_folder
from ..plots import figure
from ..prompts import chat_text, pad_id
from ..requests import EditRequest, RequestError
from .jobs import Job

log = logging.getLogger("alphaedit.serve")


class FairLock:
    """A lock taken in the order it was asked for: a job's next batch queues behind the answers
    that waited for its last one (threading.Lock lets the releasing thread take it straight back)."""

    def __init__(self):
        self._turn = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._turn:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._turn.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc) -> None:
        with self._turn:
            self._serving += 1
            self._turn.notify_all()


class Refused(ValueError):
    """A client's request that cannot be served as asked (the server answers 4xx with the message)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (an end-of-turn token or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the first of the stop strings begins in `text`, if any does."""
    return min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=None)


class Workbench:
    def __init__(self, editor: Editor, state: str | Path, exports: str | Path, *, max_requests: int = 1000, max_queue: int = 16,
                 keep_finished: int = 100):
        self.editor = editor
        self.state = Path(state)
        self.exports = Path(exports)
        self.max_requests = max_requests
        self.max_queue = max_queue
        # A server runs for months: it remembers the newest finished jobs, not all of them (their
        # batches stay in the journal either way).
        self.keep_finished = keep_finished
        self.lock = FairLock()
        self.jobs: dict[str, Job] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._end_ids = sorted(end_of_turn_ids(editor.model, editor.tokenizer))
        self._worker = threading.Thread(target=self._work, name="alphaedit-edits", daemon=True)
        self._worker.start()

    @property
    def model_name(self) -> str:
        return self.editor.model_spec or "model"

    def close(self) -> None:
        """Stop the worker after the job in flight (queued jobs are dropped, their batches unapplied)."""
        self._queue.put(None)
        self._worker.join()

    # -- edits --------------------------------------------------------------------------------

    def submit(self, requests: list[EditRequest], batch_size: int | None = None) -> Job:
        """Queue `requests` (already parsed) as one job; refused up front, changing nothing, when
        they are too many, conflict in a batch, are too long, or the queue is full."""
        if len(requests) > self.max_requests:
            raise Refused(f"{len(requests)} requests in one submission; the server takes at most {self.max_requests} "
                          "(--max-requests): split them into several submissions", 413)
        size = batch_size or len(requests)
        try:
            self.editor.check(requests, size)
        except RequestError as e:
            raise Refused(str(e)) from None
        waiting = sum(1 for j in self.jobs.values() if j.status == "queued")
        if waiting >= self.max_queue:
            raise Refused(f"{waiting} jobs are already waiting (--max-queue); submit again when one has finished", 429)
        job = Job(list(requests), size)
        self._forget_old_jobs()
        self.jobs[job.id] = job
        self._queue.put(job)
        return job

    def _forget_old_jobs(self) -> None:
        finished = sorted((j for j in self.jobs.values() if j.finished_or_failed), key=lambda j: j.finished or 0.0)
        for job in finished[: max(0, len(finished) - self.keep_finished)]:
            del self.jobs[job.id]

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                self._run(job)
            except (RequestError, GuardTripped) as e:
                job.finish(str(e))
            except Exception as e:  # a failed job must not stop the worker; the journal keeps what was committed
                log.error("job %s failed:\n%s", job.id, traceback.format_exc())
                job.finish(f"{type(e).__name__}: {e}")
            else:
                job.finish()

    def _run(self, job: Job) -> None:
        units = self.editor.units_per_batch
        job.start(units)
        for number, start in enumerate(range(0, len(job.requests), job.batch_size), 1):
            batch = job.requests[start : start + job.batch_size]
            before = (number - 1) * units
            with self.lock:  # released between batches: answers interleave with a long job
                self.editor.edit(batch, on_progress=lambda p: job.progress(number, before, p),
                                 on_batch=lambda report: self._commit(job, report.index))

    def _commit(self, job: Job, batch_id: int) -> None:
        self.editor.save_state(self.state)
        job.committed(batch_id)

    # -- the journal ---------------------------------------------------------------------------

    def journal(self) -> dict:
        with self.lock:
            batches = [{
                **{k: v for k, v in vars(b.report).items() if k != "index"},
                "id": b.report.index,
                "reverted": b.reverted,
                "edits": [{"text": r.text(), "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
                           "target_true": r.target_true, "question": r.question} for r in b.requests],
            } for b in self.editor.batches]
        config = self.editor.config
        return {"state": str(self.state), "model": self.model_name, "method": config.method, "layers": config.layers, "batches": batches}

    def revert(self, batch_id: int) -> None:
        with self.lock:
            try:
                self.editor.revert(batch_id)
            except ValueError as e:
                raise Refused(str(e), 404 if "no batch" in str(e) else 409) from None
            self.editor.save_state(self.state)

    def export(self, name: str, deltas_only: bool = False, force: bool = False) -> Path:
        """Write the edited model (or only its updates) to `name` inside the export folder."""
        target = self._export_path(name, deltas_only)
        try:
            (check_deltas_file if deltas_only else check_export_folder)(target, overwrite=force)
        except FileExistsError as e:
            raise Refused(str(e).replace(str(target), name).replace("--force", "force"), 409) from None
        with self.lock:
            written = self.editor.export_deltas(target) if deltas_only else self.editor.export(target, overwrite=force)
        return written.relative_to(self.exports.resolve())

    def _export_path(self, name: str, deltas_only: bool) -> Path:
        root = self.exports.resolve()
        if not name or name.strip() != name or Path(name).is_absolute() or "\\" in name:
            raise Refused(f"export name {name!r}: give a relative name such as 'my-model' (it is written inside the server's export folder)")
        target = (root / name).resolve()
        if target == root or not target.is_relative_to(root):
            raise Refused(f"export name {name!r} leaves the server's export folder; give a name inside it, such as 'my-model'")
        if deltas_only and target.suffix != ".safetensors":
            raise Refused(f"export name {name!r}: the updates are one safetensors file; end the name with .safetensors")
        root.mkdir(parents=True, exist_ok=True)
        return target

    # -- answers --------------------------------------------------------------------------------

    def conversation_text(self, messages: Sequence[dict[str, str]]) -> str:
        """The text the model continues for a conversation (the tokenizer's chat template)."""
        return chat_text(self.editor.tokenizer, messages)

    def prompt_text(self, prompt: str, chat: bool) -> str:
        return self.conversation_text([{"role": "user", "content": prompt}]) if chat else prompt

    def complete(self, texts: Sequence[str], max_tokens: int, sampling: Sampling | None = None, seed: int | None = None,
                 stop: Sequence[str] = (), unedited: bool = False) -> list[Completion]:
        """Each text's continuation (greedy unless `sampling`), ended by an end-of-turn token, a stop
        string or `max_tokens`; with `unedited`, by the base model's W_out."""
        with self.lock:
            return self._complete(texts, max_tokens, sampling, seed, stop, unedited)

    def ask(self, texts: Sequence[str], max_tokens: int, sampling: Sampling | None = None, seed: int | None = None,
            compare: bool = False) -> tuple[list[Completion], list[Completion] | None, int]:
        """The edited model's completions, with `compare` the base weights' too, and the number of
        batches the answers saw, all in one hold of the lock: no batch lands in between."""
        with self.lock:
            after = self._complete(texts, max_tokens, sampling, seed)
            before = self._complete(texts, max_tokens, sampling, seed, unedited=True) if compare else None
            return after, before, self.batches_applied()

    def batches_applied(self) -> int:
        return sum(not b.reverted for b in self.editor.batches)

    def _complete(self, texts: Sequence[str], max_tokens: int, sampling: Sampling | None = None, seed: int | None = None,
                  stop: Sequence[str] = (), unedited: bool = False) -> list[Completion]:
        tokenizer = self.editor.tokenizer
        rows = [prompt_ids(tokenizer, t) for t in texts]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # a pass runs as long as its rows need
        with (self.editor.unedited() if unedited else nullcontext()), self._seeded(sampling, seed):
            new = generate_rows(self.editor.model, tokenizer, [rows[i] for i in order], max_tokens, sampling, end_ids=self._end_ids)
        completions: list[Completion] = [None] * len(rows)  # type: ignore[list-item]
        for i, tokens in zip(order, new):
            kept, ended = until_end(tokens, self._end_ids)
            text = tokenizer.decode(kept, skip_special_tokens=True)
            cut = _first_stop(text, stop)
            completions[i] = Completion(text[:cut], "stop" if ended or cut is not None else "length", len(rows[i]), len(kept))
        return completions

    def _seeded(self, sampling: Sampling | None, seed: int | None):
        """A seeded sample is reproducible; greedy decoding needs no seed."""
        return seeded(self.editor.model, seed) if sampling is not None and seed is not None else nullcontext()

    def stream(self, text: str, max_tokens: int, sampling: Sampling | None = None, seed: int | None = None,
               stop: Sequence[str] = ()) -> Iterator[str | Completion]:
        """The continuation of `text` piece by piece as it is generated, then its Completion.

        Text that could be the start of a stop string is held back until it is known not to be;
        generation ends at a stop string, and when the caller stops listening (a client gone)."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        tokenizer, model = self.editor.tokenizer, self.editor.model
        row = prompt_ids(tokenizer, text)
        ids = torch.tensor([row], device=next(model.parameters()).device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=3600)
        cancel, result = threading.Event(), {}

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs) -> bool:
                return cancel.is_set()

        def generate() -> None:
            try:
                with self.lock, self._seeded(sampling, seed):
                    result["ids"] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                                   eos_token_id=self._end_ids, pad_token_id=pad_id(tokenizer), streamer=streamer,
                                                   stopping_criteria=StoppingCriteriaList([Cancelled()]), **decoding_options(sampling))
            except Exception:
                log.error("streamed generation failed:\n%s", traceback.format_exc())
                streamer.end()

        def generated() -> tuple[int, bool]:
            """(tokens generated before any end-of-turn token, whether one ended the answer)."""
            kept, ended = until_end(result["ids"][0, len(row) :].tolist(), self._end_ids) if "ids" in result else ([], False)
            return len(kept), ended

        worker = threading.Thread(target=generate, name="alphaedit-stream", daemon=True)
        worker.start()
        hold = max((len(s) for s in stop if s), default=1) - 1
        said, sent = "", 0
        try:
            for piece in streamer:
                said += piece
                cut = _first_stop(said, stop)
                if cut is not None:
                    if cut > sent:
                        yield said[sent:cut]
                    cancel.set()
                    worker.join()
                    yield Completion(said[:cut], "stop", len(row), generated()[0])
                    return
                if len(said) - hold > sent:
                    yield said[sent : len(said) - hold]
                    sent = len(said) - hold
            worker.join()
            if len(said) > sent:
                yield said[sent:]
            count, ended = generated()
            yield Completion(said, "stop" if ended else "length", len(row), count)
        finally:
            cancel.set()

    # -- plots -----------------------------------------------------------------------------------

    def plot(self, name: str) -> bytes:
        """A PNG of the applied batches: 'growth' (‖W‖/‖W₀‖ per layer) or 'efficacy' (per batch)."""
        if name not in ("growth", "efficacy"):
            raise Refused(f"no plot {name!r}: the plots are 'growth' and 'efficacy'", 404)
        with self.lock:
            reports = [b.report for b in self.editor.batches if not b.reverted]
        ids, buffer = [r.index for r in reports], io.BytesIO()
        if name == "growth":
            with figure(buffer, "growth of the edited W_out", "batch", "‖W‖F / ‖W₀‖F", size=(5, 3.2), dpi=90) as ax:
                for layer in self.editor.config.layers:
                    ax.plot(ids, [r.weight_growth.get(str(layer), {}).get("frobenius", float("nan")) for r in reports], marker="o", label=f"layer {layer}")
                ax.ticklabel_format(axis="y", useOffset=False)
                _say_when_empty(ax, reports)
        else:
            with figure(buffer, "efficacy per batch", "batch", "% of the batch's edits taken", size=(5, 3.2), dpi=90) as ax:
                ax.plot(ids, [100 * r.efficacy if r.efficacy is not None else float("nan") for r in reports], marker="o", label="efficacy")
                ax.set_ylim(-5, 105)
                _say_when_empty(ax, reports)
        return buffer.getvalue()


def _say_when_empty(ax, reports: list) -> None:
    if not reports:
        ax.text(0.5, 0.5, "no batches yet", ha="center", va="center", transform=ax.transAxes)
