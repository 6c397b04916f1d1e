"""Masks and Fourier filters: soft spheres, soft-edged masks, raised-cosine low-pass, B-factor."""

from __future__ import annotations

import torch

from cryotorch.ops.fourier import radius_grid_3d

__all__ = [
    "real_space_radius",
    "soft_spherical_mask",
    "soft_disc_masks",
    "soft_edge_mask",
    "raised_cosine",
    "lowpass_filter_3d",
    "bfactor_filter_3d",
    "crop_or_pad_3d",
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
