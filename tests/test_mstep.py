"""M-step tests: the prior's signal power, rigid-motion derivatives and the common frame of the classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryotorch.conventions import fft_frequencies_2d, rfft3_centered
from cryotorch.data.particles import exact_tree_sum, tree_leaves
from cryotorch.data.phantom import blob_phantom
from cryotorch.em.mstep import SufficientStatistics, expected_signal_power, half_set_reconstruction, half_set_signal_power, map_signal_power, reconstruct_class, remove_rigid_differences, rigid_motion_basis
from cryotorch.em.sums import SumTree
from cryotorch.model import ClassModel
from cryotorch.ops.backprojection import crop_size, insert_slices
from cryotorch.ops.filters import soft_spherical_mask
from cryotorch.ops.fourier import radial_average, shell_index_3d
from cryotorch.ops.projection import extract_slices, prepare_fourier_volumes
from cryotorch.ops.rotations import random_rotations
from cryotorch.ops.symmetry import symmetry_matrices

BOX = 40


def gaussian_blobs(centres: torch.Tensor, sigma: float = 2.5, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, N, N)`` sum of Gaussians at ``centres`` ``(n, 3)`` (x, y, z voxels from the box centre):
    turned and shifted exactly by moving the centres."""
    axis = torch.arange(BOX, dtype=torch.float64) - BOX // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    grid = torch.stack([x, y, z], dim=-1)  # (N, N, N, 3)
    weights = torch.ones(centres.shape[0], dtype=torch.float64) if weights is None else weights
    distance2 = ((grid[..., None, :] - centres) ** 2).sum(-1)  # (N, N, N, n)
    return (weights * torch.exp(-distance2 / (2 * sigma**2))).sum(-1)


def turn(angle_rad: float, axis: int) -> torch.Tensor:
    """Rotation matrix of ``angle_rad`` about axis 0 (x), 1 (y) or 2 (z)."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    i, j = (axis + 1) % 3, (axis + 2) % 3
    matrix = torch.eye(3, dtype=torch.float64)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def centres(seed: int = 0, n: int = 30) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=generator, dtype=torch.float64) - 0.5) * 18


def test_rigid_motion_basis_is_the_derivative_of_exact_shifts_and_turns() -> None:
    points = centres()
    volume = gaussian_blobs(points)
    basis = rigid_motion_basis(volume)
    step = 1e-3
    for axis in range(3):
        shift = torch.zeros(3, dtype=torch.float64)
        shift[axis] = step
        numeric = (gaussian_blobs(points + shift) - volume) / step
        # moving the map by +t changes it by −t·∇V
        assert float((numeric + basis[axis]).norm() / basis[axis].norm()) < 0.01
        turned = gaussian_blobs(points @ turn(step, axis).T)
        numeric = (turned - volume) / step
        assert float((numeric + basis[3 + axis]).norm() / basis[3 + axis].norm()) < 0.01


def test_common_frame_removes_turns_and_shifts_and_keeps_structure() -> None:
    points = centres(seed=1)
    mask = soft_spherical_mask(BOX, 16, 3.0).double()
    reference = gaussian_blobs(points) * mask
    # the same structure turned by 4° about a tilted axis and shifted by 0.4 voxel
    rotation = turn(math.radians(3), 0) @ turn(math.radians(2), 2)
    moved = gaussian_blobs(points @ rotation.T + torch.tensor([0.4, -0.2, 0.1], dtype=torch.float64)) * mask
    volumes = remove_rigid_differences(torch.stack([reference, moved]), torch.tensor([0.5, 0.5]), mask)
    before = float((moved - reference).norm())
    after = float((volumes[1] - volumes[0]).norm())
    assert after < 0.15 * before

    # a structural difference (three blobs removed) survives but for its small rigid-motion part
    weights = torch.ones(points.shape[0], dtype=torch.float64)
    weights[:3] = 0
    variant = gaussian_blobs(points, weights=weights) * mask
    volumes = remove_rigid_differences(torch.stack([reference, variant, torch.zeros_like(reference)]), torch.tensor([0.4, 0.4, 0.2]), mask)
    kept = volumes[0] - volumes[1]
    truth = reference - variant
    assert float((kept * truth).sum() / (kept.norm() * truth.norm())) > 0.95
    assert abs(float(kept.norm() / truth.norm()) - 1) < 0.1
    # an empty (junk) class stays nearly empty
    assert float(volumes[2].norm()) < 0.05 * float(reference.norm())


def test_common_frame_of_symmetric_maps_moves_them_only_along_the_symmetry() -> None:
    # C4 (about z) leaves turns about z and shifts along z unchanged: the common frame removes
    # those and nothing else; D2 leaves no rigid motion unchanged, so nothing is removed
    points = centres(seed=2)
    mask = soft_spherical_mask(BOX, 16, 3.0).double()
    reference = gaussian_blobs(points) * mask
    along_z = gaussian_blobs(points @ turn(math.radians(3), 2).T + torch.tensor([0.0, 0.0, 0.4], dtype=torch.float64)) * mask
    across = gaussian_blobs(points @ turn(math.radians(3), 0).T + torch.tensor([0.4, 0.0, 0.0], dtype=torch.float64)) * mask
    weights = torch.tensor([0.5, 0.5])
    c4, d2 = symmetry_matrices("C4"), symmetry_matrices("D2")
    for moved, group, removed in ((along_z, c4, True), (across, c4, False), (along_z, d2, False), (across, None, True)):
        volumes = remove_rigid_differences(torch.stack([reference, moved]), weights, mask, group)
        ratio = float((volumes[1] - volumes[0]).norm() / (moved - reference).norm())
        assert ratio < 0.15 if removed else ratio > 0.99


def test_map_signal_power_is_that_of_the_projector_map() -> None:
    """Against a NumPy rendering of RELION's Projector::computeFourierTransformMap: divide the
    map by the trilinear gridding kernel, zero-pad it to P, transform, and average half of |F|²
    over the stored half of the padded grid in unpadded shells round(r / p)."""
    box, padding = 20, 2.0
    volume = blob_phantom(box, 4.0, seed=5) * soft_spherical_mask(box, 0.4 * box, 2.0)
    padded = int(padding * box)
    centred = np.arange(box) - box // 2
    profile = np.sinc(centred / padded) ** 2
    corrected = volume.double().numpy() / (profile[:, None, None] * profile[None, :, None] * profile[None, None, :])
    grid = np.zeros((padded,) * 3)
    start = padded // 2 - box // 2
    grid[start : start + box, start : start + box, start : start + box] = corrected
    spectrum = np.fft.rfftn(np.fft.ifftshift(grid))
    kz, ky = np.meshgrid(np.fft.fftfreq(padded) * padded, np.fft.fftfreq(padded) * padded, indexing="ij")
    kx = np.arange(padded // 2 + 1)
    radius = np.sqrt(kz[..., None] ** 2 + ky[..., None] ** 2 + kx[None, None, :] ** 2)
    shells = np.round(radius / padding).astype(int).ravel()
    inside = shells <= box // 2
    sums = np.bincount(shells[inside], (np.abs(spectrum) ** 2).ravel()[inside], minlength=box // 2 + 1)
    reference = 0.5 * sums / np.bincount(shells[inside], minlength=box // 2 + 1)
    power = map_signal_power(volume[None], padding)[0].numpy()
    np.testing.assert_allclose(power, reference, rtol=1e-4, atol=1e-6 * reference.max())


def test_signal_power_update_finds_the_power_of_the_signal() -> None:
    """Slices of a known map with noise of known variance (σ² per real and imaginary part, as the
    E-step's sums): the fixed point of the τ² update is the map's power wherever the data hold
    signal, and stays within half the noise power where they do not. Half the power of the
    solvent-masked map (RELION's Class3D estimate, :func:`map_signal_power`) falls to two thirds
    of the signal's (both as the projector holds them) at an SSNR of 2."""
    box, padded, sigma2 = 24, 48, 1000.0
    generator = torch.Generator().manual_seed(0)
    volume = blob_phantom(box, 5.0, seed=3)
    n_shells = box // 2 + 1
    shells = shell_index_3d(box)
    power = 0.5 * radial_average(rfft3_centered(volume).abs().double() ** 2, shells, n_shells)
    frequencies = fft_frequencies_2d(box).reshape(-1, 2).float()
    frequencies = frequencies[frequencies.norm(dim=-1) <= box // 2]
    rotations = random_rotations(1500, generator).float()
    slices = extract_slices(prepare_fourier_volumes(volume[None].float(), 2.0), rotations, frequencies, box)[0]
    noisy = slices + math.sqrt(sigma2) * torch.complex(torch.randn(slices.shape, generator=generator), torch.randn(slices.shape, generator=generator))
    data = torch.zeros(padded, padded, padded // 2 + 1, dtype=torch.complex64)
    weight = torch.zeros(padded, padded, padded // 2 + 1)
    insert_slices(data, weight, noisy / sigma2, torch.full(slices.shape, 1 / sigma2), rotations, frequencies, box)
    _, ssnr, _ = reconstruct_class(data, weight, power, box, 1.0)
    noise_power = power / ssnr

    mask = soft_spherical_mask(box, 0.45 * box, 2.0)
    estimate, map_power = power.clone(), power.clone()
    for _ in range(50):
        estimate = expected_signal_power(data, weight, estimate, box)
        masked_map = reconstruct_class(data, weight, map_power, box, 1.0)[0] * mask
        map_power = map_signal_power(masked_map[None], 2.0)[0]

    measured = slice(2, n_shells)  # shells 0 and 1 hold too few components for a power to be measured
    assert ssnr[measured].max() > 100 and ssnr[measured].min() < 0.01  # from clear signal to noise alone
    error = (estimate - power).abs()
    assert torch.all(error[measured] <= 0.1 * power[measured] + 0.5 * noise_power[measured]), (estimate / power)[measured]
    near_two = int(torch.argmin((ssnr[measured].log() - math.log(2.0)).abs())) + 2
    signal_as_projected = map_signal_power((volume * mask)[None], 2.0)[0]
    assert map_power[near_two] < 0.75 * signal_as_projected[near_two] and error[near_two] < 0.2 * power[near_two]


def test_half_set_signal_power_follows_the_signal_and_vanishes_without_it() -> None:
    """Slices of a known map with noise of known variance, split into two half sets: τ² from
    their FSC follows the map's power (within a factor 2.5, the mask raising the FSC) where the
    data hold signal, and stays near 0 in every shell of pure-noise slices."""
    box, padded, sigma2 = 24, 48, 1000.0
    generator = torch.Generator().manual_seed(0)
    volume = blob_phantom(box, 5.0, seed=3)
    n_shells = box // 2 + 1
    power = 0.5 * radial_average(rfft3_centered(volume).abs().double() ** 2, shell_index_3d(box), n_shells)
    frequencies = fft_frequencies_2d(box).reshape(-1, 2).float()
    frequencies = frequencies[frequencies.norm(dim=-1) <= box // 2]
    rotations = random_rotations(1500, generator).float()
    slices = extract_slices(prepare_fourier_volumes(volume[None].float(), 2.0), rotations, frequencies, box)[0]
    mask = soft_spherical_mask(box, 0.45 * box, 2.0)

    def half_sums(signal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = signal + math.sqrt(sigma2) * torch.complex(torch.randn(signal.shape, generator=generator), torch.randn(signal.shape, generator=generator))
        data = torch.zeros(2, padded, padded, padded // 2 + 1, dtype=torch.complex64)
        weight = torch.zeros(2, padded, padded, padded // 2 + 1)
        for half in (0, 1):
            rows = slice(half, None, 2)
            insert_slices(data[half], weight[half], noisy[rows] / sigma2, torch.full(signal[rows].shape, 1 / sigma2), rotations[rows], frequencies, box)
        return data, weight

    data, weight = half_sums(slices)
    _, ssnr, _ = reconstruct_class(data.sum(0), weight.sum(0), power, box, 1.0)
    noise_power = power / ssnr
    tau2, fsc = half_set_signal_power(data, weight, box, mask)
    assert fsc[1] > 0.99 and fsc[-1] < 0.1
    with_signal = (ssnr > 0.2) & (ssnr < 100)
    assert int(with_signal.sum()) >= 4
    ratio = (tau2 / power)[with_signal]
    assert torch.all(ratio > 0.5) and torch.all(ratio < 2.5), ratio
    tau2_noise, _ = half_set_signal_power(*half_sums(torch.zeros_like(slices)), box, mask)
    relative = (tau2_noise / noise_power)[2:]
    assert float(relative.mean()) < 0.1 and float(relative.max()) < 0.5, relative


def test_half_set_maps_from_a_crop_are_those_of_the_whole_grid() -> None:
    """Half-set sums within a resolution limit, held on the crop that crop_size gives (as
    reconstruct and class3d hold them) and on the whole padded grid: the same half maps, full
    map and FSC, the same FSC-based τ², and the same posterior τ² in the shells measured."""
    box, padded, radius = 24, 48, 7.0
    generator = torch.Generator().manual_seed(4)
    volume = blob_phantom(box, 5.0, seed=5)
    frequencies = fft_frequencies_2d(box).reshape(-1, 2).float()
    frequencies = frequencies[frequencies.norm(dim=-1) <= radius]
    rotations = random_rotations(400, generator).float()
    slices = extract_slices(prepare_fourier_volumes(volume[None].float(), 2.0), rotations, frequencies, box)[0]
    slices = slices + 3 * torch.complex(torch.randn(slices.shape, generator=generator), torch.randn(slices.shape, generator=generator))
    size = crop_size(padded, box, radius)
    assert size < padded
    grids = {}
    for grid_size in (padded, size):
        data = torch.zeros(2, grid_size, grid_size, grid_size // 2 + 1, dtype=torch.complex64)
        weight = torch.zeros(data.shape)
        for half in (0, 1):
            rows = slice(half, None, 2)
            insert_slices(data[half], weight[half], slices[rows], torch.ones(frequencies.shape[0]), rotations[rows], frequencies, box, padded_size=padded)
        grids[grid_size] = (data, weight)
    mask = soft_spherical_mask(box, 0.4 * box, 2.0)
    whole = half_set_reconstruction(*grids[padded], box, 1.0, mask=mask)
    cropped = half_set_reconstruction(*grids[size], box, 1.0, mask=mask, padded_size=padded)
    scale = float(whole.full.abs().max())
    torch.testing.assert_close(cropped.halves, whole.halves, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(cropped.full, whole.full, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(cropped.fsc, whole.fsc, rtol=0, atol=1e-5)
    torch.testing.assert_close(half_set_signal_power(*grids[size], box, mask, padded)[0], half_set_signal_power(*grids[padded], box, mask)[0], rtol=1e-4, atol=0)
    tau2 = torch.linspace(1.0, 0.01, box // 2 + 1, dtype=torch.float64)
    measured = int(radius) + 1
    on_crop = expected_signal_power(grids[size][0].sum(0), grids[size][1].sum(0), tau2, box, padded)
    on_whole = expected_signal_power(grids[padded][0].sum(0), grids[padded][1].sum(0), tau2, box)
    torch.testing.assert_close(on_crop[:measured], on_whole[:measured], rtol=1e-4, atol=0)


LEAVES = 8  # compute.sum_tree_leaves


def test_tree_leaves_cut_the_same_batches_for_any_number_of_processes() -> None:
    rows = np.random.default_rng(0).permutation(1000)[:203]
    single = tree_leaves(rows, 10, LEAVES, 0, 1)
    assert [leaf for leaf, _ in single] == list(range(LEAVES))
    batches = [batch for _, leaf in single for batch in leaf]
    assert len(batches) == 21 and all(len(batch) == 10 for batch in batches[:-1])
    np.testing.assert_array_equal(np.concatenate(batches), rows)
    for world_size in (2, 3, 4, 8, 16):
        ranks = [tree_leaves(rows, 10, LEAVES, rank, world_size) for rank in range(world_size)]
        # each rank takes a consecutive run of the same leaves and batches
        leaves = [pair for plan in ranks for pair in plan]
        if world_size <= LEAVES:
            assert [leaf for leaf, _ in leaves] == list(range(LEAVES))
            for (_, theirs), (_, ours) in zip(leaves, single):
                assert len(theirs) == len(ours) and all((a == b).all() for a, b in zip(theirs, ours))
        np.testing.assert_array_equal(np.concatenate([batch for _, leaf in leaves for batch in leaf]), rows)
        assert exact_tree_sum(LEAVES, world_size) == (world_size in (2, 4, 8))


def test_a_sum_tree_adds_in_the_same_order_whoever_holds_its_subtrees() -> None:
    # float32 sums of values of very different sizes: the order of additions shows in the bits
    generator = torch.Generator().manual_seed(1)
    leaves = [torch.randn(1000, generator=generator) * 10.0 ** torch.randint(-4, 5, (1000,), generator=generator) for _ in range(LEAVES)]

    def sums(values: torch.Tensor) -> SufficientStatistics:
        stats = SufficientStatistics.zeros(1, 4, 1, 3, torch.device("cpu"))
        stats.weight.view(-1).copy_(values[: stats.weight.numel()])
        stats.noise_power.view(-1).copy_(values[:3].double())
        return stats

    whole = SumTree()
    added = []  # each leaf but the first is added into its left sibling once: free for reuse
    for index, values in enumerate(leaves):
        added += whole.add_leaf(index, sums(values))
    assert len(whole.nodes) == 1
    root = whole.total()
    assert len(added) == LEAVES - 1 and all(item is not root for item in added)
    sequential = sums(leaves[0])
    for values in leaves[1:]:
        sequential.add_(sums(values))
    assert not torch.equal(root.weight, sequential.weight)  # the order matters here
    for world_size in (2, 4, 8):
        parts = []
        for rank in range(world_size):
            tree = SumTree()
            per_rank = LEAVES // world_size
            for index in range(rank * per_rank, (rank + 1) * per_rank):
                tree.add_leaf(index, sums(leaves[index]))
            assert len(tree.nodes) == 1
            parts.append(tree.total())
        # the ranks' nodes added pairwise, as RunContext.pairwise_sum adds them
        while len(parts) > 1:
            parts = [left.add_(right) for left, right in zip(parts[0::2], parts[1::2])]
        for ours, theirs in zip(parts[0].tensors(), root.tensors()):
            assert torch.equal(ours, theirs)
    # three ranks (an uneven share: leaves 0-1, 2-4, 5-7) hold runs that are no subtree: a
    # rank adds its nodes left to right, so its total is (2 + 3) + 4, and the whole differs
    # from the tree's root only in its rounding
    shares = [tree_leaves(np.arange(LEAVES), 1, LEAVES, rank, 3) for rank in range(3)]
    totals = []
    for share in shares:
        tree = SumTree()
        for index, _ in share:
            tree.add_leaf(index, sums(leaves[index]))
        totals.append(tree.total())
    assert [index for index, _ in shares[1]] == [2, 3, 4]
    expected = sums(leaves[2]).add_(sums(leaves[3])).add_(sums(leaves[4]))
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(totals[1].tensors(), expected.tensors()))
    whole_sum = totals[0].add_(totals[1]).add_(totals[2])
    torch.testing.assert_close(whole_sum.weight, root.weight, rtol=1e-5, atol=1e-3)
    # a rank with no leaf (more processes than leaves) holds no sums
    assert SumTree().total() is None


def test_a_class_model_reloads_the_crop_its_checkpoint_holds() -> None:
    # the posterior variance is kept on the crop of the padded grid that the last sums
    # reached, whose size changes from iteration to iteration: a model made for the run
    # takes the checkpoint's size; one of another K is refused
    saved = ClassModel(2, 16, 32, 1, 5.0)
    saved.inverse_denominator = torch.rand(2, 12, 12, 7, generator=torch.Generator().manual_seed(1))
    state = saved.state_dict()
    fresh = ClassModel(2, 16, 32, 1, 5.0)
    assert fresh.inverse_denominator.shape == (2, 0, 0, 1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.inverse_denominator, saved.inverse_denominator)
    with pytest.raises(RuntimeError, match="inverse_denominator"):
        ClassModel(3, 16, 32, 1, 5.0).load_state_dict(state)
