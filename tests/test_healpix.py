"""HEALPix NESTED geometry and RELION's orientation sampling: invariants and RELION numbers."""

from __future__ import annotations

import math

import pytest
import torch

from cryotorch.conventions import euler_deg_to_matrix
from cryotorch.ops.healpix import (
    OrientationGrid,
    ang2pix_nest,
    angular_step_deg,
    healpix_max_pixel_radius_rad,
    healpix_npix,
    healpix_nside,
    order_from_angular_step,
    orientation_grid,
    oversample_orientations,
    pairwise_rotation_angle_deg,
    pix2ang_nest,
    rotation_angle_deg,
    rowwise_matrix_angle_deg,
)
from cryotorch.ops.symmetry import symmetry_matrices

from conftest import DEVICES



def _unit_vectors(theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.sin(theta) * torch.cos(phi), torch.sin(theta) * torch.sin(phi), torch.cos(theta)], -1)


def _random_directions(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform random unit vectors (n, 3) and their (theta, phi), seeded."""
    vectors = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    vectors = vectors / vectors.norm(dim=-1, keepdim=True)
    return vectors, torch.acos(vectors[:, 2]), torch.atan2(vectors[:, 1], vectors[:, 0])


def _centres(order: int, device: str) -> torch.Tensor:
    return _unit_vectors(*pix2ang_nest(order, torch.arange(healpix_npix(order), device=device)))


def _every_orientation(grid: OrientationGrid) -> torch.Tensor:
    """``(R, 3)`` Euler angles of every orientation of a small grid."""
    return grid.euler_deg(torch.arange(grid.n_orientations, device=grid.pixels.device))


def test_npix_and_nside() -> None:
    for order in range(7):
        assert healpix_nside(order) == 2**order
        assert healpix_npix(order) == 12 * 4**order
    with pytest.raises(ValueError):
        healpix_npix(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", range(5))
def test_pix2ang_ang2pix_round_trip(order: int, device: str) -> None:
    pixels = torch.arange(healpix_npix(order), device=device)
    theta, phi = pix2ang_nest(order, pixels)
    assert theta.device.type == device and theta.dtype == torch.float64
    assert bool((theta >= 0).all() & (theta <= math.pi).all() & (phi >= 0).all() & (phi < 2 * math.pi).all())
    assert torch.equal(ang2pix_nest(order, theta, phi), pixels)
    assert torch.equal(ang2pix_nest(order, theta, phi - 2 * math.pi), pixels)  # phi taken modulo 2 pi


def test_base_pixels_and_ring_structure() -> None:
    theta, phi = pix2ang_nest(0, torch.arange(12))
    expected_z = torch.tensor([2 / 3] * 4 + [0.0] * 4 + [-2 / 3] * 4, dtype=torch.float64)
    assert torch.allclose(torch.cos(theta), expected_z, atol=1e-15)
    quarter = math.pi / 4
    assert torch.allclose(phi, torch.tensor([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7], dtype=torch.float64) * quarter)

    order, nside = 3, 8
    z = torch.cos(pix2ang_nest(order, torch.arange(healpix_npix(order)))[0])
    rings, counts = torch.unique(torch.round(z * 1e9) / 1e9, return_counts=True)
    cap = [1 - i * i / (3 * nside * nside) for i in range(1, nside)]
    belt = [(2 * nside - i) * 2 / (3 * nside) for i in range(nside, 3 * nside + 1)]
    expected_rings = sorted(cap + belt + [-c for c in cap])
    assert len(rings) == 4 * nside - 1
    assert torch.allclose(rings, torch.tensor(expected_rings, dtype=torch.float64), atol=1e-9)
    assert counts.flip(0)[: nside - 1].tolist() == [4 * i for i in range(1, nside)]  # north cap
    assert counts[nside - 1 : 3 * nside].tolist() == [4 * nside] * (2 * nside + 1)  # belt


@pytest.mark.parametrize("device", DEVICES)
def test_equal_area_and_covering_radius(device: str) -> None:
    order, n = 1, 200_000
    vectors, theta, phi = _random_directions(n, device)
    centres = _centres(order, device)
    expected = n / healpix_npix(order)
    max_radius = healpix_max_pixel_radius_rad(order)

    # Exactly equal areas: counts per containing pixel within 8 % (~5 Poisson sigma).
    pixels = ang2pix_nest(order, theta, phi)
    counts = torch.bincount(pixels, minlength=healpix_npix(order)).double()
    assert float((counts / expected - 1).abs().max()) < 0.08
    # Each direction lies within max_pixrad of its own pixel's centre (correct for any angle).
    to_own = torch.acos((vectors * centres[pixels]).sum(-1).clamp(max=1.0))
    assert float(to_own.max()) <= max_radius + 1e-12
    assert float(to_own.max()) > 0.95 * max_radius  # and the bound is nearly reached

    # Nearest-centre (Voronoi) cells are only nearly equal: within 15 %.
    cosines = vectors @ centres.T  # (n, npix)
    nearest_counts = torch.bincount(cosines.argmax(-1), minlength=healpix_npix(order)).double()
    assert float((nearest_counts / expected - 1).abs().max()) < 0.15
    assert float(torch.acos(cosines.max(-1).values.clamp(max=1.0)).max()) <= max_radius


def test_max_pixel_radius_shrinks_with_order() -> None:
    # At order 0 the largest pixel radius is from a cap face centre (z = 2/3) to the pole.
    radii = [healpix_max_pixel_radius_rad(order) for order in range(6)]
    assert abs(radii[0] - math.acos(2 / 3)) < 1e-12
    assert all(a > 1.5 * b for a, b in zip(radii, radii[1:]))
    assert all(r > math.radians(angular_step_deg(order)) / 2 for order, r in enumerate(radii))


@pytest.mark.parametrize("order", range(4))
def test_nested_children(order: int) -> None:
    fine = torch.arange(healpix_npix(order + 1))
    theta, phi = pix2ang_nest(order + 1, fine)
    assert torch.equal(ang2pix_nest(order, theta, phi), fine // 4)
    nearest_coarse = (_unit_vectors(theta, phi) @ _centres(order, "cpu").T).argmax(-1)
    assert torch.equal(nearest_coarse, fine // 4)


def test_angular_step_and_order_from_step() -> None:
    assert angular_step_deg(2) == 15.0 and angular_step_deg(3) == 7.5
    relion_gui_labels = [30, 15, 7.5, 3.7, 1.8, 0.9, 0.5, 0.2, 0.1]  # RELION GUI index i -> order i + 1
    assert [order_from_angular_step(s) for s in relion_gui_labels] == list(range(1, 10))
    assert order_from_angular_step(60.0) == 0 and order_from_angular_step(1000.0) == 0
    assert order_from_angular_step(6.0) == 4  # never coarser than asked beyond the 20 % slack
    with pytest.raises(ValueError):
        order_from_angular_step(0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_orientation_grid_c1_order_2(device: str) -> None:
    grid = orientation_grid(2, device=device)
    assert (grid.n_directions, grid.n_psi, grid.n_orientations) == (192, 24, 192 * 24)  # RELION: 192 directions x 24 psi
    rows = torch.arange(192 * 24, device=device)
    euler = grid.euler_deg(rows)
    assert euler.shape == (192 * 24, 3) and euler.dtype == torch.float64
    assert euler.device.type == device
    assert torch.equal(grid.direction_index(rows), rows // 24)
    assert torch.equal(grid.pixel_index(rows), rows // 24)
    assert torch.equal(grid.psi_index(rows), rows % 24)
    rot, tilt, psi = euler.unbind(-1)
    assert torch.allclose(psi, grid.psi_index(rows).double() * 15.0)
    assert bool((rot >= -180).all() & (rot <= 180).all() & (tilt >= 0).all() & (tilt <= 180).all())
    theta, phi = pix2ang_nest(2, grid.pixel_index(rows))
    assert torch.allclose(torch.deg2rad(tilt), theta)
    assert torch.allclose(torch.remainder(torch.deg2rad(rot), 2 * math.pi), phi)


@pytest.mark.parametrize(("symmetry", "order"), [("C4", 2), ("D1", 3), ("D7", 3), ("T", 3), ("O", 3), ("I", 3), ("I3", 3)])
def test_orientation_grid_asymmetric_unit(symmetry: str, order: int) -> None:
    grid = orientation_grid(order, symmetry)
    group = symmetry_matrices(symmetry)
    kept = _unit_vectors(*pix2ang_nest(order, grid.pixels))  # (D, 3)
    assert grid.n_directions == len(kept)
    assert abs(grid.n_directions * len(group) / healpix_npix(order) - 1) < 0.3
    mates = torch.einsum("dk,gkl->gdl", kept, group)  # R^T d for every kept d, (G, D, 3)
    pixel_radius = healpix_max_pixel_radius_rad(order)
    # Coverage: every direction on the sphere has a symmetry mate of a kept direction nearby.
    everything = _centres(order, "cpu")
    nearest = (everything @ mates.reshape(-1, 3).T).max(-1).values
    assert float(torch.acos(nearest.clamp(max=1.0)).max()) < 2 * pixel_radius
    # No redundancy: no kept direction lies within half a pixel radius of another's mate
    # (a direction near a symmetry axis may be close to its own mates, as in RELION).
    cosines = torch.einsum("gdk,ek->gde", mates, kept)
    cosines[:, torch.arange(len(kept)), torch.arange(len(kept))] = -1.0
    assert float(cosines.max()) <= math.cos(0.5 * pixel_radius)


def test_a_fine_grid_holds_its_directions_only() -> None:
    # order 7 (0.47°): 151 million orientations, whose angles alone would take 3.6 GB
    grid = orientation_grid(7)
    assert grid.n_orientations == 196_608 * 768
    held = sum(t.numel() * t.element_size() for t in (grid.rot_deg, grid.tilt_deg, grid.pixels))
    assert held == 196_608 * 24
    rows = torch.tensor([0, 767, 768, 123_456_789, grid.n_orientations - 1])
    euler = grid.euler_deg(rows)
    theta, phi = pix2ang_nest(7, grid.pixel_index(rows))
    torch.testing.assert_close(torch.deg2rad(euler[:, 1]), theta)
    torch.testing.assert_close(torch.remainder(torch.deg2rad(euler[:, 0]), 2 * math.pi), phi)
    torch.testing.assert_close(euler[:, 2], (rows % 768).double() * angular_step_deg(7), rtol=0, atol=0)
    assert torch.equal(grid.pixel_index(rows), rows // 768)


def test_c4_grid_is_a_quarter() -> None:
    grid = orientation_grid(2, "C4")
    assert grid.n_directions == 48 and grid.symmetry == "C4"
    assert bool((grid.rot_deg.abs() <= 45.0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_oversampling(device: str) -> None:
    grid = orientation_grid(2, device=device)
    picks = torch.tensor([0, 777, 4607], device=device)
    pixels, psis = grid.pixel_index(picks), grid.psi_index(picks)
    fine = oversample_orientations(2, pixels, psis, oversampling=1)
    assert fine.shape == (3, 8, 3) and fine.device.type == device
    # Fine directions are the NESTED children 4p .. 4p + 3, in that order, 2 psi each.
    theta, phi = torch.deg2rad(fine[..., 1]), torch.deg2rad(fine[..., 0])
    children = ang2pix_nest(3, theta, phi)  # (3, 8)
    expected = 4 * pixels[:, None] + torch.arange(4, device=device).repeat_interleave(2)
    assert torch.equal(children, expected)
    # Psi sub-samples sit at -/+ a quarter of the coarse step and average to the coarse psi.
    coarse_psi = grid.euler_deg(picks)[:, 2]
    assert torch.allclose(fine[..., 2].mean(-1), coarse_psi)
    assert torch.allclose(fine[:, :2, 2] - coarse_psi[:, None], torch.tensor([-3.75, 3.75], device=device).double())

    deeper = oversample_orientations(2, pixels, psis, oversampling=2)
    assert deeper.shape == (3, 64, 3)
    descendants = ang2pix_nest(4, torch.deg2rad(deeper[..., 1]), torch.deg2rad(deeper[..., 0]))
    assert torch.equal(torch.sort(torch.unique(descendants[0])).values, 16 * pixels[0] + torch.arange(16, device=device))
    same = oversample_orientations(2, pixels, psis, oversampling=0)
    assert torch.allclose(same[:, 0], grid.euler_deg(picks))


@pytest.mark.parametrize("device", DEVICES)
def test_rotation_angle(device: str) -> None:
    euler = torch.tensor([[10.0, 20.0, 30.0], [-170.0, 95.0, 300.0]], dtype=torch.float64, device=device)
    assert torch.allclose(rotation_angle_deg(euler, euler), torch.zeros(2, dtype=torch.float64, device=device))
    about_z = torch.tensor([90.0, 0.0, 0.0], dtype=torch.float64, device=device)
    assert abs(float(rotation_angle_deg(about_z, torch.zeros_like(about_z))) - 90.0) < 1e-12
    assert abs(float(rotation_angle_deg(torch.tensor([0.0, 180.0, 0.0]), torch.zeros(3))) - 180.0) < 1e-9
    # Agrees with the arccos formula away from 0 and 180 degrees.
    a = torch.rand(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 360
    b = torch.rand(50, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 360
    relative = euler_deg_to_matrix(a) @ euler_deg_to_matrix(b).transpose(-1, -2)
    reference = torch.rad2deg(torch.acos(((relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)))
    assert torch.allclose(rotation_angle_deg(a, b), reference, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_pairwise_rotation_angle(device: str) -> None:
    grid = _every_orientation(orientation_grid(1, device=device))  # (576, 3)
    centres = torch.cat([grid[[0, 100, 400]], torch.tensor([[10.0, 20.0, 30.0], [0.0, 180.0, 0.0]], dtype=torch.float64, device=device)])
    angles = pairwise_rotation_angle_deg(centres, grid)
    assert angles.shape == (5, len(grid)) and angles.dtype == torch.float64
    reference = rotation_angle_deg(centres[:, None], grid[None])
    assert torch.allclose(angles, reference, atol=1e-5)
    # a pose is at 0 from itself, and a half turn at 180
    assert float(angles[[0, 1, 2], [0, 100, 400]].abs().max()) < 1e-5
    assert abs(float(pairwise_rotation_angle_deg(torch.tensor([[0.0, 180.0, 0.0]]), torch.zeros(1, 3))[0, 0]) - 180.0) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_pairwise_rotation_angle_with_symmetry(device: str) -> None:
    c4 = symmetry_matrices("C4", device=device)
    grid = _every_orientation(orientation_grid(2, "C4", device=device))
    centres = grid[[5, 100, 300]]
    angles = pairwise_rotation_angle_deg(centres, grid, c4)
    # oracle: the smallest angle to the explicit mates B·L
    mates = euler_deg_to_matrix(grid)[:, None] @ c4[None]  # (R, G, 3, 3)
    relative = euler_deg_to_matrix(centres)[:, None, None] @ mates.transpose(-1, -2)[None]
    reference = torch.rad2deg(torch.acos(((relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1))).amin(-1)
    assert torch.allclose(angles, reference, atol=1e-5)
    assert torch.all(angles <= pairwise_rotation_angle_deg(centres, grid) + 1e-9)
    # a pose turned by a C4 operator (rot + 90) is at 0 from its mate only with the symmetry
    turned = grid[100] + torch.tensor([90.0, 0.0, 0.0], dtype=torch.float64, device=device)
    assert float(pairwise_rotation_angle_deg(turned[None], grid[[100]])[0, 0]) > 89.0
    assert float(pairwise_rotation_angle_deg(turned[None], grid[[100]], c4)[0, 0]) < 1e-5
    assert float(rotation_angle_deg(turned, grid[100])) > 89.0 and float(rotation_angle_deg(turned, grid[100], c4)) < 1e-9
    torch.testing.assert_close(rotation_angle_deg(centres[:, None], grid[None], c4), reference, atol=1e-5, rtol=0)
    # each pose against its own matrices: the pairwise angles of those pairs
    own = torch.tensor([[0, 7, 9], [100, 2, 2], [300, 301, 5]], device=device)  # three grid rows per pose
    rowwise = rowwise_matrix_angle_deg(euler_deg_to_matrix(centres), euler_deg_to_matrix(grid)[own], c4)
    torch.testing.assert_close(rowwise, angles.gather(1, own), rtol=0, atol=1e-9)
    torch.testing.assert_close(rowwise_matrix_angle_deg(euler_deg_to_matrix(centres), euler_deg_to_matrix(grid)[own]), pairwise_rotation_angle_deg(centres, grid).gather(1, own), rtol=0, atol=1e-9)
    # near the border of the asymmetric unit (rot in [-45, 45]), the neighbours across it are
    # the grid poses at the other side (rot near -45)
    border = torch.tensor([[44.0, 60.0, 30.0]], dtype=torch.float64, device=device)
    across = grid[:, 0] < -30.0
    assert bool((pairwise_rotation_angle_deg(border, grid, c4)[0, across] <= 20.0).any())
    assert not bool((pairwise_rotation_angle_deg(border, grid)[0, across] <= 20.0).any())
