"""Fourier slice extraction: projections of K volumes along R orientations in one call.

The volume is gridding-corrected, zero-padded by ``padding_factor`` and Fourier transformed
once (:func:`prepare_fourier_volumes`); each projection is then a central slice sampled by
trilinear interpolation (:func:`extract_slices`). By the projection–slice theorem the slice at
image frequency ``(kx, ky)`` is the volume transform at ``kx * A[0] + ky * A[1]``
(:mod:`cryotorch.conventions`). Frequencies are in cycles per *unpadded* box, so the slices
are the DFTs of the N×N projections.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cryotorch.conventions import fft_frequencies_2d, irfft2_centered, padded_rfft3_centered

__all__ = [
    "padded_box_size",
    "gridding_kernel_3d",
    "prepare_fourier_volumes",
    "slice_coordinates",
    "trilinear_corners",
    "trilinear_table",
    "CORNERS",
    "extract_slices",
    "project_volumes",
    "rotation_chunk_size",
    "flat_index_dtype",
]


def padded_box_size(box_size: int, padding_factor: float) -> int:
    """Size of the padded Fourier grid for an N-voxel box (at least N)."""
    return max(box_size, int(round(padding_factor * box_size)))


def gridding_kernel_3d(box_size: int, padded_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``(N, N, N)`` real-space image of trilinear interpolation on a ``padded_size`` grid.

    Trilinear interpolation in Fourier space multiplies real space by
    ``sinc²(x/P) sinc²(y/P) sinc²(z/P)`` (x in voxels from the centre); dividing by this kernel
    before (projection) or after (reconstruction) cancels that attenuation.
    """
    coordinate = torch.arange(box_size, device=device, dtype=torch.float32) - box_size // 2
    profile = torch.sinc(coordinate / padded_size) ** 2
    return profile[:, None, None] * profile[None, :, None] * profile[None, None, :]


def prepare_fourier_volumes(volumes: torch.Tensor, padding_factor: float = 2.0, crop_size: int | None = None) -> torch.Tensor:
    """Gridding-correct, pad and transform volumes for slice extraction.

    Parameters
    ----------
    volumes
        ``(K, N, N, N)`` real volumes (indexed z, y, x).
    padding_factor
        Oversampling of the Fourier grid (RELION's default 2).
    crop_size
        Keep only the centred crop of this size Q of the padded grid (None: all of it), e.g.
        :func:`~cryotorch.ops.backprojection.crop_size` of the components to be extracted;
        extract from it with ``padded_size=P``.

    Returns
    -------
    torch.Tensor
        ``(K, Q, Q, Q // 2 + 1)`` complex centred rfft of the padded volumes (``Q = P``, the
        padded size, without ``crop_size``).
    """
    box_size = volumes.shape[-1]
    padded_size = padded_box_size(box_size, padding_factor)
    corrected = volumes / gridding_kernel_3d(box_size, padded_size, volumes.device)
    # stored voxel-major (classes innermost), viewed as (K, Q, Q, Q // 2 + 1): extraction then
    # reads each neighbour's values of all classes from one place
    return padded_rfft3_centered(corrected, padded_size, crop_size).permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


def slice_coordinates(
    rotations: torch.Tensor, frequencies: torch.Tensor, box_size: int, padded_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded-grid coordinates of central-slice samples, folded into the stored half space.

    Parameters
    ----------
    rotations
        ``(R, 3, 3)`` RELION matrices A.
    frequencies
        ``(M, 2)`` image frequencies ``(kx, ky)`` in cycles per unpadded box.

    Returns
    -------
    coordinates
        ``(3, R, M)`` the ``x``, ``y`` and ``z`` planes in padded-grid units, ``x >= 0`` (one
        contiguous plane per axis: element-wise work over the strided columns of an
        ``(R, M, 3)`` array is several times slower).
    conjugate
        ``(R, M)`` bool, True where the sample was folded through the origin (take the
        complex conjugate: Friedel symmetry of a real volume).
    """
    scale = padded_size / box_size
    in_plane = rotations[:, :2, :].to(frequencies.dtype).permute(1, 2, 0)[..., None]  # (2, 3, R, 1)
    # kx·A[0] + ky·A[1] as two products and a sum: each sample's bits do not depend on how
    # many orientations are computed together (a matrix product picks its kernel by size)
    coordinates = frequencies[:, 0] * in_plane[0]  # (3, R, M)
    coordinates += frequencies[:, 1] * in_plane[1]
    conjugate = coordinates[0] < 0
    # scaled and folded in one pass (±scale: exactly the scaled coordinates, negated)
    return coordinates.mul_(torch.where(conjugate, -scale, scale)), conjugate


CORNERS = torch.tensor([[dx, dy, dz] for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)])  # (8, 3) offsets (x, y, z)


def flat_index_dtype(padded_size: int, half_size: int, n_grids: int = 1) -> torch.dtype:
    """Index type of voxels in ``n_grids`` flat ``(P, P, H)`` grids: 32-bit where they fit (half
    the memory traffic of 64-bit indices in gathers and index-adds)."""
    return torch.int32 if n_grids * padded_size * padded_size * half_size < 2**31 else torch.int64


@dataclass(frozen=True)
class _TrilinearParts:
    """What the 8 corners of trilinear interpolation are made of (:func:`_trilinear_parts`)."""

    base_index: torch.Tensor  # (S,) flat index of the lower corner
    planar: dict[tuple[int, int], torch.Tensor]  # (dx, dy) → (S,) x·y weight
    z_weights: tuple[torch.Tensor, torch.Tensor]  # (S,) lower and upper z weight
    inside: list[tuple[torch.Tensor, torch.Tensor]] | None  # per axis, lower/upper in the grid; None: all are


def _trilinear_parts(coordinates: torch.Tensor, grid_size: int, half_size: int, padded_size: int | None = None) -> _TrilinearParts:
    """Lower-corner indices, per-axis weights and grid masks of samples at ``coordinates``
    ``(3, S)`` (as in :func:`trilinear_corners`)."""
    # the weights as on the whole grid (the same bits), the indices moved to the crop
    centre = (grid_size if padded_size is None else padded_size) // 2
    shifted = coordinates + torch.tensor([0.0, centre, centre], dtype=coordinates.dtype, device=coordinates.device)[:, None]
    base = torch.floor(shifted)
    # per axis: weight of the lower and upper neighbour, and the 4 products of x and y shared
    # by the corners of both z planes
    axes = [(1 - weight, weight) for weight in (shifted - base).unbind(0)]
    planar = {(dx, dy): axes[0][dx] * axes[1][dy] for dy in (0, 1) for dx in (0, 1)}
    x0, y0, z0 = base.to(flat_index_dtype(grid_size, half_size)).unbind(0)
    if centre != grid_size // 2:
        y0, z0 = y0 - (centre - grid_size // 2), z0 - (centre - grid_size // 2)
    base_index = (z0 * grid_size + y0).mul_(half_size).add_(x0)
    limits = [(x0, half_size), (y0, grid_size), (z0, grid_size)]
    # samples well inside the grid (all of them, but for the outermost shells) need no masks
    # (one device sync: the bounds are compared on the device)
    bounds = torch.stack([torch.stack(low.aminmax()) for low, _ in limits])  # (3, 2)
    sizes = torch.tensor([size for _, size in limits], dtype=bounds.dtype, device=bounds.device)
    all_inside = bool(((bounds[:, 0] >= 0) & (bounds[:, 1] + 1 < sizes)).all())
    inside = None if all_inside else [((low >= 0) & (low < size), (low + 1 >= 0) & (low + 1 < size)) for low, size in limits]
    return _TrilinearParts(base_index, planar, axes[2], inside)


def _corner_offset(corner: tuple[int, int, int], grid_size: int, half_size: int) -> int:
    """Flat-index offset of ``corner`` ``(dx, dy, dz)`` from the lower corner."""
    dx, dy, dz = corner
    return (dz * grid_size + dy) * half_size + dx


def _corner_valid(parts: _TrilinearParts, corner: tuple[int, int, int]) -> torch.Tensor:
    """``(S,)`` whether ``corner`` ``(dx, dy, dz)`` of each sample lies in the grid."""
    assert parts.inside is not None
    dx, dy, dz = corner
    return parts.inside[0][dx] & parts.inside[1][dy] & parts.inside[2][dz]


def _corners(parts: _TrilinearParts, grid_size: int, half_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each corner's ``(S,)`` flat indices and weights, in the order of :data:`CORNERS`."""
    for dx, dy, dz in CORNERS.tolist():
        trilinear = parts.planar[dx, dy] * parts.z_weights[dz]
        flat_index = parts.base_index + _corner_offset((dx, dy, dz), grid_size, half_size)
        if parts.inside is None:
            yield flat_index, trilinear
        else:
            valid = _corner_valid(parts, (dx, dy, dz))
            yield torch.where(valid, flat_index, 0), torch.where(valid, trilinear, 0)


def trilinear_corners(coordinates: torch.Tensor, grid_size: int, half_size: int, padded_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each of the 8 trilinear corners: flat voxel index and weight of every sample.

    ``coordinates`` are ``(3, S)`` ``x``, ``y`` and ``z`` planes in padded-grid units with
    ``x >= 0`` (from :func:`slice_coordinates`), on a ``(grid_size, grid_size, half_size)``
    grid in the centred rfft layout: the padded grid itself, or the centred crop of a
    ``padded_size`` one (None: the grid is not cropped), whose weights are the whole grid's,
    bit for bit. Corners outside the grid get weight 0 (at index 0). Indices are
    :func:`flat_index_dtype`'s.
    """
    return _corners(_trilinear_parts(coordinates, grid_size, half_size, padded_size), grid_size, half_size)


def trilinear_table(coordinates: torch.Tensor, grid_size: int, half_size: int, padded_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`trilinear_corners` as two ``(S, 8)`` arrays, flat indices and weights, corners
    in the order of :data:`CORNERS` (the bags of an ``embedding_bag``)."""
    parts = _trilinear_parts(coordinates, grid_size, half_size, padded_size)
    corners = [(dx, dy, dz) for dx, dy, dz in CORNERS.tolist()]
    offsets = torch.tensor([_corner_offset(corner, grid_size, half_size) for corner in corners], dtype=parts.base_index.dtype, device=coordinates.device)
    index = parts.base_index[:, None] + offsets
    # each corner's product written into its column (stacking the 8 products costs a copy)
    weight = coordinates.new_empty(coordinates.shape[1], 8)
    for column, (dx, dy, dz) in enumerate(corners):
        torch.mul(parts.planar[dx, dy], parts.z_weights[dz], out=weight[:, column])
    if parts.inside is not None:
        outside = ~torch.stack([_corner_valid(parts, corner) for corner in corners], dim=-1)
        index.masked_fill_(outside, 0)
        weight.masked_fill_(outside, 0)
    return index, weight


# Work arrays per chunk on a CPU. Larger chunks gain nothing there and lose to page faults and
# cache misses: 20,000 slices of three volumes (box 64, 321 components) are extracted in 3.4 s
# in chunks sized for 2 GiB and in 0.9 s in chunks of 16–64 MiB (2-core benchmark CPU).
CPU_CHUNK_BYTES = 2**25


def rotation_chunk_size(n_values_per_rotation: int, bytes_per_value: int, memory_budget_bytes: float, device: torch.device) -> int:
    """Number of rotations per chunk so that one chunk's work arrays fit the memory budget
    (and, on a CPU, :data:`CPU_CHUNK_BYTES`)."""
    budget = min(memory_budget_bytes, CPU_CHUNK_BYTES) if device.type == "cpu" else memory_budget_bytes
    return max(1, int(budget // max(1, n_values_per_rotation * bytes_per_value)))


def extract_slices(
    volumes_ft: torch.Tensor,
    rotations: torch.Tensor,
    frequencies: torch.Tensor,
    box_size: int,
    memory_budget_bytes: float = 2**28,
    padded_size: int | None = None,
) -> torch.Tensor:
    """Central slices of K Fourier volumes along R orientations.

    Parameters
    ----------
    volumes_ft
        ``(K, Q, Q, Q // 2 + 1)`` complex, from :func:`prepare_fourier_volumes`: the padded
        grid (``Q = P``) or its centred crop.
    rotations
        ``(R, 3, 3)`` RELION matrices A.
    frequencies
        ``(M, 2)`` ``(kx, ky)`` in cycles per unpadded box; samples outside the grid are 0.
    box_size
        Unpadded box size N.
    memory_budget_bytes
        Working memory allowed per chunk of rotations.
    padded_size
        Size P of the padded grid (None: ``Q``); samples whose neighbours fall outside a crop
        take zero there.

    Returns
    -------
    torch.Tensor
        ``(K, R, M)`` complex slice values.
    """
    n_classes, grid_size, half_size = volumes_ft.shape[0], volumes_ft.shape[1], volumes_ft.shape[-1]
    padded_size = grid_size if padded_size is None else padded_size
    n_freq = frequencies.shape[0]
    # one row per voxel holding every class's (real, imaginary) pair: a view of the storage
    # that prepare_fourier_volumes lays out, so that the 8 neighbours of a sample are 8 rows
    table = torch.view_as_real(volumes_ft.permute(1, 2, 3, 0)).reshape(-1, 2 * n_classes)
    chunk = rotation_chunk_size(n_freq, 8 * 12 + 8 * n_classes + 64, memory_budget_bytes, volumes_ft.device)
    out = volumes_ft.new_empty(rotations.shape[0], n_freq, n_classes)
    for start in range(0, rotations.shape[0], chunk):
        coordinates, conjugate = slice_coordinates(rotations[start : start + chunk], frequencies, box_size, padded_size)
        index, weight = trilinear_table(coordinates.reshape(3, -1), grid_size, half_size, padded_size)
        # trilinear interpolation as a weighted sum of 8 table rows per sample
        sampled = F.embedding_bag(index, table, per_sample_weights=weight.to(table.dtype), mode="sum").view(-1, n_freq, n_classes, 2)
        # folded samples take the conjugate: their imaginary parts negated in place
        sampled[..., 1].mul_(torch.where(conjugate, -1.0, 1.0)[..., None])
        out[start : start + chunk] = torch.view_as_complex(sampled)
    return out.permute(2, 0, 1)


def project_volumes(
    volumes: torch.Tensor,
    rotations: torch.Tensor,
    padding_factor: float = 2.0,
    max_frequency: float | None = None,
    real_space: bool = False,
    memory_budget_bytes: float = 2**28,
) -> torch.Tensor:
    """Projections of K real volumes along R orientations.

    Parameters
    ----------
    volumes
        ``(K, N, N, N)`` real volumes.
    rotations
        ``(R, 3, 3)`` RELION matrices A.
    padding_factor
        Fourier oversampling (2 as in RELION).
    max_frequency
        Radius in cycles per box beyond which slices are zero (default N // 2, Nyquist).
    real_space
        Return ``(K, R, N, N)`` real images instead of the centred rfft.

    Returns
    -------
    torch.Tensor
        ``(K, R, N, N // 2 + 1)`` complex centred rfft (or real images, see ``real_space``).
    """
    box_size = volumes.shape[-1]
    volumes_ft = prepare_fourier_volumes(volumes, padding_factor)
    frequencies = fft_frequencies_2d(box_size, volumes.device)  # (N, N//2+1, 2)
    flat = frequencies.reshape(-1, 2)
    limit = box_size // 2 if max_frequency is None else max_frequency
    inside = flat.norm(dim=-1) <= limit
    values = extract_slices(volumes_ft, rotations, flat[inside], box_size, memory_budget_bytes)
    slices = values.new_zeros(values.shape[0], values.shape[1], flat.shape[0])
    slices[..., inside] = values
    slices = slices.reshape(values.shape[0], values.shape[1], box_size, box_size // 2 + 1)
    return irfft2_centered(slices, box_size) if real_space else slices
