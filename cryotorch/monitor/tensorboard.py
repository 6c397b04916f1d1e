"""TensorBoard logging through the run's Fabric logger (rank 0 only)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils.tensorboard import SummaryWriter

__all__ = ["log_scalars", "log_curve", "log_central_slices"]


def log_scalars(writer: SummaryWriter | None, values: Mapping[str, float], step: int) -> None:
    """Log each ``tag: value`` as a scalar at ``step``."""
    if writer is None:
        return
    for tag, value in values.items():
        writer.add_scalar(tag, float(value), step)


def log_curve(writer: SummaryWriter | None, tag: str, x_values: torch.Tensor, y_values: torch.Tensor) -> None:
    """Log a curve (e.g. FSC against 1/Å) as a scalar series whose step is the curve index.

    TensorBoard steps are integers, so the x value is recorded in a companion series
    ``{tag}_x``; the plotted curve is the y value against the shell index.
    """
    if writer is None:
        return
    for index, (x, y) in enumerate(zip(x_values.tolist(), y_values.tolist())):
        writer.add_scalar(tag, y, index)
        writer.add_scalar(f"{tag}_x", x, index)


def log_central_slices(writer: SummaryWriter | None, tag: str, volume: torch.Tensor, step: int) -> None:
    """Log the three central sections (xy, xz, yz) of a ``(N, N, N)`` volume side by side."""
    if writer is None:
        return
    centre = volume.shape[0] // 2
    sections = torch.cat([volume[centre], volume[:, centre], volume[:, :, centre]], dim=-1).float().cpu()
    low, high = sections.min(), sections.max()
    image = (sections - low) / (high - low).clamp(min=1e-12)
    writer.add_image(tag, image[None], step)
