"""A deterministic synthetic test specimen, for runs that have no map of their own."""

from __future__ import annotations

import torch

from cryotorch.ops.filters import real_space_radius

__all__ = ["blob_phantom"]


def blob_phantom(box_size: int, pixel_size_angstrom: float, seed: int = 0, n_blobs: int = 400) -> torch.Tensor:
    """An asymmetric pseudo-molecule: Gaussian blobs (≈ 3 Å atoms smoothed to 2 px) in a sphere.

    Parameters
    ----------
    box_size
        Box size N in voxels.
    pixel_size_angstrom
        Voxel size; sets the blob width of max(3 Å, 1.5 voxels).
    seed
        Seed of the blob positions and weights.

    Returns
    -------
    torch.Tensor
        ``(N, N, N)`` float32 density, positive, unit maximum, inside 0.35·N of the centre.
    """
    generator = torch.Generator().manual_seed(seed)
    radius = 0.35 * box_size
    # rejection-free uniform points in a ball; a chain-like bias makes the shape asymmetric
    directions = torch.randn(n_blobs, 3, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    distances = radius * torch.rand(n_blobs, 1, generator=generator) ** (1 / 3)
    centres = directions * distances
    centres[:, 0] = centres[:, 0] * 0.8 + 0.15 * radius * torch.sign(centres[:, 1])
    weights = 0.5 + torch.rand(n_blobs, generator=generator)
    sigma_px = max(3.0 / pixel_size_angstrom, 1.5)
    coordinate = torch.arange(box_size, dtype=torch.float32) - box_size // 2
    # a Gaussian is the product of its profiles along x, y and z: the sum of the blobs is one
    # matrix product of their z profiles with their (y, x) planes, not N³ × n_blobs exponentials
    x, y, z = (torch.exp(-((coordinate[None, :] - centres[:, axis, None]) ** 2) / (2 * sigma_px**2)) for axis in range(3))  # (n_blobs, N) each
    planes = (y[:, :, None] * x[:, None, :]).reshape(n_blobs, -1)
    volume = ((z * weights[:, None]).T @ planes).reshape(box_size, box_size, box_size)
    volume *= (real_space_radius(box_size, 3) < 0.45 * box_size).float()
    return volume / volume.max()
