"""What an editing method is, and the one place that turns its parts into a layer's update.

Every method here edits the same way (ALGORITHM.md §1): target values z, then per layer the keys
K ∈ R^{d0×u} and residuals R ∈ R^{d×u} of the batch, then a closed form for Δ ∈ R^{d×d0}. They
differ in three places, each an optional part of `Method`:

    solve      the closed form, without the projection (MEMIT's ridge on C0, EMMET's equality constraints)
    finish     what becomes of a layer's Δ once the batch is solved (RECT keeps its largest entries)
    restrain   what becomes of the sum of all updates after each batch (PRUNE bounds its spectrum)

AlphaEdit's null-space projection is not a method but a switch on any of them (`--project`): it
replaces `solve` by the projected closed form (projection.py), and keeps `finish` and `restrain`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..updates import LayerStatistics, LowRankDelta, Update
from .projection import projected_solve

if TYPE_CHECKING:  # the config names methods; methods only read it
    from ..config import EditConfig

# (K [d0, u], R [d, u], statistics, config, the method's options) -> Δ = R Vᵀ
Solve = Callable[[torch.Tensor, torch.Tensor, LayerStatistics, "EditConfig", Any], LowRankDelta]
# (the batch's Δ of a layer, that layer's W [d, d0] before the batch, options) -> the Δ applied
Finish = Callable[[LowRankDelta, torch.Tensor, Any], Update]
# (Σ of every applied batch's Δ [d, d0], the unedited W [d, d0], options) -> the sum the model carries
Restrain = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class NoOptions:
    """A method without hyperparameters of its own (the shared ones are EditConfig's)."""


@dataclass(frozen=True)
class Method:
    """One editing method: its closed form, its own hyperparameters and where it came from."""

    name: str
    summary: str  # one line for `alphaedit methods` and --help
    source: str  # the paper and the code followed, file and line
    solve: Solve
    options: type = NoOptions  # a dataclass; its defaults are the paper's
    projected_by_default: bool = False
    reads_preserved: bool = False  # its solve reads C_p even without the projection (MEMIT-seq)
    finish: Finish | None = None
    restrain: Restrain | None = None

    def projects(self, config: EditConfig) -> bool:
        return self.projected_by_default if config.project is None else config.project

    def keeps_preserved(self, config: EditConfig) -> bool:
        """Whether the editor must accumulate C_p = Σ K Kᵀ over the batches (the projected solve reads it)."""
        return self.projects(config) or self.reads_preserved

    def option_values(self, config: EditConfig) -> Any:
        """This method's options: the defaults, with config.method_options on top (unknown names refused)."""
        known = {f.name: f for f in dataclasses.fields(self.options)}
        unknown = sorted(set(config.method_options) - set(known))
        if unknown:
            offered = ", ".join(known) or "none"
            raise ValueError(f"method {self.name} has no option {unknown[0]!r} (its options: {offered})")
        return self.options(**{k: _typed(known[k], v) for k, v in config.method_options.items()})

    def option_defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(self.options)}

    def layer_update(self, keys: torch.Tensor, resid: torch.Tensor, stats: LayerStatistics, config: EditConfig) -> LowRankDelta:
        """The batch's Δ for one layer, before `finish`: the projected closed form or the method's own."""
        if self.projects(config):
            return projected_solve(keys, resid, stats, config)
        return self.solve(keys, resid, stats, config, self.option_values(config))


def _typed(field: dataclasses.Field, value: Any) -> Any:
    """An option given as text on the command line, in its field's type."""
    kind = field.type if isinstance(field.type, type) else {"float": float, "int": int, "str": str, "bool": bool}.get(str(field.type), str)
    if isinstance(value, str) and kind is bool:  # bool("false") would be True
        if value.lower() in ("true", "1", "yes", "on"):
            return True
        if value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"option {field.name}: {value!r} is not a bool (true or false)")
    if isinstance(value, str) and kind is not str:
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"option {field.name}: {value!r} is not a {kind.__name__}") from None
    return value
