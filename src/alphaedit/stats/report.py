"""What the statistics look like: per-layer spectrum summary, kept null-space rank, and a plot."""

from __future__ import annotations

from pathlib import Path

import torch

from ..plots import figure
from ..updates import null_space_mask
from .moments import SecondMoment


def spectrum_summary(moment: SecondMoment, value: float, rule: str) -> dict[str, float | int]:
    eigenvalues = torch.linalg.eigvalsh(moment.moment.double())
    kept = int(null_space_mask(eigenvalues, value, rule).sum())
    return {
        "tokens": moment.count,
        "dimension": int(eigenvalues.numel()),
        "trace": float(eigenvalues.sum()),
        "max": float(eigenvalues.max()),
        "median": float(eigenvalues.median()),
        "min": float(eigenvalues.min()),
        "null_space_rank": kept,
        "null_space_fraction": kept / eigenvalues.numel(),
    }


def plot_spectra(moments: dict[int, SecondMoment], value: float, rule: str, path: Path) -> Path:
    with figure(path, "spectra of the key second moments", "eigenvalue index (descending)", "eigenvalue of C0") as ax:
        for layer, moment in sorted(moments.items()):
            eigenvalues = torch.linalg.eigvalsh(moment.moment.double()).flip(0).clamp_min(1e-12)
            ax.semilogy(eigenvalues.numpy(), label=f"layer {layer}")
        if rule == "absolute":
            ax.axhline(value, color="black", linestyle="--", label=f"threshold {value:g}")
    return path
