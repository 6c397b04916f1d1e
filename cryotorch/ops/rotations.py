"""Rotation utilities: uniform random rotations from quaternions."""

from __future__ import annotations

import torch

__all__ = ["quaternion_to_matrix", "random_rotations"]


def quaternion_to_matrix(quaternions: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` unit quaternions ``(w, x, y, z)`` → ``(..., 3, 3)`` rotation matrices."""
    w, x, y, z = quaternions.unbind(-1)
    rows = [
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ]
    return torch.stack(rows, dim=-2)


def random_rotations(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(n, 3, 3)`` rotations drawn uniformly (Haar) from normalised Gaussian quaternions."""
    quaternions = torch.randn(n, 4, generator=generator, dtype=dtype)
    return quaternion_to_matrix(quaternions / quaternions.norm(dim=-1, keepdim=True))
