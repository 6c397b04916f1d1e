"""PNG plots written beside the run's STAR and MRC outputs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cryotorch.io import atomic_output_path  # noqa: E402

__all__ = ["save_fsc_plot", "save_histogram_plot", "save_class_sizes_plot"]


def save_fsc_plot(
    path: Path,
    inverse_resolution: np.ndarray,
    curves: dict[str, np.ndarray],
    resolution_angstrom: float,
    threshold: float = 0.143,
) -> None:
    """Plot FSC curves against spatial frequency (1/Å) with the threshold and resolution marked."""
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for label, values in curves.items():
        axes.plot(inverse_resolution, values, label=label)
    axes.axhline(threshold, color="grey", linestyle="--", linewidth=0.8, label=f"FSC = {threshold}")
    axes.axvline(1.0 / resolution_angstrom, color="black", linestyle=":", linewidth=0.8, label=f"{resolution_angstrom:.2f} Å")
    axes.set_xlabel("spatial frequency (1/Å)")
    axes.set_ylabel("Fourier shell correlation")
    axes.set_ylim(-0.1, 1.05)
    axes.legend(loc="upper right", fontsize=8)
    _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_output_path(path) as temp_path:
        figure.savefig(temp_path, format="png")
    plt.close(figure)


def save_histogram_plot(path: Path, values: np.ndarray, bins: np.ndarray, xlabel: str, title: str) -> None:
    """Histogram of per-particle ``values`` over ``bins`` (bin edges)."""
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    axes.hist(values, bins=bins, color="tab:blue")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("particles")
    axes.set_title(title, fontsize=10)
    _save(figure, path)


def save_class_sizes_plot(path: Path, counts: np.ndarray, title: str) -> None:
    """Bar chart of the number of particles per class (1-based class numbers)."""
    figure, axes = plt.subplots(figsize=(max(6, 0.15 * len(counts)), 4), dpi=120)
    axes.bar(np.arange(1, len(counts) + 1), counts, color="tab:blue")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("class")
    axes.set_ylabel("particles")
    axes.set_title(title, fontsize=10)
    _save(figure, path)
