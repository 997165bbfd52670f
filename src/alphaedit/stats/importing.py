"""Bring in statistics made by other tools, so users' existing files keep working.

* MEMIT / EasyEdit / AlphaEdit `layer_stats` files (`.npz`, keys `mom2.mom2` = Σ k kᵀ and
  `mom2.count`): imported as second moments C0 = mom2 / count.
* AlphaEdit's `null_space_project.pt` (a [layers, d0, d0] stack of projectors): imported as
  projectors, read with `torch.load(weights_only=True)` and checked to be projectors.

Both land in the checked cache under the corpus name `import:PATH`; `--corpus import:PATH`
then uses them. The authors' statistics come one file per layer: PATH may be a folder of them,
each matched to its layer by the number in its name (`model.layers.5.mlp.down_proj_..._mom2_100000.npz`),
so one `--corpus import:FOLDER` drives a multi-layer edit. Shapes are checked against the model;
nothing is unpickled.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..layouts import Layout
from .cache import statistic_description
from .corpus import IMPORT, CorpusSpec
from .moments import SecondMoment

LAYER_IN_NAME = re.compile(r"\.(\d+)\.")  # "model.layers.5.mlp..." -> 5 (the last such number)


def import_spec(path: Path) -> str:
    return IMPORT + str(Path(path).expanduser().resolve())


def _layers_for(path: Path, layers: Sequence[int] | None, count: int) -> list[int]:
    if layers and len(layers) == count:
        return list(layers)
    found = LAYER_IN_NAME.findall(path.name)
    if count == 1 and found:
        return [int(found[-1])]
    raise ValueError(f"{path}: holds {count} layer(s); name them with --layers (e.g. --layers 4-8)")


def read_npz_moment(path: Path, key_size: int) -> SecondMoment:
    with np.load(path, allow_pickle=False) as data:
        if "mom2.mom2" not in data or "mom2.count" not in data:
            raise ValueError(f"{path}: expected keys mom2.mom2 and mom2.count (MEMIT layer_stats format), found {sorted(data.files)}")
        total = torch.from_numpy(np.asarray(data["mom2.mom2"], dtype=np.float64))
        count = int(np.asarray(data["mom2.count"]))
    if total.shape != (key_size, key_size):
        raise ValueError(f"{path}: mom2 has shape {tuple(total.shape)}, this model's W_out input is {key_size}-dimensional")
    if count <= 0:
        raise ValueError(f"{path}: mom2.count is {count}")
    return SecondMoment(total / count, count)


def read_projectors(path: Path, key_size: int) -> torch.Tensor:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    stack = loaded if isinstance(loaded, torch.Tensor) else None
    if stack is None or stack.dim() not in (2, 3):
        raise ValueError(f"{path}: expected a tensor [layers, d0, d0] of projectors, found {type(loaded).__name__}")
    stack = stack.double().reshape(-1, *stack.shape[-2:])
    if tuple(stack.shape[1:]) != (key_size, key_size):
        raise ValueError(f"{path}: projectors are {tuple(stack.shape[1:])}, this model's W_out input is {key_size}-dimensional")
    for i, P in enumerate(stack):
        if not torch.allclose(P, P.T, atol=1e-4) or not torch.allclose(P @ P, P, atol=1e-3):
            raise ValueError(f"{path}: matrix {i} is not an orthogonal projector (P = Pᵀ = P²)")
    return stack.float()


def import_statistics(path: Path, model, layout: Layout, tokenizer, layers: Sequence[int] | None, cache) -> dict[int, SecondMoment]:
    """Store the file's statistics in the cache for this model; returns the second moments (npz)."""
    path = Path(path)
    if path.is_dir():
        return _import_folder(path, model, layout, tokenizer, layers, cache)
    if not path.is_file():
        raise ValueError(f"--import {path}: no such file or folder")
    spec = CorpusSpec(import_spec(path))
    if path.suffix == ".npz":
        moment = read_npz_moment(path, layout.key_size)
        (layer,) = _layers_for(path, layers, 1)
        cache.save(statistic_description(model, layout, tokenizer, layer, spec), moment.moment, moment.count)
        return {layer: moment}
    if path.suffix in (".pt", ".pth"):
        stack = read_projectors(path, layout.key_size)
        for layer, projector in zip(_layers_for(path, layers, len(stack)), stack):
            cache.save_projector(statistic_description(model, layout, tokenizer, layer, spec), projector)
        return {}
    raise ValueError(f"--import {path}: expected a .npz (mom2 statistics) or .pt (null_space_project) file")


def _import_folder(folder: Path, model, layout: Layout, tokenizer, layers: Sequence[int] | None, cache) -> dict[int, SecondMoment]:
    """Every .npz in the folder, one layer each (the number in its name); `layers` picks some of them."""
    by_layer: dict[int, Path] = {}
    for path in sorted(folder.glob("*.npz")):
        found = LAYER_IN_NAME.findall(path.name)
        if not found:
            raise ValueError(f"--import {folder}: {path.name} names no layer; the authors' files are named like "
                             "model.layers.5.mlp.down_proj_float32_mom2_100000.npz")
        layer = int(found[-1])
        if layer in by_layer:
            raise ValueError(f"--import {folder}: {by_layer[layer].name} and {path.name} are both layer {layer}; keep one")
        by_layer[layer] = path
    if not by_layer:
        raise ValueError(f"--import {folder}: no .npz statistics in this folder")
    missing = sorted(set(layers or ()) - set(by_layer))
    if missing:
        raise ValueError(f"--import {folder}: no file for layers {missing} (found layers {sorted(by_layer)})")
    spec = CorpusSpec(import_spec(folder))
    moments = {}
    for layer in layers or sorted(by_layer):
        moments[layer] = read_npz_moment(by_layer[layer], layout.key_size)
        cache.save(statistic_description(model, layout, tokenizer, layer, spec), moments[layer].moment, moments[layer].count)
    return moments
