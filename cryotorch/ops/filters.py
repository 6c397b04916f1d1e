"""Masks and Fourier filters: soft spheres, soft-edged masks, raised-cosine low-pass, B-factor,
resampling of maps to another voxel size."""

from __future__ import annotations

import math

import torch

from cryotorch.conventions import irfft3_centered, rfft3_centered
from cryotorch.ops.fourier import fourier_resample, radius_grid_3d

__all__ = [
    "real_space_radius",
    "soft_spherical_mask",
    "soft_disc_masks",
    "soft_edge_mask",
    "distance_to_region",
    "raised_cosine",
    "lowpass_filter_3d",
    "lowpass_map",
    "bfactor_filter_3d",
    "crop_or_pad",
    "resample_to_grid",
]


def real_space_radius(box_size: int, ndim: int, device: torch.device | None = None) -> torch.Tensor:
    """Distance in pixels from the box centre (index ``N // 2``), shape ``(N,) * ndim``."""
    coordinate = torch.arange(box_size, device=device, dtype=torch.float32) - box_size // 2
    grids = torch.meshgrid(*([coordinate] * ndim), indexing="ij")
    return torch.sqrt(sum(g**2 for g in grids))


def raised_cosine(distance: torch.Tensor, edge_start: float, edge_width: float) -> torch.Tensor:
    """1 below ``edge_start``, 0 beyond ``edge_start + edge_width``, a cosine ramp between."""
    if edge_width <= 0:
        return (distance <= edge_start).to(distance.dtype)
    # one new array, the rest in place: fresh arrays of a batch of masks each cost page faults
    ramp = (distance - edge_start).div_(edge_width).clamp_(0, 1)
    return ramp.mul_(torch.pi).cos_().add_(1).mul_(0.5)


def soft_spherical_mask(
    box_size: int, radius_px: float, edge_width_px: float = 5.0, ndim: int = 3, device: torch.device | None = None
) -> torch.Tensor:
    """Sphere (or disc for ``ndim=2``) of ``radius_px`` with a raised-cosine edge, ``(N,) * ndim``."""
    return raised_cosine(real_space_radius(box_size, ndim, device), radius_px, edge_width_px)


def soft_disc_masks(box_size: int, radius_px: float, edge_width_px: float, centres_px: torch.Tensor) -> torch.Tensor:
    """``(B, N, N)`` discs of ``radius_px`` with a raised-cosine edge, each centred at
    ``centres_px`` ``(B, 2)`` (x, y) pixels from the box centre (index ``N // 2``); images are
    indexed ``[y, x]``."""
    coordinate = torch.arange(box_size, device=centres_px.device, dtype=torch.float32) - box_size // 2
    dx = coordinate[None, None, :] - centres_px[:, 0, None, None].float()
    dy = coordinate[None, :, None] - centres_px[:, 1, None, None].float()
    return raised_cosine(dx.square().add(dy.square()).sqrt_(), radius_px, edge_width_px)


def distance_to_region(region: torch.Tensor, max_distance_px: float) -> torch.Tensor:
    """Euclidean distance (voxels) from every voxel of a ``(N, N, N)`` boolean ``region`` grid
    to its nearest voxel of the region (0 inside it), exact up to ``max_distance_px``; farther
    voxels get a larger value (at least ``max_distance_px``), or ``inf`` where no region voxel
    lies within ``⌈max_distance_px⌉`` along every axis.

    The squared distance separates, ``d² = min_z' [(z−z')² + min_y' [(y−y')² + min_x'
    [(x−x')² + (0 in the region, ∞ outside)]]]``: three passes of minima over the offsets up to
    ``⌈max_distance_px⌉`` along one axis each, instead of a search over a ball per voxel.
    """
    reach = max(0, math.ceil(max_distance_px))
    squared = torch.full(region.shape, math.inf, dtype=torch.float32, device=region.device).masked_fill_(region, 0.0)
    for dim in range(region.ndim):
        size = squared.shape[dim]
        best = squared.clone()
        for offset in range(1, min(reach, size - 1) + 1):
            cost = float(offset**2)
            ahead, behind = best.narrow(dim, 0, size - offset), best.narrow(dim, offset, size - offset)
            ahead.copy_(torch.minimum(ahead, squared.narrow(dim, offset, size - offset) + cost))
            behind.copy_(torch.minimum(behind, squared.narrow(dim, 0, size - offset) + cost))
        squared = best
    return squared.sqrt()


def soft_edge_mask(volume: torch.Tensor, threshold: float, extend_px: float = 0, edge_width_px: float = 6.0) -> torch.Tensor:
    """RELION-style solvent mask (``relion_mask_create``) of a ``(N, N, N)`` map.

    The voxels at or above ``threshold``, grown by ``extend_px`` voxels (shrunk where it is
    negative), are 1; beyond, at a distance ``d`` from them, a raised-cosine soft edge
    ``0.5 + 0.5 cos(π d / edge_width_px)`` falls to 0 at ``edge_width_px``. Distances are
    Euclidean (:func:`distance_to_region`).

    Returns
    -------
    torch.Tensor
        ``(N, N, N)`` float32 mask in [0, 1].
    """
    inside = volume >= threshold
    if extend_px < 0:
        inside = distance_to_region(~inside, -extend_px) > -extend_px
        extend_px = 0
    beyond = (distance_to_region(inside, extend_px + edge_width_px) - extend_px).clamp(min=0)
    if edge_width_px <= 0:
        return (beyond <= 0).float()
    edge = 0.5 + 0.5 * torch.cos(torch.pi * beyond.clamp(max=edge_width_px) / edge_width_px)
    return torch.where(beyond < edge_width_px, edge, 0.0).float()


def lowpass_filter_3d(volume_ft: torch.Tensor, resolution_angstrom: float, pixel_size_angstrom: float, edge_width_shells: float = 2.0) -> torch.Tensor:
    """Raised-cosine low-pass of a centred-rfft volume: 1 up to the cutoff shell, 0 beyond the edge."""
    box_size = volume_ft.shape[-3]
    cutoff_shell = box_size * pixel_size_angstrom / resolution_angstrom
    radius = radius_grid_3d(box_size, volume_ft.device)
    return volume_ft * raised_cosine(radius, cutoff_shell - edge_width_shells / 2, edge_width_shells)


def lowpass_map(volume: torch.Tensor, resolution_angstrom: float, pixel_size_angstrom: float) -> torch.Tensor:
    """``(..., N, N, N)`` real-space maps low-passed to ``resolution_angstrom``
    (:func:`lowpass_filter_3d` on their centred rfft)."""
    return irfft3_centered(lowpass_filter_3d(rfft3_centered(volume), resolution_angstrom, pixel_size_angstrom), volume.shape[-1])


def bfactor_filter_3d(volume_ft: torch.Tensor, bfactor_angstrom2: float, pixel_size_angstrom: float) -> torch.Tensor:
    """Multiply by ``exp(-B s² / 4)`` (negative B sharpens), s in Å⁻¹."""
    box_size = volume_ft.shape[-3]
    s = radius_grid_3d(box_size, volume_ft.device) / (box_size * pixel_size_angstrom)
    return volume_ft * torch.exp(-bfactor_angstrom2 / 4 * s**2)


def crop_or_pad(values: torch.Tensor, box_size: int, ndim: int = 3) -> torch.Tensor:
    """Centred real-space crop or zero-pad of ``(..., N, N[, N])`` images (``ndim`` 2) or
    volumes (3) to ``box_size`` a side (centre kept at N // 2)."""
    size = values.shape[-1]
    if size == box_size:
        return values
    out = values.new_zeros(*values.shape[:-ndim], *[box_size] * ndim)
    n = min(size, box_size)
    src_start = max(0, size // 2 - box_size // 2)
    dst_start = max(0, box_size // 2 - size // 2)
    out[(..., *[slice(dst_start, dst_start + n)] * ndim)] = values[(..., *[slice(src_start, src_start + n)] * ndim)]
    return out


def resample_to_grid(
    values: torch.Tensor, pixel_size_angstrom: float, new_pixel_size_angstrom: float, box_size: int, ndim: int = 3, max_padding: int = 64
) -> tuple[torch.Tensor, float]:
    """Images (``ndim`` 2) or maps (3) brought to ``box_size`` pixels a side of (nearly)
    ``new_pixel_size_angstrom``, their centre kept at the box centre: what RELION's
    ``--trust_ref_size`` does to a reference of another box or pixel size.

    Fourier resampling (:func:`fourier_resample`) scales the pixel size by the ratio of two
    even box sizes, ``M / n``. The input is first windowed in real space to the extent the new
    box needs (plus a pixel each side), then zero-padded by up to ``max_padding`` pixels to the
    size ``M`` whose resampled size ``n`` comes nearest the asked ratio, and the result is
    windowed to ``box_size``. The pixel size then misses the asked one by far less than with a
    single rounding of the box (RELION's, up to one pixel in ``n``).

    Parameters
    ----------
    values
        ``(..., N, N[, N])`` images or maps.
    pixel_size_angstrom
        Their pixel (voxel) size (Å).
    new_pixel_size_angstrom
        Pixel size wanted (Å).
    box_size
        Box wanted (pixels).
    ndim
        2 for images, 3 for maps.
    max_padding
        Most pixels of zero padding tried for the best ratio.

    Returns
    -------
    tuple[torch.Tensor, float]
        The ``(..., box_size, box_size[, box_size])`` resampled values and their pixel size (Å).
    """
    ratio = pixel_size_angstrom / new_pixel_size_angstrom
    needed = min(values.shape[-1], 2 * math.ceil(box_size / ratio / 2) + 2)
    needed += needed % 2

    def resampled_size(size: int) -> int:
        return max(2, 2 * round(size * ratio / 2))

    size = min(range(needed, needed + max_padding + 1, 2), key=lambda size: abs(size * ratio / resampled_size(size) - 1))
    resampled = fourier_resample(crop_or_pad(values, size, ndim), resampled_size(size), ndim)
    return crop_or_pad(resampled, box_size, ndim), pixel_size_angstrom * size / resampled_size(size)
