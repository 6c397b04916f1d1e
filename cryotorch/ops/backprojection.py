"""Fourier slice insertion (back-projection) and regularised reconstruction.

Insertion is the adjoint of :func:`cryotorch.ops.projection.extract_slices`: each slice value
is spread onto its 8 trilinear neighbours of the padded half-space grid, with the matching
weights (e.g. CTF²) accumulated beside it. :func:`reconstruct_from_sums` then divides data by
weights plus a regulariser and undoes the gridding attenuation in real space.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cryotorch.conventions import padded_irfft3_centered
from cryotorch.ops.fourier import cached_radius_and_shell_3d
from cryotorch.ops.projection import CORNERS, flat_index_dtype, gridding_kernel_3d, rotation_chunk_size, slice_coordinates, trilinear_corners, trilinear_table

__all__ = ["insert_slices", "crop_size", "self_overlap_sum", "symmetrize_hermitian_plane", "reconstruct_from_sums"]

def self_overlap_sum(
    grid: torch.Tensor,
    rotations: torch.Tensor,
    frequencies: torch.Tensor,
    box_size: int,
    neighbour_overlap: float = 0.0,
    extracted_rotations: torch.Tensor | None = None,
    grid_index: torch.Tensor | None = None,
    padded_size: int | None = None,
) -> torch.Tensor:
    """``Σ_v c_v · grid_v`` over the trilinear corners v of each slice sample.

    A value inserted at a sample and extracted again at the same sample from a grid divided
    by ``w`` comes back multiplied by ``Σ_v c_v / w_v``. Without further processing
    ``c_v = t_v²`` (t the trilinear weights). Cropping the padded reconstruction to the
    unpadded box spreads each voxel onto its neighbours, which then carry
    ``neighbour_overlap`` of its value along each axis; per axis the corner weight becomes
    ``t·(t + (1 − t)·overlap)``. Extracted at another orientation (``extracted_rotations``),
    per axis ``c = t·Σ_u t'_u·K(v − u)`` over the extraction's corners u, with ``K(0) = 1``,
    ``K(±1) = overlap`` and 0 beyond (the grid value taken at the inserted corner).

    Parameters
    ----------
    grid
        ``(Q, Q, Q // 2 + 1)`` real values in the centred rfft layout (e.g. ``1/w``), or
        ``(K, Q, Q, Q // 2 + 1)`` with ``grid_index``: the padded grid (``Q = P``) or its
        centred crop, which must hold every sample's corners.
    rotations
        ``(R, 3, 3)`` RELION matrices A the slices were inserted at.
    frequencies
        ``(M, 2)`` ``(kx, ky)`` in cycles per unpadded box.
    neighbour_overlap
        Fraction of a voxel's value its axis neighbours receive (0: none).
    extracted_rotations
        ``(R, 3, 3)`` matrices the slices are extracted at; None: ``rotations``.
    grid_index
        ``(R,)`` which of the K grids each slice is summed over (one call for slices of
        several classes); None: ``grid`` is a single grid.
    padded_size
        Size P of the padded grid (None: ``Q``).

    Returns
    -------
    torch.Tensor
        ``(R, M)`` sums.
    """
    grid_size, half_size = grid.shape[-2], grid.shape[-1]
    padded_size = grid_size if padded_size is None else padded_size
    coordinates, conjugate = slice_coordinates(rotations, frequencies, box_size, padded_size)
    extracted = coordinates
    if extracted_rotations is not None:
        # in the inserted sample's half space (folded with it, not on its own)
        extracted, extracted_conjugate = slice_coordinates(extracted_rotations, frequencies, box_size, padded_size)
        extracted = torch.where(conjugate != extracted_conjugate, -extracted, extracted)
    coordinates, extracted = coordinates.reshape(3, -1), extracted.reshape(3, -1)  # (3, S) planes
    lower = torch.floor(coordinates)
    fraction = coordinates - lower
    if extracted_rotations is None:
        extracted_lower, extracted_fraction = lower, fraction
    else:
        extracted_lower = torch.floor(extracted)
        extracted_fraction = extracted - extracted_lower

    # per axis, for the lower and upper inserted corner: Σ_u t'_u·K(v − u) over the extraction's
    # two corners
    rest = 1 - extracted_fraction
    if extracted_rotations is None:
        # the same corners: K(0) = 1 for a corner itself, the overlap for the other
        reach = [rest + extracted_fraction * neighbour_overlap, rest * neighbour_overlap + extracted_fraction]
    else:
        # K(d) for d = −2 … 2 (0 beyond) looked up at d = offset − 1, offset, offset + 1
        kernel = torch.tensor([0.0, neighbour_overlap, 1.0, neighbour_overlap, 0.0], dtype=coordinates.dtype, device=coordinates.device)
        at = (lower - extracted_lower).long() + 2
        below, level, above = (kernel[(at + step).clamp_(0, 4)] for step in (-1, 0, 1))
        reach = [rest * level + extracted_fraction * below, rest * above + extracted_fraction * level]
    # per side and axis
    sides = [side.unbind(0) for side in ((1 - fraction) * reach[0], fraction * reach[1])]
    n_grids = 1 if grid_index is None else grid.shape[0]
    # each sample's grid starts this far into the flat values
    start = None if grid_index is None else (grid_index.to(flat_index_dtype(grid_size, half_size, n_grids)) * (grid_size * grid_size * half_size)).repeat_interleave(frequencies.shape[0])
    index, trilinear = trilinear_table(coordinates, grid_size, half_size, padded_size)
    weight = torch.empty_like(trilinear)
    for column, (dx, dy, dz) in enumerate(CORNERS.tolist()):
        torch.mul(sides[dx][0], sides[dy][1], out=weight[:, column]).mul_(sides[dz][2])
    weight.masked_fill_(trilinear <= 0, 0)
    if start is not None:
        index = index.to(start.dtype).add_(start[:, None])
    # Σ over the 8 corners of weight · grid value, as an embedding bag over the flat grid values
    total = F.embedding_bag(index, grid.reshape(-1, 1), per_sample_weights=weight.to(grid.dtype), mode="sum")
    return total.reshape(rotations.shape[0], -1)


def insert_slices(
    data_ft: torch.Tensor,
    weight: torch.Tensor,
    slices: torch.Tensor,
    slice_weights: torch.Tensor,
    rotations: torch.Tensor,
    frequencies: torch.Tensor,
    box_size: int,
    memory_budget_bytes: float = 2**28,
    padded_size: int | None = None,
) -> None:
    """Accumulate weighted central slices into a padded Fourier grid, in place.

    Parameters
    ----------
    data_ft
        ``(Q, Q, Q // 2 + 1)`` complex accumulator (centred rfft layout): the whole padded
        grid (``Q = P``) or its centred crop (:func:`crop_size`).
    weight
        ``(Q, Q, Q // 2 + 1)`` real accumulator of ``slice_weights``.
    slices
        ``(R, M)`` complex values to insert (e.g. ``CTF · image`` for each orientation).
    slice_weights
        ``(R, M)`` or ``(M,)`` real weights (e.g. ``CTF²``).
    rotations
        ``(R, 3, 3)`` RELION matrices A of the slices.
    frequencies
        ``(M, 2)`` ``(kx, ky)`` in cycles per unpadded box.
    box_size
        Unpadded box size N.
    padded_size
        Size P of the padded grid that the accumulators crop (None: their own size); samples
        beyond the crop are dropped, so it must hold every sample's neighbours.
    """
    grid_size, half_size = data_ft.shape[0], data_ft.shape[-1]
    padded_size = grid_size if padded_size is None else padded_size
    # 1-D index_add_ of floats is several times faster on CPU than of complex values or rows
    # of 2: real and imaginary parts go into the two strided float views of the grid
    data_pairs = torch.view_as_real(data_ft).view(-1, 2)
    data_real, data_imag = data_pairs[:, 0], data_pairs[:, 1]
    weight_flat = weight.view(-1)
    slice_weights = slice_weights.expand(slices.shape)
    # per sample: coordinates, floors, fractions, and one corner's index/weight/value at a time
    chunk = rotation_chunk_size(frequencies.shape[0], 160, memory_budget_bytes, data_ft.device)
    for start in range(0, rotations.shape[0], chunk):
        stop = start + chunk
        coordinates, conjugate = slice_coordinates(rotations[start:stop], frequencies, box_size, padded_size)
        values = slices[start:stop].reshape(-1)
        real = values.real.to(data_real.dtype)
        imag = torch.where(conjugate.reshape(-1), -values.imag, values.imag).to(data_imag.dtype)
        sample_weights = slice_weights[start:stop].reshape(-1)
        for flat_index, trilinear in trilinear_corners(coordinates.reshape(3, -1), grid_size, half_size, padded_size):
            data_real.index_add_(0, flat_index, real * trilinear)
            data_imag.index_add_(0, flat_index, imag * trilinear)
            weight_flat.index_add_(0, flat_index, (sample_weights * trilinear).to(weight_flat.dtype))


def crop_size(padded_size: int, box_size: int, radius: float) -> int:
    """Size ``Q`` of the centred crop of a ``P``-grid (centred rfft layout, ``(Q, Q, Q // 2 +
    1)``) that holds the trilinear neighbours of every slice sample within ``radius`` (cycles
    per unpadded box) and every padded-grid shell they touch, whole: the samples lie within
    ``r = radius · P/N`` of the centre, their neighbours within ``r + √3``, in shells up to
    ``⌊r⌋ + 3``, whose components lie at most ``⌊r⌋ + 3`` from the centre along each axis.
    Averages over those shells are then the same on the crop as on the whole grid. ``P`` where
    the crop would not be smaller."""
    half = int(math.floor(radius * padded_size / box_size)) + 4
    return min(padded_size, 2 * half)


def symmetrize_hermitian_plane(grid: torch.Tensor, conjugate: bool) -> torch.Tensor:
    """Merge the ``kx = 0`` plane with its Friedel mates, which insertion fills separately.

    Parameters
    ----------
    grid
        ``(P, P, P // 2 + 1)`` accumulator in the centred rfft layout.
    conjugate
        True for complex data (mates are conjugated), False for weights.
    """
    padded_size = grid.shape[0]
    mate = (2 * (padded_size // 2) - torch.arange(padded_size, device=grid.device)) % padded_size
    plane = grid[:, :, 0]
    mirrored = plane[mate][:, mate]
    out = grid.clone()
    out[:, :, 0] = plane + (mirrored.conj() if conjugate else mirrored)
    return out


def reconstruct_from_sums(
    data_ft: torch.Tensor,
    weight: torch.Tensor,
    box_size: int,
    regularisation: torch.Tensor | float,
    padded_size: int | None = None,
) -> torch.Tensor:
    """Regularised reconstruction ``V = data / (weight + regularisation)``, back in real space.

    Parameters
    ----------
    data_ft, weight
        ``(Q, Q, Q // 2 + 1)`` accumulated back-projections and weights (after
        :func:`symmetrize_hermitian_plane`): the whole padded grid (``Q = P``) or its centred
        crop, the rest of the grid taken as zero.
    box_size
        Unpadded box size N.
    regularisation
        A constant, or ``(n_shells,)`` values per padded-grid shell (``1/τ²`` in the units of
        ``weight``), indexed by the rounded padded-grid radius.
    padded_size
        Size P of the padded grid (None: ``Q``).

    Returns
    -------
    torch.Tensor
        ``(N, N, N)`` real volume, gridding-corrected, zero beyond the Nyquist sphere.
    """
    padded_size = data_ft.shape[0] if padded_size is None else padded_size
    radius, shell = cached_radius_and_shell_3d(data_ft.shape[0], data_ft.device)
    if isinstance(regularisation, torch.Tensor):
        # the last value for the shells beyond (the cube's corners): no clamped copy of the shells
        beyond = int(shell.max()) + 1 - regularisation.shape[0]
        if beyond > 0:
            regularisation = torch.cat([regularisation, regularisation[-1:].expand(beyond)])
        denominator = regularisation[shell].add_(weight)
    else:
        denominator = weight + regularisation
    # one grid of each kind at a time, in place: the padded grids of large boxes are GiBs
    dropped = (denominator <= 0) | (radius > padded_size * (box_size // 2) / box_size)
    volume_ft = data_ft / denominator.clamp_(min=torch.finfo(weight.dtype).tiny)
    del denominator
    volume = padded_irfft3_centered(volume_ft.masked_fill_(dropped, 0), padded_size, box_size)
    return volume / gridding_kernel_3d(box_size, padded_size, data_ft.device)
