"""Fourier slice extraction and insertion: invariants, round trips and an independent projector."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_fourier_slice import project_3d_to_2d

from cryotorch.conventions import fft_frequencies_2d, rfft3_centered
from cryotorch.data.phantom import blob_phantom
from cryotorch.em.mstep import reconstruct_class
from cryotorch.ops.backprojection import crop_size, insert_slices, reconstruct_from_sums, self_overlap_sum, symmetrize_hermitian_plane
from cryotorch.ops.filters import soft_spherical_mask
from cryotorch.ops.fourier import radius_grid_3d, shell_index_3d
from cryotorch.ops.fsc import fourier_shell_correlation
from cryotorch.ops.projection import extract_slices, padded_box_size, prepare_fourier_volumes, project_volumes, trilinear_corners, trilinear_table
from cryotorch.ops.rotations import random_rotations
from cryotorch.ops.symmetry import symmetry_matrices

from conftest import DEVICES

BOX = 32


@pytest.fixture(scope="module")
def phantom() -> torch.Tensor:
    return blob_phantom(BOX, 4.0, seed=3)


def real_space_projection(volume: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Sum of the volume along the image z axis: image(x, y) = Σ_z V(Aᵀ (x, y, z))."""
    n = volume.shape[-1]
    coordinate = torch.arange(n, dtype=torch.float32) - n // 2
    z, y, x = torch.meshgrid(coordinate, coordinate, coordinate, indexing="ij")
    image_coordinates = torch.stack([x, y, z], dim=-1)  # (z, y, x, 3)
    reference = image_coordinates @ rotation.float()  # rows: Aᵀ r
    grid = (reference + n // 2) / (n - 1) * 2 - 1
    sampled = F.grid_sample(volume[None, None], grid[None], mode="bilinear", align_corners=True)[0, 0]
    return sampled.sum(0)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


def test_projection_slice_theorem_against_real_space_sums(phantom: torch.Tensor) -> None:
    rotations = random_rotations(4, torch.Generator().manual_seed(0)).float()
    projections = project_volumes(phantom[None], rotations, real_space=True)[0]
    for rotation, projection in zip(rotations, projections):
        reference = real_space_projection(phantom, rotation)
        assert correlation(projection, reference) > 0.99
        # gridding pre-correction lifts the exactly sampled DC term a little; the rest must agree
        assert float(projection.std() / reference.std()) == pytest.approx(1.0, rel=0.03)
        assert float(projection.sum() / reference.sum()) == pytest.approx(1.0, rel=0.08)


def test_identity_projection_is_the_z_sum(phantom: torch.Tensor) -> None:
    projection = project_volumes(phantom[None], torch.eye(3)[None], real_space=True)[0, 0]
    assert correlation(projection, phantom.sum(0)) > 0.999


def test_matches_torch_fourier_slice(phantom: torch.Tensor) -> None:
    rotations = random_rotations(6, torch.Generator().manual_seed(2)).float()
    ours = project_volumes(phantom[None], rotations, real_space=True)[0]
    # torch-fourier-slice rotates slice coordinates into the volume: its matrix is our Aᵀ
    theirs = project_3d_to_2d(phantom, rotations.transpose(1, 2), pad_factor=2.0)
    for a, b in zip(ours, theirs):
        assert correlation(a, b) > 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_batched_classes_and_chunking_agree(phantom: torch.Tensor, device: str) -> None:
    volumes = torch.stack([phantom, phantom.flip(0)]).to(device)
    rotations = random_rotations(20, torch.Generator().manual_seed(4)).float().to(device)
    volumes_ft = prepare_fourier_volumes(volumes)
    frequencies = fft_frequencies_2d(BOX, device).reshape(-1, 2)
    whole = extract_slices(volumes_ft, rotations, frequencies, BOX)
    chunked = extract_slices(volumes_ft, rotations, frequencies, BOX, memory_budget_bytes=1)
    assert whole.shape == (2, 20, frequencies.shape[0])
    # a sample's bits do not depend on the orientations extracted with it (a cache filled by
    # other batches before, or another process, gives the same projections)
    assert torch.equal(whole, chunked)
    single = extract_slices(volumes_ft[1:], rotations[3:4], frequencies, BOX)
    assert torch.equal(whole[1, 3], single[0, 0])
    # four classes gathered together from one voxel-major table agree with each class
    # extracted alone, at every sample, including those whose neighbours leave the grid
    four = prepare_fourier_volumes(torch.stack([phantom, phantom.flip(0), phantom.flip(1), 2 * phantom]).to(device))
    gathered = extract_slices(four, rotations, frequencies, BOX, memory_budget_bytes=2**16)
    assert gathered.shape == (4, 20, frequencies.shape[0])
    for k in range(4):
        assert torch.equal(gathered[k], extract_slices(four[k : k + 1], rotations, frequencies, BOX)[0])


@pytest.mark.parametrize("reach", [0.8, 1.2])
def test_trilinear_table_is_the_corners_side_by_side(reach: float) -> None:
    # all samples inside the grid (columns written in place) or some beyond it (masked corners)
    padded = 16
    generator = torch.Generator().manual_seed(8)
    coordinates = (torch.rand(3, 500, generator=generator) * 2 - 1) * reach * (padded / 2)
    coordinates[0] = coordinates[0].abs()
    index, weight = trilinear_table(coordinates, padded, padded // 2 + 1)
    corners = list(trilinear_corners(coordinates, padded, padded // 2 + 1))
    assert index.shape == weight.shape == (500, 8)
    assert torch.equal(index, torch.stack([i for i, _ in corners], dim=-1))
    assert torch.equal(weight, torch.stack([w for _, w in corners], dim=-1))
    inside = (weight > 0).sum(-1) == 8
    torch.testing.assert_close(weight[inside].sum(-1), torch.ones(int(inside.sum())))
    assert bool(inside.all()) == (reach < 1)


def test_resolution_limit_zeroes_high_frequencies(phantom: torch.Tensor) -> None:
    slices = project_volumes(phantom[None], torch.eye(3)[None], max_frequency=5)[0, 0]
    radius = fft_frequencies_2d(BOX).norm(dim=-1)
    assert float(slices[radius > 5].abs().max()) == 0.0
    assert float(slices[radius <= 5].abs().max()) > 0.0


def test_insertion_is_the_adjoint_of_extraction(phantom: torch.Tensor) -> None:
    # Re<extract(V), s> = Re<V, insert(s)> over the stored half space (kx > 0 voxels counted
    # once); the real part because Friedel folding conjugates, which is real-linear only
    padded = padded_box_size(BOX, 2)
    generator = torch.Generator().manual_seed(5)
    volume_ft = torch.randn(padded, padded, padded // 2 + 1, 2, generator=generator)
    volume_ft = torch.view_as_complex(volume_ft)
    volume_ft[:, :, 0] = 0  # keep away from the Friedel-folded plane, where the maps are not plain adjoints
    rotations = random_rotations(5, generator).float()
    frequencies = fft_frequencies_2d(BOX).reshape(-1, 2)
    frequencies = frequencies[(frequencies[:, 0] > 2)]
    slices = torch.view_as_complex(torch.randn(5, frequencies.shape[0], 2, generator=generator))
    extracted = extract_slices(volume_ft[None], rotations, frequencies, BOX)[0]
    data = torch.zeros_like(volume_ft)
    weight = torch.zeros(volume_ft.shape)
    insert_slices(data, weight, slices, torch.ones(frequencies.shape[0]), rotations, frequencies, BOX)
    data[:, :, 0] = 0
    lhs = float((extracted * slices.conj()).sum().real)
    rhs = float((volume_ft * data.conj()).sum().real)
    assert lhs == pytest.approx(rhs, rel=1e-4)


def _crop_of(grid: torch.Tensor, size: int) -> tuple[slice, ...]:
    """Index of the centred crop of ``size`` of a ``(..., P, P, P // 2 + 1)`` grid."""
    start = grid.shape[-2] // 2 - size // 2
    return (..., slice(start, start + size), slice(start, start + size), slice(0, size // 2 + 1))


@pytest.mark.parametrize("radius", [5.3, 9.7, 16.0])
def test_insertion_into_a_crop_is_the_crop_of_the_whole_grid(radius: float) -> None:
    # slices within `radius` (the lattice's components, and samples on the rim itself, where
    # the upper neighbours reach farthest) inserted into the centred crop that crop_size
    # gives fill it with the whole grid's bits, the whole grid holds nothing beyond it, and
    # every padded shell that holds weight lies whole inside it (at Nyquist, the whole grid)
    padded = padded_box_size(BOX, 2)
    generator = torch.Generator().manual_seed(11)
    rotations = torch.cat([torch.eye(3)[None], random_rotations(39, generator).float()])
    frequencies = fft_frequencies_2d(BOX).reshape(-1, 2)
    angles = torch.rand(200, generator=generator) * 2 * math.pi
    rim = radius * torch.stack([angles.cos(), angles.sin()], dim=-1)
    frequencies = torch.cat([frequencies[frequencies.norm(dim=-1) <= radius], rim])
    slices = torch.view_as_complex(torch.randn(40, frequencies.shape[0], 2, generator=generator))
    slice_weights = torch.rand(40, frequencies.shape[0], generator=generator)
    whole = torch.zeros(padded, padded, padded // 2 + 1, dtype=torch.complex64)
    whole_weight = torch.zeros(whole.shape)
    insert_slices(whole, whole_weight, slices, slice_weights, rotations, frequencies, BOX)
    size = crop_size(padded, BOX, radius)
    assert (size < padded) == (radius < BOX / 2 - 2)
    data = torch.zeros(size, size, size // 2 + 1, dtype=torch.complex64)
    weight = torch.zeros(data.shape)
    insert_slices(data, weight, slices, slice_weights, rotations, frequencies, BOX, padded_size=padded)
    crop = _crop_of(whole, size)
    assert torch.equal(data, whole[crop]) and torch.equal(weight, whole_weight[crop])
    beyond = whole_weight.clone()
    beyond[crop] = 0
    assert not beyond.any()
    shells = shell_index_3d(padded)
    touched = shells <= int(shells[whole_weight > 0].max())
    inside = torch.zeros_like(touched)
    inside[crop] = True
    assert not (touched & ~inside).any()
    if size < padded:
        # every inserted value landed: nothing was dropped at the crop's edges (the whole
        # grid drops the neighbours beyond its own edge at Nyquist)
        assert float(weight.sum()) == pytest.approx(float(slice_weights.sum()), rel=1e-5)
        # the M-step on the crop makes the whole grid's map, SSNR and posterior variance
        tau2 = torch.linspace(2.0, 0.01, BOX // 2 + 1, dtype=torch.float64)
        on_whole = reconstruct_class(whole, whole_weight, tau2, BOX, 2.0)
        on_crop = reconstruct_class(data, weight, tau2, BOX, 2.0, padded)
        torch.testing.assert_close(on_crop[0], on_whole[0], rtol=0, atol=1e-6 * float(on_whole[0].abs().max()))
        torch.testing.assert_close(on_crop[1], on_whole[1])
        torch.testing.assert_close(on_crop[2], on_whole[2][crop])
        # and what the E-step reads back of the variance at the inserted samples
        overlap = self_overlap_sum(on_whole[2], rotations, frequencies, BOX, 0.3)
        torch.testing.assert_close(self_overlap_sum(on_crop[2], rotations, frequencies, BOX, 0.3, padded_size=padded), overlap)


@pytest.mark.parametrize("overlap", [0.0, 0.3])
def test_self_overlap_is_insertion_then_extraction(overlap: float) -> None:
    # a unit value inserted at A·f, multiplied by the grid, spread to each voxel's axis
    # neighbours by `overlap` and extracted at A'·f comes back as self_overlap_sum's value
    padded = padded_box_size(BOX, 2)
    generator = torch.Generator().manual_seed(8)
    grid = torch.rand(padded, padded, padded // 2 + 1, generator=generator) + 0.5
    inserted = random_rotations(3, generator).float()
    axis_angle = torch.tensor([[0.03, -0.02, 0.04], [0.0, 0.0, 0.0], [-0.05, 0.01, 0.02]])
    small_turns = torch.matrix_exp(torch.cross(axis_angle[:, :, None].expand(-1, -1, 3), torch.eye(3).expand(3, -1, -1), dim=1))
    extracted = inserted @ small_turns
    frequencies = fft_frequencies_2d(BOX).reshape(-1, 2)
    frequencies = frequencies[(frequencies.norm(dim=-1) > 3) & (frequencies.norm(dim=-1) < BOX // 3)]
    frequencies = frequencies[torch.randperm(frequencies.shape[0], generator=generator)[:12]]
    kernel = torch.tensor([overlap, 1.0, overlap])
    kernel_3d = (kernel[:, None, None] * kernel[None, :, None] * kernel[None, None, :])[None, None]
    expected = torch.zeros(3, frequencies.shape[0])
    for r in range(3):
        for m in range(frequencies.shape[0]):
            data = torch.zeros(padded, padded, padded // 2 + 1, dtype=torch.complex64)
            insert_slices(data, torch.zeros(grid.shape), torch.ones(1, 1, dtype=torch.complex64), torch.ones(1), inserted[r : r + 1], frequencies[m : m + 1], BOX)
            spread = F.conv3d((data.real * grid)[None, None], kernel_3d, padding=1)[0, 0]
            expected[r, m] = extract_slices(spread.to(torch.complex64)[None], extracted[r : r + 1], frequencies[m : m + 1], BOX)[0, 0, 0].real
    got = self_overlap_sum(grid, inserted, frequencies, BOX, overlap, extracted)
    # samples that fall on different sides of the folded x = 0 plane are not compared
    folded = (torch.einsum("md,rdc->rmc", frequencies, inserted[:, :2]))[..., 0].abs() > 2
    assert folded.sum() > 20
    torch.testing.assert_close(got[folded], expected[folded], rtol=1e-4, atol=1e-6)
    unturned = self_overlap_sum(grid, inserted, frequencies, BOX, overlap)
    assert torch.equal(unturned[1], got[1])  # the second turn is none: the same bits
    assert float((unturned[[0, 2]] - got[[0, 2]]).abs().max()) > 0.1 * float(unturned.max())
    # slices of several classes in one call, each over its own grid of a stack: the same bits
    stack = torch.stack([2 * grid, grid, grid.flip(0)])
    mixed = self_overlap_sum(stack, inserted, frequencies, BOX, overlap, extracted, torch.tensor([1, 0, 2]))
    assert torch.equal(mixed[0], got[0])
    assert torch.equal(mixed[1], self_overlap_sum(stack[0], inserted[1:2], frequencies, BOX, overlap, extracted[1:2])[0])
    assert torch.equal(mixed[2], self_overlap_sum(stack[2], inserted[2:], frequencies, BOX, overlap, extracted[2:])[0])


@pytest.mark.parametrize("device", DEVICES)
def test_insert_then_reconstruct_recovers_the_volume(device: str) -> None:
    rotations = random_rotations(600, torch.Generator().manual_seed(6)).float().to(device)
    # white noise in a soft sphere has power up to Nyquist, unlike the smooth phantom
    noise = torch.randn(BOX, BOX, BOX, generator=torch.Generator().manual_seed(7))
    volume = (noise * soft_spherical_mask(BOX, BOX / 3, 3.0)).to(device)
    slices = project_volumes(volume[None], rotations)[0].reshape(600, -1)
    frequencies = fft_frequencies_2d(BOX, device).reshape(-1, 2)
    padded = padded_box_size(BOX, 2)
    data = torch.zeros(padded, padded, padded // 2 + 1, dtype=torch.complex64, device=device)
    weight = torch.zeros(padded, padded, padded // 2 + 1, device=device)
    insert_slices(data, weight, slices, torch.ones(frequencies.shape[0], device=device), rotations, frequencies, BOX)
    data = symmetrize_hermitian_plane(data, conjugate=True)
    weight = symmetrize_hermitian_plane(weight, conjugate=False)
    reconstruction = reconstruct_from_sums(data, weight, BOX, 1e-3)
    fsc = fourier_shell_correlation(rfft3_centered(reconstruction), rfft3_centered(volume))
    assert float(fsc[: BOX // 2].min()) > 0.98
    # amplitudes inside the Nyquist sphere (the cube's corners are never measured)
    inside = radius_grid_3d(BOX, device) < BOX // 2
    rec_ft, true_ft = rfft3_centered(reconstruction)[inside], rfft3_centered(volume)[inside]
    gain = float((rec_ft * true_ft.conj()).real.sum() / (true_ft.abs() ** 2).sum())
    assert gain == pytest.approx(1.0, rel=0.05)


def test_symmetry_mates_sharpen_a_symmetric_reconstruction(phantom: torch.Tensor) -> None:
    # a C4-symmetric volume: 90° turns about the z axis through voxel N // 2 are exact on the
    # grid (rot90 turns about (N - 1) / 2, so roll by one voxel to re-centre)
    turns = [phantom]
    for _ in range(3):
        turns.append(torch.roll(torch.rot90(turns[-1], 1, dims=(1, 2)), shifts=1, dims=1))
    volume = torch.stack(turns).mean(0)
    rotations = random_rotations(40, torch.Generator().manual_seed(8)).float()
    slices = project_volumes(volume[None], rotations)[0].reshape(40, -1)
    frequencies = fft_frequencies_2d(BOX).reshape(-1, 2)
    padded = padded_box_size(BOX, 2)

    def reconstruct(symmetry: torch.Tensor) -> float:
        data = torch.zeros(padded, padded, padded // 2 + 1, dtype=torch.complex64)
        weight = torch.zeros(padded, padded, padded // 2 + 1)
        mates = (rotations[:, None] @ symmetry[None]).reshape(-1, 3, 3)
        repeated = slices.repeat_interleave(symmetry.shape[0], dim=0)
        insert_slices(data, weight, repeated, torch.ones(frequencies.shape[0]), mates, frequencies, BOX)
        data = symmetrize_hermitian_plane(data, conjugate=True)
        weight = symmetrize_hermitian_plane(weight, conjugate=False)
        result = reconstruct_from_sums(data, weight, BOX, 0.05 * float(weight.mean()))
        return float(fourier_shell_correlation(rfft3_centered(result), rfft3_centered(volume))[1:12].mean())

    plain = reconstruct(symmetry_matrices("C1", dtype=torch.float32))
    with_mates = reconstruct(symmetry_matrices("C4", dtype=torch.float32))
    assert with_mates > plain + 0.02
    assert with_mates > 0.95
