"""PNG plots without a display, shared by every report and by `alphaedit serve`.

Figures are made with matplotlib's object API, not pyplot: pyplot keeps global state, and the
server draws in several request threads at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def figure(target: Path | BinaryIO, title: str, xlabel: str, ylabel: str, size: tuple[float, float] = (6, 4), dpi: int = 100) -> Iterator[object]:
    """Yields the axes to draw on; labels, the legend (when anything is labelled) and the PNG,
    written to the path or binary file `target`, are handled here."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    ax = fig.subplots()
    yield ax
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    if isinstance(target, Path):
        target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png", dpi=dpi)
