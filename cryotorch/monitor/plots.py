"""PNG plots written beside the run's STAR and MRC outputs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cryotorch.io import atomic_output_path  # noqa: E402

__all__ = ["save_fsc_plot"]


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
    figure.tight_layout()
    with atomic_output_path(path) as temp_path:
        figure.savefig(temp_path, format="png")
    plt.close(figure)
