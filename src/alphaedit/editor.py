"""The Editor: owns the model, its layout, the edit config, statistics, projectors and C_p.

One batch (ALGORITHM.md §1.10):

    Z = h0 + argmin δ  for every request at once               (targets.py)
    for idx, l in enumerate(layers):
        K = keys(l) on the current model;  R = (Z − z_current) / (layers left)
        W_l += update_rule(K, R, statistics of l)               (updates.py)
    C_p += K Kᵀ with keys recomputed on the edited model

Nothing lives in module globals: two editors on two models never see each other's state.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .config import EditConfig, config_for_model
from .keys import compute_keys
from .layouts import Layout, detect_layout, mlp_out_weight, weight_delta_as_stored
from .progress import progress_bar
from .prompts import generate_context_templates
from .requests import EditRequest, check_conflicts
from .scoring import prefers_new
from .stats import CorpusSpec, StatsCache, second_moments
from .stats.cache import atomic_save, model_identity
from .targets import compute_targets
from .updates import UPDATE_RULES, LayerStatistics, null_space_projector, uses_preserved, uses_projector

STATE_FORMAT = 1


@dataclass
class BatchReport:
    """What one applied batch did; kept in the editor's history and saved with its state."""

    index: int
    requests: int
    seconds: float
    z_loss: float  # mean final loss of the z optimisation
    z_steps: float  # mean Adam steps per request
    target_prob: float  # mean target-token probability reached at the z layer
    efficacy: float | None  # fraction of requests whose new object beats the true one after the edit
    delta_norms: dict[str, float] = field(default_factory=dict)  # layer -> ‖Δ‖_F


class Editor:
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
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.layout = layout or detect_layout(model)
        self.config = config or config_for_model(model.config)
        bad = [layer for layer in self.config.layers if not 0 <= layer < self.layout.num_layers]
        if bad:
            raise ValueError(f"layers {bad} do not exist: the model has {self.layout.num_layers} layers (0..{self.layout.num_layers - 1})")
        self.corpus = corpus or CorpusSpec()
        self.cache = cache if cache is not None else StatsCache()
        self.model_spec = model_spec
        self.show_progress = show_progress
        self.templates: list[str] | None = None
        self.history: list[BatchReport] = []
        layers = self.config.layers
        self.base_identity = model_identity(model, self.layout, layers)
        # The unedited W_out of each edited layer, on the CPU: statistics always describe the base
        # model, whenever they are first needed.
        self._base_weights = {l: mlp_out_weight(model, self.layout, l).detach().to("cpu", copy=True) for l in layers}
        self._statistics: dict[int, LayerStatistics] | None = None
        self.preserved = {l: torch.zeros(self.layout.key_size, self.layout.key_size) for l in layers}
        self.projector_rank: dict[int, int] = {}

    # -- lazily prepared state -------------------------------------------------------------

    def context_templates(self) -> list[str]:
        if self.templates is None:
            c = self.config
            self.templates = generate_context_templates(self.model, self.tokenizer, c.context_template_words, c.context_template_length, c.seed)
        return self.templates

    def statistics(self) -> dict[int, LayerStatistics]:
        """C0 (and, for AlphaEdit, P) per edited layer, measured on the base model."""
        if self._statistics is None:
            with self._base_weights_in_place():
                moments = second_moments(self.model, self.layout, self.tokenizer, self.config.layers, self.corpus, self.cache, self.show_progress)
            self._statistics = {}
            for layer, moment in moments.items():
                projector = None
                if uses_projector(self.config.method):
                    projector, self.projector_rank[layer] = null_space_projector(moment.moment, self.config.nullspace_threshold)
                self._statistics[layer] = LayerStatistics(moment.moment, projector, self.preserved[layer])
        return self._statistics

    @contextmanager
    def _base_weights_in_place(self) -> Iterator[None]:
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

    def edit(
        self,
        requests: Sequence[EditRequest],
        batch_size: int | None = None,
        on_batch: Callable[[BatchReport], None] | None = None,
    ) -> list[BatchReport]:
        """Apply the requests in sequential batches of `batch_size` (all at once by default).

        `on_batch` runs after each batch (the CLI saves the state there, so an interrupted run
        keeps every finished batch).
        """
        if not requests:
            return []
        size = batch_size or len(requests)
        batches = [list(requests[i : i + size]) for i in range(0, len(requests), size)]
        for batch in batches:
            check_conflicts(batch)  # before any weight moves: a bad batch changes nothing
        self.statistics()
        self.context_templates()
        reports = []
        with progress_bar(f"editing ({self.config.method})", total=len(requests), enabled=self.show_progress) as advance:
            for batch in batches:
                reports.append(self._edit_batch(batch))
                if on_batch is not None:
                    on_batch(reports[-1])
                advance(len(batch))
        return reports

    def _edit_batch(self, requests: list[EditRequest]) -> BatchReport:
        start = time.perf_counter()
        config, layers = self.config, self.config.layers
        templates, statistics = self.context_templates(), self.statistics()
        targets = compute_targets(self.model, self.layout, self.tokenizer, requests, templates, config)
        z = targets.z.cpu()
        norms = {}
        for i, layer in enumerate(layers):
            current = compute_keys(self.model, self.layout, self.tokenizer, requests, templates, [layer], z_layer=config.z_layer)
            resid = (z - current.z_current) / (len(layers) - i)
            delta = UPDATE_RULES[config.method](current.keys[layer].T, resid.T, statistics[layer], config)
            self._add_to_weight(layer, delta)
            norms[str(layer)] = float(delta.norm())
        if uses_preserved(config.method):
            final = compute_keys(self.model, self.layout, self.tokenizer, requests, templates, layers)
            for layer in layers:
                self.preserved[layer] += final.keys[layer].T @ final.keys[layer]
        report = BatchReport(
            index=len(self.history),
            requests=len(requests),
            seconds=time.perf_counter() - start,
            z_loss=sum(targets.loss) / len(requests),
            z_steps=sum(targets.steps) / len(requests),
            target_prob=sum(targets.target_prob) / len(requests),
            efficacy=self._efficacy(requests),
            delta_norms=norms,
        )
        self.history.append(report)
        return report

    def _add_to_weight(self, layer: int, delta: torch.Tensor) -> None:
        weight = mlp_out_weight(self.model, self.layout, layer)
        with torch.no_grad():
            weight += weight_delta_as_stored(self.layout, delta).to(weight.device, weight.dtype)

    def _efficacy(self, requests: list[EditRequest]) -> float | None:
        known = [r for r in requests if r.target_true]
        if not known:
            return None
        wins = prefers_new(self.model, self.tokenizer, [r.text() for r in known], [r.target_new for r in known], [r.target_true for r in known])
        return float(wins.float().mean())

    # -- persistence ---------------------------------------------------------------------------

    def save_state(self, directory: str | os.PathLike) -> Path:
        """Write the edited weights, C_p and everything needed to continue, each file atomically.

        editor.json is written last and carries digests of the tensor files, so a state whose
        writing was interrupted is refused on load instead of silently mixing two states.
        """
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        weights = {f"layer.{l}": mlp_out_weight(self.model, self.layout, l).detach().cpu() for l in self.config.layers}
        preserved = {f"layer.{l}": c for l, c in self.preserved.items()}
        digests = {}
        for name, tensors in (("weights.safetensors", weights), ("preserved.safetensors", preserved)):
            atomic_save(tensors, root / name, {"format": str(STATE_FORMAT)})
            digests[name] = _file_digest(root / name)
        manifest = {
            "format": STATE_FORMAT,
            "model": self.model_spec,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "layout": self.layout.to_dict(),
            "config": self.config.to_dict(),
            "corpus": asdict(self.corpus),
            "templates": self.templates,
            "base_identity": self.base_identity,
            "projector_rank": {str(k): v for k, v in self.projector_rank.items()},
            "history": [asdict(r) for r in self.history],
            "files": digests,
        }
        _atomic_write_text(root / "editor.json", json.dumps(manifest, indent=2))
        return root

    @staticmethod
    def read_manifest(directory: str | os.PathLike) -> dict:
        path = Path(directory) / "editor.json"
        if not path.exists():
            raise FileNotFoundError(f"{directory} is not an alphaedit state (no editor.json)")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: unsupported state format {manifest.get('format')!r} (expected {STATE_FORMAT})")
        for name, digest in manifest["files"].items():
            if _file_digest(Path(directory) / name) != digest:
                raise ValueError(f"{Path(directory) / name} does not match editor.json (interrupted write or corruption)")
        return manifest

    @classmethod
    def load_state(
        cls,
        directory: str | os.PathLike,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        cache: StatsCache | None = None,
        show_progress: bool = True,
    ) -> Editor:
        """Continue a sequence of edits: `model` must be the same base model the state started from."""
        manifest = cls.read_manifest(directory)
        editor = cls(
            model,
            tokenizer,
            EditConfig.from_dict(manifest["config"]),
            layout=Layout.from_dict(manifest["layout"]),
            corpus=CorpusSpec(**manifest["corpus"]),
            cache=cache,
            model_spec=manifest["model"],
            show_progress=show_progress,
        )
        if editor.base_identity != manifest["base_identity"]:
            raise ValueError(
                f"{directory} was made on another base model (identity {manifest['base_identity']}, "
                f"this model has {editor.base_identity}); load the unedited model it started from"
            )
        weights = load_file(str(Path(directory) / "weights.safetensors"))
        with torch.no_grad():
            for layer in editor.config.layers:
                target = mlp_out_weight(model, editor.layout, layer)
                target.copy_(weights[f"layer.{layer}"].to(target.device, target.dtype))
        preserved = load_file(str(Path(directory) / "preserved.safetensors"))
        for layer in editor.config.layers:
            editor.preserved[layer].copy_(preserved[f"layer.{layer}"])
        editor.templates = manifest["templates"]
        editor.history = [BatchReport(**r) for r in manifest["history"]]
        return editor


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
