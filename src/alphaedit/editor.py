"""The Editor: owns the model, its layout, the edit config, statistics, projectors and C_p.

One batch (ALGORITHM.md §1.10):

    (rehearse, not in the paper: the earlier requests whose edit lapsed join the batch's requests: rehearsal.py)
    Z = h0 + argmin δ  for every request at once               (targets.py)
    for idx, l in enumerate(layers):
        K = keys(l) on the current model;  R = (Z − z_current) / (layers left)
        (R as W_out's output where the block normalises it before the residual add: residual.py)
        (and columns of R = 0 at the keys of subjects the requests keep: keep_subjects)
        W_l += Δ = method's closed form(K, R, statistics of l)  (methods/, projected or not)
        (spread="joint", not in the paper: Δ is this layer's part of one projected solve over the
         layers still to write, for the whole missing residual: methods/projection.py)
    the method's finish (RECT's mask) and restraint (PRUNE's) on the batch's updates
    C_p += K Kᵀ (the keys read above, each already the edited model's; read again after a
                 finish or restraint, which change the lower layers under the upper keys)

Nothing lives in module globals: two editors on two models never see each other's state.
Every applied batch is kept as its update (low-rank factors, masked for RECT) and the keys it
added to C_p, so it can be saved to a journal, replayed onto a fresh base model, or reverted
(persistence.py).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .batch import AppliedBatch, BatchReport, EditProgress, now
from .config import EditConfig, config_for_model
from .anchor import anchored_values, reference_norm
from .generate import generate_context_templates
from .guard import Guard, GuardTripped
from .held import HeldTexts, held_moments
from .journal import Journal
from .keys import KeyPass, KeyReader, compute_keys
from .layouts import Layout, detect_layout, mlp_out_weight, weight_as_math, weight_delta_as_stored
from .methods import get_method
from .methods.projection import joint_projected_solve
from .persistence import Persistence
from .progress import progress_bar
from .prompts import PLAIN_TEMPLATE, chat_form, has_chat_template
from .rehearsal import Rehearsal, edit_holds, outlook, rehearsal_for
from .requests import EditRequest, RequestError, check_conflicts
from .residual import mlp_contribution, mlp_output_change
from .stats import CorpusSpec, StatsCache, second_moments, statistic_description
from .stats.cache import model_identity
from .targets import TargetResult, compute_targets
from .updates import LayerStatistics, Update, null_space_projector


class _PhaseClock:
    """Wall-clock seconds per named phase (waiting for the GPU, so its work is not misattributed)."""

    def __init__(self, model: PreTrainedModel):
        self.cuda = any(p.device.type == "cuda" for p in model.parameters())
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.cuda:  # every GPU: with device_map="auto" the model spans several
            for device in range(torch.cuda.device_count()):
                torch.cuda.synchronize(device)


@dataclass
class _TargetValues:
    """A batch's target values: the optimisation's result and the Z the layers are solved for."""

    targets: TargetResult  # compute_targets' result (z, h0, per-form losses and steps)
    z: torch.Tensor  # [forms, d] on the CPU: targets.z, or NAS's anchored values
    reference: float | None  # NAS's reference norm μ (None without anchoring)
    dropped: int  # requests NAS dropped


def _first_forms(targets: TargetResult, n: int) -> TargetResult:
    """compute_targets' result for its first `n` forms only (every field is per form, in form order)."""
    return TargetResult(**{f.name: (None if getattr(targets, f.name) is None else getattr(targets, f.name)[:n]) for f in fields(targets)})


@dataclass
class _GuardSnapshot:
    """Before a guarded batch: what to put back if the guard refuses it, and the probes' answers."""

    weights: dict[int, torch.Tensor]  # each edited W_out, as stored
    preserved: dict[int, torch.Tensor]  # C_p
    update_sums: dict[int, torch.Tensor]  # PRUNE's raw sums
    probes: list[str]  # the guard's probe prompts that name no subject of the batch
    answers: list[int]  # their next tokens now


def _norms(weight: torch.Tensor, chunk: int = 2048) -> tuple[float, float]:
    """(‖W‖_F, σ_max(W)) in float64, on the weight's own device.

    σ_max² is the largest eigenvalue of the smaller Gram matrix G (W Wᵀ or WᵀW): a symmetric
    eigenvalue problem of the model's width rather than an SVD of W_out (at Llama-3-8B's
    4096×14336 the SVD on a CPU took seconds per layer, after every batch), and ‖W‖_F² = tr G.
    G is summed over slices of the long side, so the float64 copy is one slice at a time (a
    whole 8B W_out in float64 is 0.47 GB more on a GPU that holds the model).
    """
    w = weight.detach()
    wide = w.shape[0] <= w.shape[1]
    n = min(w.shape)
    gram = torch.zeros(n, n, dtype=torch.float64, device=w.device)
    for start in range(0, max(w.shape), chunk):
        part = (w[:, start : start + chunk] if wide else w[start : start + chunk].T).double()  # [n, ≤chunk]
        gram += part @ part.T
    sigma_max = torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt()
    return float(gram.diagonal().sum().sqrt()), float(sigma_max)


def _with_kept(keys: torch.Tensor, resid: torch.Tensor, kept: torch.Tensor | None,
               kept_resid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's keys [u, d0] and residuals [u, d] with the kept subjects' keys [m, d0] appended as
    columns that ask for no change (zero residual) or, given `kept_resid` [m, d], for that change
    (the joint spread asks the layers still to write to take back what the layers before them in
    the batch changed there): [u + m, d0], [u + m, d]."""
    if kept is None:
        return keys, resid
    asked = resid.new_zeros(len(kept), resid.shape[1]) if kept_resid is None else kept_resid.to(resid.dtype)
    return torch.cat([keys, kept.to(keys.dtype)]), torch.cat([resid, asked])


def _weighted(keys: torch.Tensor, resid: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [u, d0] and residuals [u, d] with row j scaled by √w_j (weights [u]): a least squares
    over the scaled columns fits Σ w_j ‖Δk_j − r_j‖² (EditConfig.rewrite_weight)."""
    if weights is None:
        return keys, resid
    root = weights.sqrt()[:, None]
    return keys * root.to(keys.dtype), resid * root.to(resid.dtype)


def _fact(request: EditRequest) -> tuple[str, str]:
    """What a later write replaces (EditConfig.replace_holds): the subject and the prompt."""
    return request.subject, request.prompt


class Editor(Persistence):
    """Edits a Hugging Face causal LM in place, batch after batch.

    >>> editor = Editor(model, tokenizer)            # preset from the model's shape
    >>> editor.edit(load_requests("edits.json"), batch_size=10)
    >>> editor.save_state("my-edits")                # continue later with Editor.load_state
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: EditConfig | None = None,
        *,
        layout: Layout | None = None,
        corpus: CorpusSpec | None = None,
        cache: StatsCache | None = None,
        model_spec: str | None = None,
        show_progress: bool = True,
        max_prompt_tokens: int = 256,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.layout = layout or detect_layout(model)
        self.config = config or config_for_model(model.config)
        self.method = get_method(self.config.method)
        bad = [layer for layer in self.config.layers if not 0 <= layer < self.layout.num_layers]
        if bad:
            raise ValueError(f"layers {bad} do not exist: the model has {self.layout.num_layers} layers (0..{self.layout.num_layers - 1})")
        if self.config.spread == "joint" and self.layout.mlp_out_norm is not None:
            raise ValueError(f"spread joint adds the layers' MLP outputs up in the residual stream, and this model ({type(self.model).__name__}) "
                             "normalises each MLP output first: keep the sequential spread")
        self.corpus = corpus or CorpusSpec()
        self.cache = cache if cache is not None else StatsCache()
        # what the journal names as the base model, for the CLI to load it again (a hub id or a folder)
        self.model_spec = model_spec or getattr(model.config, "name_or_path", None) or None
        self.show_progress = show_progress
        # An edit prompt is one sentence; a pasted document would run for minutes per z step.
        self.max_prompt_tokens = max_prompt_tokens
        self.templates: list[str] | None = None
        self.batches: list[AppliedBatch] = []
        self.events: list[tuple[str, int]] = []  # ("batch" | "revert", batch id), in order
        self._journal: Journal | None = None  # the journal save_state last wrote to
        layers = self.config.layers
        self.base_identity = model_identity(model, self.layout, layers)
        # The unedited W_out of each edited layer, on the CPU: statistics always describe the base
        # model, whenever they are first needed.
        self._base_weights = {l: mlp_out_weight(model, self.layout, l).detach().to("cpu", copy=True) for l in layers}
        self._statistics: dict[int, LayerStatistics] | None = None
        self._base_norms: dict[int, tuple[float, float]] | None = None  # (‖W_base‖_F, σ_max), on first use
        # Each layer's statistics live where its W_out does, so its solve runs on that device.
        self.preserved = {l: torch.zeros(self.layout.key_size, self.layout.key_size, device=self._device(l)) for l in layers}
        self.held: list[HeldTexts] = []  # texts whose outputs C_p holds from before the first batch (held.py)
        self.projector_rank: dict[int, int] = {}
        self.guard: Guard | None = None  # refuses batches that grow the matrices or drift answers too far (guard.py)
        self._warned_room = False  # _warn_past_room speaks once per editor
        self._warned_runaway = False  # and so does _warn_runaway
        # PRUNE: the raw sum of the applied updates per layer, which the model carries restrained
        self._update_sums: dict[int, torch.Tensor] = {}

    # -- lazily prepared state -------------------------------------------------------------

    def context_templates(self) -> list[str]:
        if self.templates is None:
            c = self.config
            self.templates = generate_context_templates(self.model, self.tokenizer, c.context_template_words, c.context_template_length, c.seed)
        return self.templates

    def statistics(self) -> dict[int, LayerStatistics]:
        """C0 (and, for a projected method, P) per edited layer, measured on the base model."""
        if self._statistics is None:
            with self.unedited():
                self._statistics = self._imported_projectors() or self._measured_statistics()
        return self._statistics

    def _measured_statistics(self) -> dict[int, LayerStatistics]:
        moments = second_moments(self.model, self.layout, self.tokenizer, self.config.layers, self.corpus, self.cache, self.show_progress)
        statistics = {}
        for layer, moment in moments.items():
            second_moment, projector = moment.moment.to(self._device(layer)), None
            if self.method.projects(self.config):
                projector, self.projector_rank[layer] = null_space_projector(second_moment, self.config.nullspace_threshold, self.config.projector_rule)
            statistics[layer] = LayerStatistics(second_moment, projector, self.preserved[layer])
        return statistics

    def _imported_projectors(self) -> dict[int, LayerStatistics]:
        """Projectors imported from AlphaEdit's null_space_project.pt (`--corpus import:FILE.pt`)."""
        if not self.corpus.imports_projectors:
            return {}
        source = self.corpus.imported
        if not self.method.projects(self.config):
            raise ValueError(f"{self.config.method} without the projection needs second moments; {source} holds only projectors")
        statistics = {}
        for layer in self.config.layers:
            projector = self.cache.load_projector(statistic_description(self.model, self.layout, self.tokenizer, layer, self.corpus))
            if projector is None:
                raise ValueError(f"no projector imported from {source} for layer {layer}: run `alphaedit stats --import FILE --layers ...`")
            self.projector_rank[layer] = round(float(projector.trace()))
            statistics[layer] = LayerStatistics(None, projector.to(self._device(layer)), self.preserved[layer])
        return statistics

    @contextmanager
    def unedited(self) -> Iterator[None]:
        """The base model's W_out in place for the enclosed block, the edited ones back after it
        (statistics always describe the base model; `alphaedit serve` compares answers with it)."""
        current = {l: mlp_out_weight(self.model, self.layout, l).detach().clone() for l in self.config.layers}
        try:
            with torch.no_grad():
                for layer, weight in self._base_weights.items():
                    mlp_out_weight(self.model, self.layout, layer).copy_(weight)
            yield
        finally:
            with torch.no_grad():
                for layer, weight in current.items():
                    mlp_out_weight(self.model, self.layout, layer).copy_(weight)

    # -- editing -----------------------------------------------------------------------------

    @property
    def history(self) -> list[BatchReport]:
        return [b.report for b in self.batches]

    def edit(
        self,
        requests: Sequence[EditRequest],
        batch_size: int | None = None,
        on_batch: Callable[[BatchReport], None] | None = None,
        on_progress: Callable[[EditProgress], None] | None = None,
    ) -> list[BatchReport]:
        """Apply the requests in sequential batches of `batch_size` (all at once by default).

        `on_batch` runs after each batch (the CLI commits it to the journal there, so an
        interrupted run keeps every finished batch); `on_progress` hears each phase and unit of
        work (`alphaedit serve` shows it as a progress bar with an ETA).
        """
        if not requests:
            return []
        size = batch_size or len(requests)
        batches = [list(requests[i : i + size]) for i in range(0, len(requests), size)]
        self.check(requests, size)
        units = self.units_per_batch
        progress = EditProgress("statistics", 0, len(batches), 0, len(batches) * units)
        tell = on_progress or (lambda _: None)
        tell(progress)
        self.statistics()
        tell(progress.at("context templates"))
        self.context_templates()
        reports = []
        with progress_bar(f"editing ({self.config.method})", total=len(batches) * units, enabled=self.show_progress) as advance:
            for number, batch in enumerate(batches, 1):
                first_unit = progress.done
                progress = progress.at("editing", batch=number)
                tell(progress)

                def on_unit() -> None:
                    nonlocal progress
                    progress = progress.at("editing", done=progress.done + 1)
                    advance(1)
                    tell(progress)

                rehearsal = None
                if self._rehearses_before(len(self.batches) + 1):
                    tell(progress.at("rehearsal check"))
                    rehearsal = self._rehearsal(batch)
                snapshot = self._guard_before(batch + (rehearsal.lapsed if rehearsal else []))
                reports.append(self._edit_batch(batch, on_unit, rehearsal))
                if snapshot is not None:
                    tell(progress.at("guard check"))
                    self._guard_after(batch, snapshot)  # raises GuardTripped, the batch taken back
                advance(first_unit + units - progress.done)  # iterations skipped by early stopping
                progress = progress.at("committing", done=first_unit + units)
                tell(progress)
                if on_batch is not None:
                    on_batch(reports[-1])
        tell(progress.at("done"))
        return reports

    @property
    def units_per_batch(self) -> int:
        """Progress units of one batch: one per z iteration and per layer update, so that an ETA
        moves within a batch (iterations skipped by an early stop count as done)."""
        return self.config.v_num_grad_steps + len(self.config.layers)

    def check(self, requests: Sequence[EditRequest], batch_size: int | None = None) -> None:
        """Everything that can refuse `requests` before any weight moves: conflicting requests in
        one batch, prompts too long, a chat template that mangles a question (RequestError)."""
        size = batch_size or len(requests) or 1
        for start in range(0, len(requests), size):
            check_conflicts(requests[start : start + size])
        self._check_lengths(requests)
        self._sourced_forms(requests)  # building the chat forms refuses a template that mangles a question

    def _check_lengths(self, requests: Sequence[EditRequest]) -> None:
        """Refuse, up front, requests longer than max_prompt_tokens or than the model's context."""
        context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None) or 1 << 30
        # room for the context template in front of the prompt (context_template_length tokens)
        limit = min(self.max_prompt_tokens, context - self.config.context_template_length - 2)
        for position, request in enumerate(requests, 1):
            length = len(self.tokenizer(request.text() + " " + request.target_new, add_special_tokens=False)["input_ids"])
            if length > limit:
                which = f"request {position}" + (f" (case_id {request.case_id})" if request.case_id is not None else "")
                bound = "the limit (--max-prompt-tokens)" if limit == self.max_prompt_tokens else "the model's context"
                raise RequestError(
                    f"{which}: prompt and target_new are {length} tokens, over {bound} of {limit}; an edit prompt is one "
                    "sentence naming the subject: shorten it" + (", or raise --max-prompt-tokens" if limit == self.max_prompt_tokens else "")
                )

    def _edit_batch(self, own: list[EditRequest], on_unit: Callable[[], None] | None = None,
                    rehearsal: Rehearsal | None = None) -> BatchReport:
        """One batch, as the module docstring's loop; each phase timed for the report. The batch
        writes its own requests and, with rehearsal, the earlier ones that lapsed."""
        started, start = now(), time.perf_counter()
        layers, clock = self.config.layers, _PhaseClock(self.model)
        templates, statistics = self.context_templates(), self.statistics()
        rehearsed = rehearsal.lapsed if rehearsal else []
        requests = [*own, *rehearsed]
        sourced = self._sourced_forms(requests)
        forms = self._columns(requests, sourced)  # one column of K and R per form written
        weights = self._column_weights(requests, sourced, len(own))  # None unless rewrite_weight
        self._warn_past_room(len(forms), len(own), len(rehearsed))
        starts = self._warm_starts(sourced, len(own), len(rehearsed))  # None unless rehearse_warm
        with clock("z"):
            values = self._target_values(sourced, templates, on_unit, written=len(forms), starts=starts)
        with clock("keys"):
            kept = self._kept_keys(requests)
        with clock("solve"):
            self._release_rewritten(requests)  # with replace_holds, the earlier writes of these facts leave C_p
        keys: dict[int, torch.Tensor] = {}
        deltas: dict[int, Update] = {}
        weights_before: dict[int, torch.Tensor] = {}  # only for a method that finishes its updates (RECT)
        reader = KeyReader(self.model, self.layout, self.tokenizer, forms, templates)
        for i, layer in enumerate(layers):
            # the joint spread plans the layers still to write together, so it reads their keys too
            ahead = layers[i:] if self.config.spread == "joint" else [layer]
            with clock("keys"):
                # only W_out of the layers already done has changed: the blocks below the last
                # one are replayed from the previous read
                current = reader.read(ahead, z_layer=self.config.z_layer, unchanged_below=layers[i - 1] if i else 0)
                keys[layer] = current.keys[layer]
            with clock("solve"):
                if self.method.finish is not None:
                    weights_before[layer] = self._math_weight(layer).to("cpu", copy=True)
                missing = values.z - current.z_current  # [u, d] what the residual stream still lacks at the z layer
                if self.config.spread == "joint":
                    deltas[layer] = self._joint_share(layer, ahead, current, missing, statistics, kept, deltas, weights)
                else:
                    resid = missing / (len(layers) - i)  # the residual stream's share of this layer
                    deltas[layer] = self._solve_layer(layer, keys[layer], current.plain_keys[layer], resid, statistics[layer],
                                                      kept.get(layer), weights)
                self._add_to_weight(layer, deltas[layer], sign=1)
            if on_unit is not None:
                on_unit()
        with clock("solve"):
            self._finish(deltas, weights_before)
            self._restrain(deltas, sign=1)
        preserved_keys = self._hold_batch_keys(reader, keys, forms, clock)
        with clock("check"):
            efficacy = self._efficacy(own)  # on the weights the model carries (after finish and restraint)
        kept_columns = len(next(iter(kept.values()))) if kept else 0
        report = self._report(own, forms, values, deltas, efficacy, started, time.perf_counter() - start, clock.seconds, kept_columns)
        if rehearsal is not None:
            report.earlier_held, report.rehearsed = rehearsal.held, len(rehearsed)
            report.earlier_lapsed = rehearsal.earlier_lapsed
            report.rewrites_counted, report.rewrites_lapsed = rehearsal.rewrites_counted, rehearsal.rewrites_lapsed
            if rehearsed:  # the forms are the batch's own requests, then the rehearsed ones (_sourced_forms)
                report.rehearsed_z_steps = sum(values.targets.steps[len(own) : len(requests)]) / len(rehearsed)
            report.phase_seconds["check"] = report.phase_seconds.get("check", 0.0) + rehearsal.seconds
            report.seconds += rehearsal.seconds
        # a warm-started rehearsal's starting points: the requests' own forms' values (the first ones)
        kept_values = values.targets.z[: len(requests)].detach().float().cpu() if self.config.rehearse_warm else None
        self._record(AppliedBatch(report, list(own), deltas, preserved_keys, rehearsed=list(rehearsed), values=kept_values))
        if rehearsal is not None:
            self._warn_runaway(len(own))
        return report

    def _warn_runaway(self, batch_size: int) -> None:
        """Say (once) when rehearsal gives out: over the last checks f + κ reached rehearsal.GIVES_OUT
        (rehearsal.outlook), so the lapsed edits settle, if at all, at many times what a batch knocks out.
        The cap in force is choose_lapsed's: rehearse_cap, or else the batch's size."""
        if self._warned_runaway or (seen := outlook(self.batches)) is None or not seen.gives_out:
            return
        self._warned_runaway = True
        cap = self.config.rehearse_cap
        limit = f"the cap of {cap} re-writes a batch" if cap else "the batch's size, the default cap of re-writes (--rehearse-cap)"
        settles = seen.settles_at
        if settles is None or settles > (cap or batch_size):
            outcome = (f"{'they no longer settle' if settles is None else f'they settle only near {settles:.0f} a batch'}, past "
                       f"{limit}: the rest wait unwritten and efficacy on earlier edits falls")
        else:
            outcome = f"they settle near {settles:.0f} a batch, under {limit}, at the price of more re-writing every batch"
        split = (f"{seen.own_missed:.2f} its own that did not take, {seen.knocked_out:.2f} earlier ones knocked out"
                 if seen.own_missed is not None else "its own, if it did not take, included")
        warnings.warn(f"rehearsal is giving out: of the last {seen.rewrites} re-written edits {100 * seen.f:.0f}% lapsed again by the "
                      f"next check, and each request written leaves {seen.kappa:.2f} edits newly lapsed ({split}); so the lapsed "
                      f"edits grow: {outcome}. The edited layers are running out of room for more edits", stacklevel=4)

    def _warn_past_room(self, columns: int, own: int, rehearsed: int) -> None:
        """Say (once) when a batch writes more columns than the smallest null space leaves directions.
        A projected update reaches the keys only through P, so at most rank(P) columns can be
        written independently: past that part of the batch cannot take, and under rehearsal what did
        not take lapses again and the backlog runs away (SmolLM2 at 7,700 edits, BENCHMARKS.md)."""
        if self._warned_room or not self.projector_rank:
            return
        layer, room = min(self.projector_rank.items(), key=lambda item: item[1])
        if columns <= room:
            return
        self._warned_room = True
        parts = f" ({own} new, {rehearsed} rehearsed)" if rehearsed else ""
        # not "loosen --threshold": on SmolLM2 the directions that adds are read by text and cost more
        # than they hold (BENCHMARKS.md, "A looser null space")
        fix = "cap the re-writes below that (--rehearse-cap), the rest waiting for later batches" if rehearsed else "use smaller batches"
        warnings.warn(f"this batch writes {columns} columns{parts}, more than the {room} directions layer {layer}'s "
                      f"null space leaves: they cannot all be written, so part of the batch will not take; {fix}", stacklevel=4)

    def _warm_starts(self, sourced: list[tuple[int, EditRequest]], own: int, rehearsed: int) -> list[torch.Tensor | None] | None:
        """config.rehearse_warm: per form of the batch (its `own` requests, then the `rehearsed`
        ones, then any chat forms: _sourced_forms), the z a rehearsed request's prompt was last
        written with (the latest batch not reverted that wrote it); None for the other forms and
        for a request whose latest write kept no value."""
        if not self.config.rehearse_warm:
            return None
        latest: dict[tuple[str, str, str], torch.Tensor] = {}
        for applied in self.batches:
            if applied.reverted:
                continue
            for i, request in enumerate(applied.written):
                key = (request.subject, request.prompt, request.target_new)
                if applied.values is None:
                    latest.pop(key, None)  # written again without a value: an older one is stale
                else:
                    latest[key] = applied.values[i]
        return [latest.get((form.subject, form.prompt, form.target_new)) if own <= j < own + rehearsed else None
                for j, (_, form) in enumerate(sourced)]

    def _hold_batch_keys(self, reader: KeyReader, keys: dict[int, torch.Tensor], forms: list[EditRequest],
                         clock: _PhaseClock) -> dict[int, torch.Tensor]:
        """C_p takes the batch's keys on the model as it now is; returns them (the journal keeps
        them), or nothing for a method that keeps no C_p. A layer's key (the input of its W_out)
        depends only on the layers below it, all updated by the time it was read, so for most
        methods `keys` are already the post-edit ones; RECT's mask and PRUNE's restraint change the
        lower layers after the upper layers' keys were read: read again. With earlier_reread, at
        its points C_p is then rebuilt from every applied request's keys."""
        if not self.method.keeps_preserved(self.config):
            return {}
        if self.method.finish is not None or self.method.restrain is not None:
            with clock("keys"):
                keys = reader.read(self.config.layers).keys
        for layer in self.config.layers:
            self._add_to_preserved(layer, keys[layer], sign=1)
        if self._rereads_after(len(self.batches) + 1):  # this batch included
            with clock("keys"):
                self._reread_earlier(also=forms)
        return keys

    def _target_values(self, sourced: list[tuple[int, EditRequest]], templates: list[str], on_unit,
                       written: int | None = None, starts: list[torch.Tensor | None] | None = None) -> _TargetValues:
        """Z = h0 + δ for every form at once (targets.py), NAS-anchored if configured; only the
        first `written` forms' are kept (the columns, see _columns; all when not given). `starts`:
        per form, a value to start from (_warm_starts), or None."""
        forms = [form for _, form in sourced]
        # chat_values="shared": a chat form trains (and adds) its request's δ; otherwise its own
        owners = [source for source, _ in sourced] if self.config.chat_values in ("shared", "trained") else None
        targets = compute_targets(self.model, self.layout, self.tokenizer, forms, templates, self.config,
                                  on_iteration=on_unit, owners=owners, starts=starts)  # rows per pass: the config's
        if written is not None and written < len(forms):  # the rest trained δ and are not written
            targets, forms = _first_forms(targets, written), forms[:written]
        z, reference, dropped = targets.z.cpu(), None, 0
        if self.config.value_anchor:  # NAS: every v* = m + δ rescaled to the unedited model's norm (anchor.py)
            z, reference, dropped = self._anchored(forms, targets)
        return _TargetValues(targets, z, reference, dropped)

    def _solve_layer(self, layer: int, keys: torch.Tensor, plain_keys: torch.Tensor, resid: torch.Tensor,
                     statistics: LayerStatistics, kept: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> Update:
        """Δ of one layer for keys [u, d0] and the residual share [u, d] it must add, each column
        weighed by `weights` [u] (None: alike), and no change at the kept keys [m, d0] (zero
        columns of R, weight 1)."""
        # what W_out must add for it, judged at the plain prompt, where z_current is read
        # (mapped at the template-averaged key instead, Gemma-3-270M's first 10 CounterFact
        # edits took less: Eff 80 against 100, BENCHMARKS.md)
        resid = mlp_output_change(self.model, self.layout, layer, plain_keys, resid)
        keys, resid = _with_kept(*_weighted(keys, resid, weights), kept)
        device = self._device(layer)
        return self.method.layer_update(keys.to(device).T, resid.to(device).T, statistics, self.config).to("cpu")

    def _joint_share(self, layer: int, ahead: list[int], current: KeyPass, missing: torch.Tensor, statistics: dict[int, LayerStatistics],
                     kept: dict[int, torch.Tensor], written: dict[int, Update], weights: torch.Tensor | None = None) -> Update:
        """`spread="joint"`: this layer's Δ in one projected solve over the layers still to write
        (`ahead`, this one first) for the whole missing residual [u, d] (methods/projection.py); the
        layers after it are planned again on the model as it will then be. The kept subjects ask
        the block for no change in all: the layers still to write take back what the batch's layers
        already `written` changed at their keys (the plan's own assumption: a layer's output
        reaches the z layer unchanged)."""
        undo = -sum(kept[l].float().cpu() @ written[l].dense().T for l in written) if kept and written else None  # [m, d]
        columns = {l: _with_kept(*_weighted(current.keys[l], missing, weights), kept.get(l), undo) for l in ahead}  # ([u + m, d0], [u + m, d]) each
        plan = joint_projected_solve({l: keys.to(self._device(l)).T for l, (keys, _) in columns.items()}, columns[layer][1].T,
                                     {l: statistics[l] for l in ahead}, self.config)
        return plan[layer].to("cpu")

    def _finish(self, deltas: dict[int, Update], weights_before: dict[int, torch.Tensor]) -> None:
        """A method with a finish step (RECT) solved each layer with its whole Δ in place; the
        finished Δ replace them, in the weights and in `deltas`."""
        if self.method.finish is None:
            return
        options = self.method.option_values(self.config)
        for layer, delta in deltas.items():
            finished = self.method.finish(delta, weights_before[layer], options)
            self._add_to_weight(layer, delta, sign=-1)
            self._add_to_weight(layer, finished, sign=1)
            deltas[layer] = finished

    def _report(self, requests: list[EditRequest], forms: list[EditRequest], values: _TargetValues, deltas: dict[int, Update],
                efficacy: float | None, started: str, seconds: float, phases: dict[str, float], kept_columns: int) -> BatchReport:
        targets, per_form = values.targets, len(forms)
        return BatchReport(
            index=self._next_id(),
            requests=len(requests),
            started=started,
            seconds=seconds,
            z_loss=sum(targets.loss) / per_form,
            z_steps=sum(targets.steps) / per_form,
            target_prob=sum(targets.target_prob) / per_form,
            efficacy=efficacy,
            delta_norms={str(l): d.norm() for l, d in deltas.items()},
            phase_seconds=phases,
            target_nll=sum(targets.target_nll) / per_form,
            weight_growth=self.weight_growth(),
            value_norm=float(values.z.norm(dim=-1).mean()),
            value_shift=sum(targets.value_shift) / per_form,
            null_space_rank={str(l): r for l, r in self.projector_rank.items()},
            value_reference=values.reference,
            values_dropped=values.dropped,
            kept_columns=kept_columns,
        )

    def _anchored(self, forms: list[EditRequest], targets) -> tuple[torch.Tensor, float, int]:
        """NAS's anchored target values, the reference norm μ and how many requests were dropped.
        μ comes from the first batch written (on the unedited model) and is kept in its report."""
        layer = self.config.z_layer
        plain = compute_keys(self.model, self.layout, self.tokenizer, forms, [PLAIN_TEMPLATE], [layer]).keys[layer]
        m = mlp_contribution(self.model, self.layout, layer, plain)  # [u, d]
        z, h0 = targets.z.cpu().float(), targets.h0.cpu().float()
        known = [r.value_reference for r in self.history if r.value_reference is not None]
        reference = known[-1] if known else reference_norm((m + z - h0).norm(dim=-1))
        anchored, dropped = anchored_values(z, h0, m, reference)
        return anchored.to(targets.z.dtype), reference, int(dropped.sum())

    def weight_growth(self) -> dict[str, dict[str, float]]:
        """Per edited layer, now against the base: ‖W‖_F / ‖W_base‖_F and σ_max(W) / σ_max(W_base)."""
        if self._base_norms is None:
            # the base copies live on the CPU; their norms are taken where the layer lives (a GPU's
            # seconds, not a CPU's, at 8B scale)
            self._base_norms = {l: _norms(w.to(mlp_out_weight(self.model, self.layout, l).device)) for l, w in self._base_weights.items()}
        growth = {}
        for layer, (fro0, spec0) in self._base_norms.items():
            fro, spec = _norms(mlp_out_weight(self.model, self.layout, layer))
            growth[str(layer)] = {"frobenius": fro / fro0, "spectral": spec / spec0}
        return growth

    def edit_forms(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """The prompts a batch is written under, one column each (see _sourced_forms and _columns)."""
        return self._columns(requests, self._sourced_forms(requests))

    def _columns(self, requests: Sequence[EditRequest], sourced: list[tuple[int, EditRequest]]) -> list[EditRequest]:
        """Of the forms `requests` are trained under (`sourced`), those written as columns: all, or
        with chat_values="trained" the requests' own (the first ones; their chat forms only train δ)."""
        return [form for _, form in self._sourced_columns(requests, sourced)]

    def _sourced_columns(self, requests: Sequence[EditRequest], sourced: list[tuple[int, EditRequest]]) -> list[tuple[int, EditRequest]]:
        """Of `sourced`, the (request index, form) pairs written as columns, in the order of the keys' rows."""
        return sourced[: len(requests)] if self.config.chat_values == "trained" else sourced

    def _column_weights(self, requests: Sequence[EditRequest], sourced: list[tuple[int, EditRequest]], own: int) -> torch.Tensor | None:
        """Per column written (the rows of _sourced_columns), its weight in the solve: rewrite_weight
        for the forms of a re-written request (those after the batch's `own`), 1 for the rest; None
        when all weigh alike."""
        columns = self._sourced_columns(requests, sourced)
        if self.config.rewrite_weight == 1.0 or all(source < own for source, _ in columns):
            return None
        return torch.tensor([self.config.rewrite_weight if source >= own else 1.0 for source, _ in columns])

    def _held_rows(self, written: Sequence[EditRequest] = ()) -> dict[int, set[int]]:
        """Per applied batch still standing (by index), the rows of its keys that C_p holds: all of
        them, or with replace_holds those of facts (subject and prompt) that no later standing batch
        wrote again, nor the batch being written (`written`, its own requests and re-writes): each
        fact is held once, at the keys of its latest write. A function of the journal, so a replay
        or a revert finds it again."""
        held: dict[int, set[int]] = {}
        later = {_fact(r) for r in written}
        for batch in reversed(self.batches):
            if batch.reverted:
                continue
            if not self.config.replace_holds:
                held[batch.report.index] = set(range(len(next(iter(batch.keys.values()))) if batch.keys else 0))
                continue
            requests = batch.written
            held[batch.report.index] = {row for row, (source, _) in enumerate(self._sourced_columns(requests, self._sourced_forms(requests)))
                                        if _fact(requests[source]) not in later}
            later.update(_fact(r) for r in requests)
        return held

    def _release_rewritten(self, requests: Sequence[EditRequest]) -> None:
        """replace_holds: the earlier columns of the facts a batch writes (`requests`, its own and
        its re-writes) leave C_p before it is solved: C_p holds W_out's output there as it is now,
        the answer being replaced."""
        if self.config.replace_holds and requests:
            self._move_holds(self._held_rows(), self._held_rows(written=requests))

    def _move_holds(self, before: dict[int, set[int]], after: dict[int, set[int]]) -> None:
        """C_p from holding the key rows `before` to holding those `after` (each per batch index)."""
        batches = {batch.report.index: batch for batch in self.batches}
        for index in before.keys() | after.keys():
            was, now = before.get(index, set()), after.get(index, set())
            for rows, sign in ((sorted(was - now), -1), (sorted(now - was), 1)):
                if not rows:
                    continue
                for layer, keys in batches[index].keys.items():
                    self._add_to_preserved(layer, keys if len(rows) == len(keys) else keys[rows], sign=sign)

    def _sourced_forms(self, requests: Sequence[EditRequest]) -> list[tuple[int, EditRequest]]:
        """Each form a batch is written under, with the index of the request it comes from: every
        request as given, then, with chat-aware editing, the chat form of each that has a question
        (prompts.chat_form). The chat form gets a column of its own rather than a share of the
        template average, so that W_out maps its key (the subject inside a chat turn; close to the
        cloze key, cosine 0.87 at SmolLM2's layer 7, but not equal) exactly; whose δ that column
        trains is config.chat_values."""
        plain = list(enumerate(requests))
        if not (self.config.chat and has_chat_template(self.tokenizer)):
            return plain
        return [*plain, *((i, chat_form(self.tokenizer, r)) for i, r in plain if r.question is not None)]

    def _kept_keys(self, requests: Sequence[EditRequest]) -> dict[int, torch.Tensor]:
        """Per layer, the keys [m, d0] of every kept subject under its request's prompt (and, with
        chat-aware editing, its question in the chat template): columns whose output W_out must not
        change, so an edit does not spread to subjects whose keys share the prompt's (the same
        relation). Read once, on the model before the batch's update and on the plain prompt, the
        form a neighbour is asked in; none when no request keeps a subject."""
        kept = [replace(r, subject=s, keep_subjects=()) for r in requests for s in r.keep_subjects]
        if not kept:
            return {}
        # the kept subjects' chat questions stay columns under any chat_values: not moving a neighbour's
        # answer in conversation is wanted whichever forms the edit itself is written at
        forms = [form for _, form in self._sourced_forms(kept)]
        return compute_keys(self.model, self.layout, self.tokenizer, forms, [PLAIN_TEMPLATE], self.config.layers).keys

    def _guard_before(self, batch: list[EditRequest]) -> _GuardSnapshot | None:
        """With a guard: the state to put back if it refuses this batch, and the probes' answers now."""
        if self.guard is None:
            return None
        probes = self.guard.usable_probes(batch)
        return _GuardSnapshot(
            weights={l: mlp_out_weight(self.model, self.layout, l).detach().clone() for l in self.config.layers},
            preserved={l: c.clone() for l, c in self.preserved.items()},
            update_sums={l: t.clone() for l, t in self._update_sums.items()},
            probes=probes,
            answers=self.guard.next_tokens(self.model, self.tokenizer, probes))

    def _guard_after(self, batch: list[EditRequest], before: _GuardSnapshot) -> None:
        report = self.batches[-1].report
        after = self.guard.next_tokens(self.model, self.tokenizer, before.probes)
        verdict = self.guard.verdict(report.weight_growth, before.probes, before.answers, after, self.tokenizer)
        if verdict is None:
            return
        with torch.no_grad():
            for layer, weight in before.weights.items():
                mlp_out_weight(self.model, self.layout, layer).copy_(weight)
            for layer, c in before.preserved.items():
                self.preserved[layer].copy_(c)
        self._update_sums = before.update_sums
        self.batches.pop()
        self.events.pop()
        raise GuardTripped(f"batch of {len(batch)} requests (first: {batch[0].text()!r} → {batch[0].target_new!r}) refused by the "
                           f"guard and not applied: {verdict}. The model and the journal are as before it; edit fewer facts per "
                           "batch, or raise --guard-growth / --guard-drift to accept it")

    def _next_id(self) -> int:
        return self.batches[-1].report.index + 1 if self.batches else 0

    def _record(self, batch: AppliedBatch) -> None:
        """Keep an applied batch (its weights, restraint and C_p already in place)."""
        self.batches.append(batch)
        self.events.append(("batch", batch.report.index))

    def _restrain(self, deltas: dict[int, Update], sign: int) -> None:
        """PRUNE-like methods: the model carries W0 + restrain(Σ Δ), the sum kept raw (so a
        revert or a replay gives the same weights)."""
        if self.method.restrain is None:
            return
        options = self.method.option_values(self.config)
        for layer, delta in deltas.items():
            total = self._update_sums.get(layer, torch.zeros(self.layout.hidden_size, self.layout.key_size)) + sign * delta.dense().cpu()
            self._update_sums[layer] = total
            carried = self.method.restrain(total, self._base_math_weight(layer).float(), options)
            weight = mlp_out_weight(self.model, self.layout, layer)
            with torch.no_grad():
                weight.copy_((self._base_weights[layer] + weight_delta_as_stored(self.layout, carried)).to(weight))

    def _base_math_weight(self, layer: int) -> torch.Tensor:
        """The unedited W_out of a layer in math orientation [d, d0], on the CPU (a view)."""
        return weight_as_math(self.layout, self._base_weights[layer])

    def _math_weight(self, layer: int) -> torch.Tensor:
        """W_out of a layer in math orientation [d, d0] (a view)."""
        return weight_as_math(self.layout, mlp_out_weight(self.model, self.layout, layer).detach())

    def _device(self, layer: int) -> torch.device:
        return mlp_out_weight(self.model, self.layout, layer).device

    def _add_to_weight(self, layer: int, delta: Update, sign: int) -> None:
        weight = mlp_out_weight(self.model, self.layout, layer)
        dense = weight_delta_as_stored(self.layout, delta.to(weight.device).dense())  # the thin factors travel
        with torch.no_grad():
            weight.add_(dense.to(weight.dtype), alpha=sign)

    def _rereads_after(self, batches: int) -> bool:
        """Whether C_p is read again once this many batches have been applied (config.earlier_reread)."""
        every = self.config.earlier_reread  # only ever set for a method that keeps C_p (EditConfig refuses it otherwise)
        return bool(every) and batches % every == 0

    def _reread_earlier(self, also: Sequence[EditRequest] = ()) -> None:
        """C_p = Σ kkᵀ over every applied request's forms (and `also`, a batch being applied), keys
        read on the model as it is now: where the model reads the earlier edits today, not where it
        read them when they were written. The journal keeps the keys as written; a replay reads
        again at the same points, so a loaded state carries the same C_p."""
        forms = [form for batch in self.batches if not batch.reverted for form in self.edit_forms(batch.written)] + list(also)
        for layer in self.config.layers:
            self.preserved[layer].zero_()
        for held in self.held:  # held texts are read again too, where the model reads them now
            self._add_held(held)
        if not forms:
            return
        keys = KeyReader(self.model, self.layout, self.tokenizer, forms, self.context_templates()).read(self.config.layers).keys
        for layer in self.config.layers:
            self._add_to_preserved(layer, keys[layer], sign=1)

    def hold(self, texts: Sequence[str], weight: float = 1.0) -> None:
        """Leave W_out's outputs at every position of `texts` as they are (held.py): their keys go
        into C_p, each weighted `weight` (1: as firmly as an earlier edit's). Before the first batch
        only, so that they are held as the unedited model reads them; journals record them."""
        held = HeldTexts(tuple(texts), weight)
        if self.events:
            raise ValueError("hold texts before the first batch: C_p holds them as the unedited model reads them "
                             "(start from the unedited model, hold, then edit)")
        if not self.method.keeps_preserved(self.config):
            raise ValueError(f"method {self.config.method} without the projection has no C_p to hold texts in; "
                             "use a method that keeps it (alphaedit, memit-seq, or any method with --project)")
        self._add_held(held)
        self.held.append(held)

    def _add_held(self, held: HeldTexts) -> None:
        layers = self.config.layers
        moments = held_moments(self.model, self.layout, self.tokenizer, held, layers, {l: self._device(l) for l in layers})
        for layer in layers:
            self.preserved[layer].add_(moments[layer])

    def _add_to_preserved(self, layer: int, keys: torch.Tensor, sign: int) -> None:
        keys = keys.to(self.preserved[layer].device)
        self.preserved[layer].add_(keys.T @ keys, alpha=sign)

    def _rehearses_before(self, batch_number: int) -> bool:
        """Whether the batch_number-th batch (from 1) rehearses lapsed earlier edits (config.rehearse)."""
        every = self.config.rehearse
        return bool(every) and batch_number > 1 and (batch_number - 1) % every == 0

    def _rehearsal(self, batch: list[EditRequest]) -> Rehearsal:
        """The earlier edits to write again with `batch` (rehearsal.py), checked on the model as it is."""
        return rehearsal_for(self.batches, batch, lambda requests: edit_holds(self.model, self.tokenizer, requests, self.layout),
                             most=self.config.rehearse_cap)

    def _efficacy(self, requests: list[EditRequest]) -> float | None:
        """The batch report's efficacy: the share of `requests` with a true object whose new one is preferred."""
        known = [r for r in requests if r.target_true]
        # the editor's layout: it may come from --layout
        return sum(edit_holds(self.model, self.tokenizer, known, self.layout)) / len(known) if known else None

    def revert(self, batch_id: int) -> None:
        """Remove a batch's update from the weights and its keys from C_p.

        Reverting the latest batch restores the weights before it (to float rounding).
        Reverting an older one subtracts its Δ from the sum: the later batches stay as they
        were computed, on a model that still contained it, so their edits usually hold but
        are no longer exactly what a sequence without that batch would have produced.
        """
        batch = self._batch(batch_id)
        if batch.reverted:
            raise ValueError(f"batch {batch_id} is already reverted")
        for layer, delta in batch.deltas.items():
            self._add_to_weight(layer, delta, sign=-1)
        self._restrain(batch.deltas, sign=-1)
        held = self._held_rows()
        batch.reverted = True
        if self.config.earlier_reread:
            self._reread_earlier()  # C_p was read on a model that carried the batch: read it without
        else:  # its keys leave C_p; with replace_holds, the earlier writes of the facts it wrote again come back
            self._move_holds(held, self._held_rows())
        self.events.append(("revert", batch_id))

    def _batch(self, batch_id: int) -> AppliedBatch:
        for batch in self.batches:
            if batch.report.index == batch_id:
                return batch
        raise ValueError(f"no batch {batch_id}: the batches are {[b.report.index for b in self.batches]}")
