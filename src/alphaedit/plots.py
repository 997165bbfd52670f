"""PNG plots without a display (matplotlib's Agg backend), shared by every report."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def figure(path: Path, title: str, xlabel: str, ylabel: str) -> Iterator[object]:
    """Yields the axes to draw on; labels, legend, and the PNG at `path` are handled here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        yield ax
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
