"""On-disk cache of second moments, keyed and checked by model identity, layer and corpus.

A cached file carries its own description in the safetensors metadata; loading compares that
description with what the caller asks for and refuses a mismatch, saying what differs, so a
statistic can never silently belong to another model or corpus. Every file written here also
carries the sha256 of its tensors' bytes ("tensors_sha256"), checked on load: a flipped bit is
refused with the file's name, never used. (Files written before this check have none and are
read as they are.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..files import alphaedit_home, atomic_save_tensors
from ..layouts import Layout, mlp_out_weight
from .corpus import CorpusSpec

FORMAT_VERSION = "1"
CHECKSUM = "tensors_sha256"


def tensors_digest(tensors: dict[str, torch.Tensor], digest: "hashlib._Hash | None" = None) -> str:
    """sha256 of the tensors by name, dtype, shape and bytes, in name order; continues `digest` when given."""
    digest = digest or hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checked(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """atomic_save_tensors with the tensors' checksum in the metadata."""
    atomic_save_tensors(tensors, path, {**(metadata or {}), CHECKSUM: tensors_digest(tensors)})


def load_checked(path: Path, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a file written by save_checked; a damaged file raises ValueError naming it and `fix`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own types for truncated or garbled files
        raise ValueError(f"{path} cannot be read ({e}); {fix}") from e
    stored = metadata.get(CHECKSUM)
    if stored is not None and stored != tensors_digest(tensors):
        raise ValueError(f"{path} does not match its checksum: the file is corrupted; {fix}")
    return tensors, metadata


def config_digest(model: nn.Module) -> str:
    config = model.config.to_dict()
    # Fields that name or place the model but do not change its function.
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "_attn_implementation_autoset"):
        config.pop(key, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_digest(model: nn.Module, layout: Layout, layers: list[int]) -> str:
    digest = hashlib.sha256()
    for layer in layers:
        weight = mlp_out_weight(model, layout, layer).detach().to("cpu", torch.float32).contiguous()
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_digest(tokenizer: object) -> str:
    """The tokenizer decides the token windows (and whether a BOS starts each), so it keys the cache."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_identity(model: nn.Module, layout: Layout, layers: list[int]) -> dict[str, str]:
    """What makes statistics of these layers belong to this model: its config and edited weights."""
    return {"config": config_digest(model), "weights": weights_digest(model, layout, layers)}


def _differences(stored: dict[str, str], wanted: dict[str, str]) -> dict[str, tuple[str | None, str]]:
    """Description fields where a file's metadata differs from what is wanted: key -> (file's, wanted)."""
    return {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}


class StatsCache:
    """Second moments under `<home>/stats/<config digest>/`, one file per layer and corpus."""

    def __init__(self, root: Path | None = None):
        self.root = (root or alphaedit_home()) / "stats"

    def path(self, description: dict[str, str]) -> Path:
        key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
        return self.root / description["config"] / f"layer{description['layer']}-{key}.safetensors"

    def load(self, description: dict[str, str]) -> tuple[torch.Tensor, int] | None:
        path = self.path(description)
        if not path.exists():
            return None
        tensors, stored = load_checked(path, "delete it to recompute")
        differs = _differences(stored, description)
        if differs:
            detail = "; ".join(f"{k}: file has {a!r}, wanted {b!r}" for k, (a, b) in differs.items())
            raise ValueError(f"statistics file {path} does not match this model/corpus ({detail}); delete it to recompute")
        return tensors["moment"], int(stored["count"])

    def near_misses(self, description: dict[str, str]) -> list[tuple[Path, dict[str, tuple[str | None, str]]]]:
        """Cached statistics of the same model and layer that differ from `description`, with what differs:
        shown before a long pass starts, so a statistic computed with other settings is never silently redone."""
        folder = self.root / description["config"]
        found = []
        for path in sorted(folder.glob(f"layer{description['layer']}-*.safetensors")) if folder.is_dir() else []:
            if path.stem.endswith("-projector"):
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    stored = f.metadata() or {}
            except Exception:  # an unreadable file is no candidate
                continue
            differs = _differences(stored, description)
            if differs:
                found.append((path, differs))
        return found

    def _projector_path(self, description: dict[str, str]) -> Path:
        return self.path(description).with_name(self.path(description).stem + "-projector.safetensors")

    def load_projector(self, description: dict[str, str]) -> torch.Tensor | None:
        path = self._projector_path(description)
        return load_checked(path, "import the projector again")[0]["projector"] if path.exists() else None

    def save_projector(self, description: dict[str, str], projector: torch.Tensor) -> None:
        save_checked({"projector": projector}, self._projector_path(description), description)

    # -- sampled "self" corpora and pass checkpoints live beside the statistics --------------

    def _corpus_path(self, key: dict[str, str]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.root / key["config"] / f"corpus-self-{digest}.safetensors"

    def load_corpus(self, key: dict[str, str]) -> list[list[int]] | None:
        path = self._corpus_path(key)
        if not path.exists():
            return None
        tensors, _ = load_checked(path, "delete it to sample the corpus again")
        lengths = tensors["lengths"].tolist()
        return [chunk.tolist() for chunk in torch.split(tensors["tokens"], lengths)]

    def save_corpus(self, key: dict[str, str], windows: list[list[int]]) -> None:
        tokens = torch.tensor([t for w in windows for t in w], dtype=torch.int64)
        lengths = torch.tensor([len(w) for w in windows], dtype=torch.int64)
        save_checked({"tokens": tokens, "lengths": lengths}, self._corpus_path(key), key)

    def _checkpoint_path(self, pass_key: str) -> Path:
        return self.root / "checkpoints" / f"pass-{pass_key}.safetensors"

    def load_checkpoint(self, pass_key: str) -> dict[str, torch.Tensor] | None:
        path = self._checkpoint_path(pass_key)
        if not path.exists():
            return None
        return load_checked(path, "run `alphaedit stats` with --restart to start this pass over")[0]

    def save_checkpoint(self, pass_key: str, state: dict[str, torch.Tensor]) -> None:
        save_checked(state, self._checkpoint_path(pass_key))

    def drop_checkpoint(self, pass_key: str) -> None:
        self._checkpoint_path(pass_key).unlink(missing_ok=True)

    def save(self, description: dict[str, str], moment: torch.Tensor, count: int) -> Path:
        path = self.path(description)
        save_checked({"moment": moment}, path, {**description, "count": str(count)})
        return path


def statistic_description(model, layout: Layout, tokenizer, layer: int, spec: CorpusSpec) -> dict[str, str]:
    """Everything a cached statistic must match: model (config + this layer's W_out), tokenizer, corpus."""
    return {
        **model_identity(model, layout, [layer]),
        "tokenizer": tokenizer_digest(tokenizer),
        **spec.description(),
        "dtype": "float64",  # of the stored moment
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "version": FORMAT_VERSION,
        "layer": str(layer),
    }
