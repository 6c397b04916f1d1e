"""FSC, shells, masks and filters."""

from __future__ import annotations

import math

import pytest
import torch

from cryotorch.conventions import fft_frequencies_2d, irfft2_centered, rfft2_centered, rfft3_centered
from cryotorch.ops.filters import (
    bfactor_filter_3d,
    crop_or_pad,
    distance_to_region,
    lowpass_filter_3d,
    resample_to_grid,
    soft_disc_masks,
    soft_edge_mask,
    soft_spherical_mask,
)
from cryotorch.ops.fourier import coloured_noise_2d, fourier_resample, radial_average, radius_grid_3d, shell_index_2d, shell_power_3d, squared_magnitude, translate_2d_ft
from cryotorch.ops.fsc import fourier_shell_correlation, resolution_at_threshold


def test_fsc_of_identical_maps_is_one_and_of_independent_noise_is_near_zero() -> None:
    generator = torch.Generator().manual_seed(0)
    a = rfft3_centered(torch.randn(32, 32, 32, generator=generator))
    b = rfft3_centered(torch.randn(32, 32, 32, generator=generator))
    torch.testing.assert_close(fourier_shell_correlation(a, a), torch.ones(17, dtype=torch.float64))
    independent = fourier_shell_correlation(a, b)[2:]
    assert float(independent.abs().max()) < 0.3
    assert float(independent.mean().abs()) < 0.05


def test_fsc_of_signal_plus_noise_follows_the_snr() -> None:
    # two maps sharing a signal with SNR 1 per component: expected FSC = 1 / (1 + 1) = 0.5
    generator = torch.Generator().manual_seed(1)
    signal = torch.randn(48, 48, 48, generator=generator)
    a = rfft3_centered(signal + torch.randn(48, 48, 48, generator=generator))
    b = rfft3_centered(signal + torch.randn(48, 48, 48, generator=generator))
    fsc = fourier_shell_correlation(a, b)[5:]
    assert float(fsc.mean()) == pytest.approx(0.5, abs=0.03)


def test_resolution_crossing_is_interpolated() -> None:
    fsc = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.1, 0.0], dtype=torch.float64)
    # 0.143 is crossed between shells 3 (0.2) and 4 (0.1): at 3.57
    assert resolution_at_threshold(fsc, 10, 2.0, 0.143) == pytest.approx(20.0 / 3.57, rel=1e-3)
    assert resolution_at_threshold(fsc, 10, 2.0, 0.5) == pytest.approx(20.0 / 2.0)
    assert resolution_at_threshold(torch.ones(6, dtype=torch.float64), 10, 2.0) == pytest.approx(4.0)


def test_parseval_on_the_centred_rfft() -> None:
    image = torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    spectrum = rfft2_centered(image)
    weights = torch.full(spectrum.shape, 2.0, dtype=torch.float64)
    weights[:, 0] = 1  # kx = 0 and Nyquist columns appear once in the full transform
    weights[:, -1] = 1
    assert float((weights * squared_magnitude(spectrum)).sum() / 32**2) == pytest.approx(float((image**2).sum()))


def test_translation_moves_a_delta() -> None:
    image = torch.zeros(16, 16)
    image[8, 8] = 1
    frequencies = fft_frequencies_2d(16).reshape(-1, 2)
    moved = translate_2d_ft(rfft2_centered(image).reshape(1, -1), torch.tensor([[3.0, -2.0]]), frequencies, 16)
    result = irfft2_centered(moved.reshape(1, 16, 9), 16)[0]
    assert tuple((result == result.max()).nonzero()[0].tolist()) == (6, 11)  # (y, x) = (8 - 2, 8 + 3)


def test_coloured_noise_has_the_requested_spectrum() -> None:
    # the mean of |F|²/2 over each shell and many images is σ² of that shell (per image: two
    # particles, two spectra), nothing beyond the last shell; the images are real and stay
    # the same for the same white draw
    box, n_images = 24, 400
    generator = torch.Generator().manual_seed(5)
    white = torch.randn(n_images, box, box, generator=generator)
    n_shells = box // 2 + 1
    shape = torch.exp(-torch.arange(n_shells) / 4.0)
    sigma2 = torch.stack([shape * (3.0 if k % 2 else 1.0) for k in range(n_images)]).double()
    noise = coloured_noise_2d(white, sigma2)
    assert noise.shape == (n_images, box, box) and noise.dtype == white.dtype
    shells = shell_index_2d(box)
    power = rfft2_centered(noise).abs() ** 2 / 2
    for parity, factor in ((0, 1.0), (1, 3.0)):
        measured = radial_average(power[parity::2].mean(0), shells, n_shells)
        torch.testing.assert_close(measured[1:].double(), factor * shape[1:].double(), rtol=0.08, atol=0)
    assert power[:, shells > n_shells - 1].max() < 1e-6 * power.max()
    torch.testing.assert_close(coloured_noise_2d(white[:3], sigma2[:3]), noise[:3])


def test_radial_average_and_shell_power() -> None:
    shells = shell_index_2d(16)
    values = shells.double()
    torch.testing.assert_close(radial_average(values, shells, 9), torch.arange(9, dtype=torch.float64))
    delta = torch.zeros(16, 16, 16)
    delta[8, 8, 8] = 1
    torch.testing.assert_close(shell_power_3d(rfft3_centered(delta)), torch.ones(9))


def test_soft_spherical_mask_profile() -> None:
    mask = soft_spherical_mask(32, 8.0, 4.0)
    assert float(mask[16, 16, 16]) == 1.0
    assert float(mask[16, 16, 16 + 8]) == 1.0
    assert float(mask[16, 16, 16 + 10]) == pytest.approx(0.5)
    assert float(mask[16, 16, 16 + 12]) == pytest.approx(0.0, abs=1e-7)


def test_soft_disc_masks_follow_their_centres() -> None:
    # a disc centred at (x, y) is the centred disc moved x columns and y rows, where
    # translate_2d_ft moves a particle by the shift (x, y)
    centred = soft_spherical_mask(32, 7.0, 3.0, ndim=2)
    masks = soft_disc_masks(32, 7.0, 3.0, torch.tensor([[0.0, 0.0], [3.0, -2.0]]))
    torch.testing.assert_close(masks[0], centred)
    torch.testing.assert_close(masks[1], torch.roll(centred, shifts=(-2, 3), dims=(0, 1)))
    image = torch.zeros(32, 32)
    image[16, 16] = 1.0
    moved = translate_2d_ft(rfft2_centered(image[None]).reshape(1, -1), torch.tensor([[3.0, -2.0]]), fft_frequencies_2d(32).reshape(-1, 2).float(), 32)
    moved = irfft2_centered(moved.reshape(1, 32, 17), 32)[0]
    # a disc of one pixel at the shift holds the moved particle, and the centred one does not
    points = soft_disc_masks(32, 0.5, 0.0, torch.tensor([[3.0, -2.0], [0.0, 0.0]]))
    assert float((moved * points[0]).sum()) == pytest.approx(1.0, abs=1e-4)
    assert abs(float((moved * points[1]).sum())) < 1e-4


def test_soft_edge_mask_extends_and_softens() -> None:
    volume = torch.zeros(24, 24, 24)
    volume[10:14, 10:14, 10:14] = 1
    mask = soft_edge_mask(volume, 0.5, extend_px=2, edge_width_px=3)
    assert float(mask[12, 12, 12]) == 1.0
    assert float(mask[12, 12, 15]) == 1.0  # grown by 2 voxels
    # the edge falls with the Euclidean distance d beyond: 0.5 + 0.5 cos(π d / 3)
    assert float(mask[12, 12, 17]) == pytest.approx(0.25, abs=1e-6)
    assert float(mask[15, 15, 15]) == pytest.approx(0.5 + 0.5 * math.cos(math.pi * (math.sqrt(12) - 2) / 3), abs=1e-6)
    assert float(mask[12, 12, 21]) == 0.0 and float(mask.min()) == 0.0
    # shrunk: only the voxels farther than one voxel from outside the cube stay
    assert int(soft_edge_mask(volume, 0.5, extend_px=-1, edge_width_px=0).sum()) == 8


def test_distance_to_region_is_the_euclidean_distance() -> None:
    region = torch.rand(20, 21, 22, generator=torch.Generator().manual_seed(0)) > 0.995
    distance = distance_to_region(region, 6.0)
    points = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in region.shape], indexing="ij"), -1).reshape(-1, 3)
    exact = torch.cdist(points, region.nonzero().float()).min(1).values.reshape(region.shape)
    near = exact <= 6.0
    torch.testing.assert_close(distance[near], exact[near], atol=1e-5, rtol=0)
    assert bool((distance[~near] >= 6.0).all())


def test_lowpass_and_bfactor_filters() -> None:
    volume_ft = rfft3_centered(torch.randn(32, 32, 32, generator=torch.Generator().manual_seed(3)))
    radius = radius_grid_3d(32)
    filtered = lowpass_filter_3d(volume_ft, resolution_angstrom=16.0, pixel_size_angstrom=2.0, edge_width_shells=2)
    # cutoff at shell 32·2/16 = 4, edge from 3 to 5
    torch.testing.assert_close(filtered[radius <= 3], volume_ft[radius <= 3])
    assert float(filtered[radius >= 5].abs().max()) == 0.0
    sharpened = bfactor_filter_3d(volume_ft, -100.0, 2.0)
    s = 8.0 / 64.0
    index = (radius == 8).nonzero()[0]
    ratio = sharpened[tuple(index)] / volume_ft[tuple(index)]
    assert float(ratio.real) == pytest.approx(math.exp(100.0 / 4 * s**2), rel=1e-5)


def test_crop_or_pad_keeps_the_centre() -> None:
    volume = torch.zeros(9, 9, 9)
    volume[4, 4, 4] = 1
    padded = crop_or_pad(volume, 12)
    assert padded[6, 6, 6] == 1 and padded.sum() == 1
    assert crop_or_pad(padded, 9)[4, 4, 4] == 1


def gaussian_map(box_size: int, voxel_size_angstrom: float, centre_angstrom: tuple[float, float, float], sigma_angstrom: float) -> torch.Tensor:
    """``(N, N, N)`` float64 Gaussian sampled on a grid of ``voxel_size_angstrom`` whose
    centre voxel is ``N // 2``; ``centre_angstrom`` is (x, y, z)."""
    axis = (torch.arange(box_size, dtype=torch.float64) - box_size // 2) * voxel_size_angstrom
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    cx, cy, cz = centre_angstrom
    return torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma_angstrom**2))


def test_fourier_resampling_keeps_band_limited_values() -> None:
    coarse = gaussian_map(32, 4.0, (5.0, -3.0, 2.0), 12.0)
    fine = fourier_resample(coarse, 64)
    torch.testing.assert_close(fine, gaussian_map(64, 2.0, (5.0, -3.0, 2.0), 12.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(fourier_resample(fine, 32), coarse, atol=1e-4, rtol=0)
    # an odd box has no Nyquist planes to leave out
    torch.testing.assert_close(fourier_resample(gaussian_map(33, 4.0, (0.0, 0.0, 0.0), 12.0), 66), gaussian_map(66, 2.0, (0.0, 0.0, 0.0), 12.0), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="even box"):
        fourier_resample(coarse, 31)


@pytest.mark.parametrize(
    ("box_in", "voxel_in", "voxel_out", "box_out"),
    [(40, 5.0, 3.3, 64), (64, 3.0, 5.0, 40), (50, 4.0, 4.0, 64), (48, 6.0, 1.9, 128), (100, 1.06, 2.37, 48)],
)
def test_resample_to_grid_reaches_the_asked_voxel_and_box_size(box_in: int, voxel_in: float, voxel_out: float, box_out: int) -> None:
    # up- and down-sampling by ratios that no single pair of even boxes near the map's gives
    centre, sigma = (7.0, -4.0, 3.0), 12.0
    resampled, voxel = resample_to_grid(gaussian_map(box_in, voxel_in, centre, sigma), voxel_in, voxel_out, box_out)
    assert resampled.shape == (box_out,) * 3
    assert voxel == pytest.approx(voxel_out, rel=1e-3)
    torch.testing.assert_close(resampled, gaussian_map(box_out, voxel, centre, sigma), atol=1e-3, rtol=0)
