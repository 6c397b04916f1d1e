"""M-step constraint tests: rigid-motion derivatives and the common frame of the classes."""

from __future__ import annotations

import math

import torch

from cryotorch.em.mstep import remove_rigid_differences, rigid_motion_basis
from cryotorch.ops.filters import soft_spherical_mask

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
    from cryotorch.ops.symmetry import symmetry_matrices

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
