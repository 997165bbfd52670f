"""An Editor's life on disk: the journal it saves to and replays from, the model or the updates it
exports. `Editor` inherits this, so editor.py holds the batch algorithm alone.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .batch import AppliedBatch, BatchReport, now
from .config import EditConfig, describe_preset
from .files import atomic_save_tensors, commit
from .held import HeldTexts
from .journal import Journal, JournalError
from .layouts import Layout
from .locks import journal_write_lock
from .requests import parse_requests
from .stats import CorpusSpec, StatsCache
from .updates import LowRankDelta


E = TypeVar("E", bound="Persistence")


# What save_pretrained writes for a causal LM and its tokenizer: the only files an export replaces.
SAVED_MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                     "pytorch_model*.bin.index.json", "tokenizer*.json", "tokenizer.model", "special_tokens_map.json",
                     "added_tokens.json", "chat_template.*", "vocab.*", "merges.txt", "*.gguf")


def check_export_folder(target: Path, overwrite: bool = False) -> bool:
    """May the edited model be written to the folder `target`? True if it replaces one there.

    An export never overwrites without `overwrite`, and replaces only a folder that holds a saved
    model (config.json) and nothing else: a mistyped path, or notes kept beside a model, must not
    cost the user a file.
    """
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file; the edited model is written to a folder")
    if not (target.is_dir() and any(target.iterdir())):
        return False
    if not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; choose a new folder or pass --force to replace the model in it")
    if not (target / "config.json").is_file():
        raise FileExistsError(f"{target} is not empty and holds no saved model (no config.json); it will not be replaced, even with --force")
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir()
                     if p.is_dir() or not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in SAVED_MODEL_FILES))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise FileExistsError(f"{target} holds more than a saved model ({shown}); it will not be replaced, even with --force: "
                              "move those out or choose a new folder")
    return True


def check_deltas_file(target: Path, overwrite: bool = False) -> None:
    """May the updates be written to the file `target`? Never over a folder, never over a file
    without `overwrite`, and even with it only over an earlier export of updates (a safetensors
    file whose metadata names a base identity): a mistyped --out must not cost the user a file."""
    if target.is_dir():
        raise FileExistsError(f"{target} is a folder; the updates are one file (e.g. {target / 'deltas.safetensors'})")
    if not target.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{target} exists; choose a new file name or pass --force to replace it")
    try:
        with safe_open(str(target), framework="pt") as f:
            ours = "base_identity" in (f.metadata() or {})
    except Exception:  # not safetensors at all: safetensors raises its own error types
        ours = False
    if not ours:
        raise FileExistsError(f"{target} is not an export of updates (no alphaedit metadata); it will not be replaced, even with --force")


class Persistence:
    """save_state / load_state / export for an Editor (which provides the model, config, batches, events, ...)."""


    def header(self) -> dict:
        """What a journal records once: the base model, layout, config and statistics reference."""
        return {
            "model": self.model_spec,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "layout": self.layout.to_dict(),
            "config": self.config.to_dict(),
            "preset_reason": describe_preset(self.model.config),
            "corpus": asdict(self.corpus),
            "templates": self.context_templates(),
            "base_identity": self.base_identity,
            "projector_rank": {str(k): v for k, v in self.projector_rank.items()},
            "held_texts": [held.to_dict() for held in self.held],
        }

    def save_state(self, directory: str | os.PathLike) -> Journal:
        """Append to the journal in `directory` every event it does not have yet (creating it).

        Each batch is committed atomically; an interrupted save leaves a valid shorter journal.
        """
        # Reuse the journal this editor last wrote to: reopening verifies every file's checksum,
        # which would make a long sequence of per-batch saves quadratic.
        root = Path(directory).resolve()
        if not Journal.exists(root):
            Journal.check_new(root)  # a file, or a damaged state, is refused before the lock creates anything
        with journal_write_lock(root):  # read, check and append as one step against other processes
            if self._journal is not None and self._journal.root.resolve() == root and self._journal.unchanged_on_disk():
                journal = self._journal
            else:
                journal = Journal.open(root) if Journal.exists(root) else Journal.create(root, self.header())
            self._journal = journal
            if journal.header["base_identity"] != self.base_identity:
                raise JournalError(f"{directory} belongs to another base model; save to a new folder")
            if journal.header.get("held_texts", []) != [held.to_dict() for held in self.held]:
                raise JournalError(f"{directory} was edited holding other texts (Editor.hold); save to a new folder")
            written = len(journal.entries)
            if [(e["kind"], e.get("id", e.get("batch"))) for e in journal.entries] != self.events[:written]:
                raise JournalError(f"{directory} holds a different edit history than this editor; save to a new folder")
            for kind, batch_id in self.events[written:]:
                if kind == "batch":
                    batch = self._batch(batch_id)
                    journal.append_batch(batch_id, [r.to_dict() for r in batch.written], asdict(batch.report), batch.tensors())
                else:
                    journal.append_revert(batch_id, now())
        return journal

    @classmethod
    def load_state(
        cls: type[E],
        directory: str | os.PathLike,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        cache: StatsCache | None = None,
        show_progress: bool = True,
    ) -> E:
        """Replay a journal onto `model`, which must be the unedited base model it started from."""
        journal = Journal.open(directory)
        header = journal.header
        editor = cls(
            model,
            tokenizer,
            EditConfig.from_dict(header["config"]),
            layout=Layout.from_dict(header["layout"]),
            corpus=CorpusSpec(**header["corpus"]),
            cache=cache,
            model_spec=header["model"],
            show_progress=show_progress,
        )
        if editor.base_identity != header["base_identity"]:
            raise JournalError(
                f"{directory} was made on another base model ({header['model']}, identity {header['base_identity']}; "
                f"this model has {editor.base_identity}); load the unedited model it started from, {header['model']}"
            )
        editor.templates = header["templates"]
        for entry in header.get("held_texts", []):  # journals from before Editor.hold have none
            held = HeldTexts.from_dict(entry)
            editor.hold(held.texts, held.weight)
        editor.apply_journal(journal)
        editor._journal = journal
        return editor

    def apply_journal(self, journal: Journal) -> None:
        """Replay every entry of the journal, in order, onto this editor's model."""
        for entry in journal.entries:
            if entry["kind"] == "revert":
                self.revert(entry["batch"])
                continue
            files = journal.batch(entry["id"])
            report = BatchReport(**files.report)
            requests = parse_requests(files.requests, source=str(files.path / "requests.json"))
            batch = AppliedBatch.from_tensors(report, requests, files.tensors(), self.config.layers)
            for layer, delta in batch.deltas.items():
                self._add_to_weight(layer, delta, sign=1)
            self._restrain(batch.deltas, sign=1)
            self._release_rewritten(batch.written)  # as the edit did before its solve
            for layer, keys in batch.keys.items():
                self._add_to_preserved(layer, keys, sign=1)
            self._record(batch)
            if self._rereads_after(len(self.batches)):  # where the edit read C_p again, so does the replay
                self._reread_earlier()

    def export(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the edited model with save_pretrained (plain transformers loads it), atomically.

        `overwrite` replaces a folder that holds a saved model (config.json); the old one is
        moved aside and deleted only once the new one is in place.
        """
        target = Path(directory)
        occupied = check_export_folder(target, overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        aside = None
        try:
            self.model.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            if occupied:
                aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-old-")) / "model"
                commit(target, aside)
            elif target.exists():
                target.rmdir()
            try:
                commit(staging, target)
            except OSError:
                if aside is not None:
                    os.replace(aside, target)  # put the old model back
                raise
            if aside is not None:
                shutil.rmtree(aside.parent, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def export_deltas(self, path: str | os.PathLike) -> Path:
        """Just the updates, per layer, of every batch still applied, in math orientation [d, d0]
        (add it, transposed for Conv1D weights, see the metadata, to the W_out named there):

        - low-rank methods: the concatenated factors, Δ_l = left @ rightᵀ ("format": "low_rank");
        - masked or restrained updates (RECT, PRUNE): Δ_l itself ("format": "dense").
        """
        applied = [b for b in self.batches if not b.reverted]
        dense = self.method.restrain is not None or any(not isinstance(d, LowRankDelta) for b in applied for d in b.deltas.values())
        tensors = {}
        for layer in self.config.layers:
            if dense:
                tensors[f"layer.{layer}.delta"] = (self._math_weight(layer).cpu().float() - self._base_math_weight(layer).float()).contiguous()
                continue
            tensors[f"layer.{layer}.left"] = torch.cat([b.deltas[layer].left for b in applied], dim=1) if applied else torch.zeros(self.layout.hidden_size, 0)
            tensors[f"layer.{layer}.right"] = torch.cat([b.deltas[layer].right for b in applied], dim=1) if applied else torch.zeros(self.layout.key_size, 0)
        metadata = {f"layer.{l}.module": self.layout.mlp_out_path(l) for l in self.config.layers}
        metadata["weight_transposed"] = str(self.layout.weight_transposed)
        metadata["base_identity"] = str(self.base_identity)
        metadata["format"] = "dense" if dense else "low_rank"
        path = Path(path)
        atomic_save_tensors(tensors, path, metadata)
        return path
