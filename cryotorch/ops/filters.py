"""Masks and Fourier filters: soft spheres, soft-edged masks, raised-cosine low-pass, B-factor,
resampling of maps to another voxel size."""

from __future__ import annotations

import math

import torch

from cryotorch.ops.fourier import fourier_resample_3d, radius_grid_3d

__all__ = [
    "real_space_radius",
    "soft_spherical_mask",
    "soft_disc_masks",
    "soft_edge_mask",
    "raised_cosine",
    "lowpass_filter_3d",
    "bfactor_filter_3d",
    "crop_or_pad_3d",
    "resample_map",
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
    ramp = ((distance - edge_start) / edge_width).clamp(0, 1)
    return 0.5 * (1 + torch.cos(torch.pi * ramp))


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
    return raised_cosine(torch.sqrt(dx**2 + dy**2), radius_px, edge_width_px)


def soft_edge_mask(volume: torch.Tensor, threshold: float, extend_px: int = 0, edge_width_px: float = 6.0) -> torch.Tensor:
    """RELION-style solvent mask: binarise at ``threshold``, dilate by ``extend_px``, soften.

    The soft edge is a raised cosine of the distance to the dilated binary mask, computed by
    repeated 3×3×3 max-pooling (each pass grows the mask by one voxel).
    """
    binary = (volume >= threshold).to(volume.dtype)[None, None]
    pool = torch.nn.functional.max_pool3d
    for _ in range(extend_px):
        binary = pool(binary, 3, stride=1, padding=1)
    mask = binary.clone()
    shell = binary
    steps = int(torch.ceil(torch.tensor(edge_width_px)).item())
    for step in range(1, steps + 1):
        grown = pool(shell, 3, stride=1, padding=1)
        value = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / (edge_width_px + 1))))
        mask = torch.maximum(mask, (grown - shell) * value)
        shell = grown
    return mask[0, 0]


def lowpass_filter_3d(volume_ft: torch.Tensor, resolution_angstrom: float, pixel_size_angstrom: float, edge_width_shells: float = 2.0) -> torch.Tensor:
    """Raised-cosine low-pass of a centred-rfft volume: 1 up to the cutoff shell, 0 beyond the edge."""
    box_size = volume_ft.shape[-3]
    cutoff_shell = box_size * pixel_size_angstrom / resolution_angstrom
    radius = radius_grid_3d(box_size, volume_ft.device)
    return volume_ft * raised_cosine(radius, cutoff_shell - edge_width_shells / 2, edge_width_shells)


def bfactor_filter_3d(volume_ft: torch.Tensor, bfactor_angstrom2: float, pixel_size_angstrom: float) -> torch.Tensor:
    """Multiply by ``exp(-B s² / 4)`` (negative B sharpens), s in Å⁻¹."""
    box_size = volume_ft.shape[-3]
    s = radius_grid_3d(box_size, volume_ft.device) / (box_size * pixel_size_angstrom)
    return volume_ft * torch.exp(-bfactor_angstrom2 / 4 * s**2)


def crop_or_pad_3d(volume: torch.Tensor, box_size: int) -> torch.Tensor:
    """Centred real-space crop or zero-pad of ``(..., N, N, N)`` to ``box_size`` (centre kept at N // 2)."""
    size = volume.shape[-1]
    if size == box_size:
        return volume
    out = volume.new_zeros(*volume.shape[:-3], box_size, box_size, box_size)
    src_start = max(0, size // 2 - box_size // 2)
    dst_start = max(0, box_size // 2 - size // 2)
    n = min(size, box_size)
    src = slice(src_start, src_start + n)
    dst = slice(dst_start, dst_start + n)
    out[..., dst, dst, dst] = volume[..., src, src, src]
    return out


def resample_map(
    volume: torch.Tensor, voxel_size_angstrom: float, pixel_size_angstrom: float, box_size: int, max_padding: int = 64
) -> tuple[torch.Tensor, float]:
    """A map brought to ``box_size`` voxels of (nearly) ``pixel_size_angstrom``, its centre
    kept at the box centre: what RELION's ``--trust_ref_size`` does to a reference of another
    box or pixel size.

    Fourier resampling (:func:`fourier_resample_3d`) scales the voxel size by the ratio of two
    even box sizes, ``M / n``. The map is first windowed in real space to the extent the new
    box needs (plus a voxel each side), then zero-padded by up to ``max_padding`` voxels to the
    size ``M`` whose resampled size ``n`` comes nearest the asked ratio, and the result is
    windowed to ``box_size``. The voxel size then misses the asked one by far less than with a
    single rounding of the box (RELION's, up to one voxel in ``n``).

    Parameters
    ----------
    volume
        ``(N, N, N)`` map.
    voxel_size_angstrom
        Its voxel size (Å).
    pixel_size_angstrom
        Voxel size wanted (Å).
    box_size
        Box wanted (voxels).
    max_padding
        Most voxels of zero padding tried for the best ratio.

    Returns
    -------
    tuple[torch.Tensor, float]
        The ``(box_size,) * 3`` map and its voxel size (Å).
    """
    ratio = voxel_size_angstrom / pixel_size_angstrom
    needed = min(volume.shape[-1], 2 * math.ceil(box_size / ratio / 2) + 2)
    needed += needed % 2

    def relative_error(size: int) -> float:
        resampled = max(2, 2 * round(size * ratio / 2))
        return abs(size * ratio / resampled - 1)

    size = min(range(needed, needed + max_padding + 1, 2), key=relative_error)
    resampled_size = max(2, 2 * round(size * ratio / 2))
    resampled = fourier_resample_3d(crop_or_pad_3d(volume, size), resampled_size)
    return crop_or_pad_3d(resampled, box_size), voxel_size_angstrom * size / resampled_size
