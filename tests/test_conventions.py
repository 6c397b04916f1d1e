"""Euler angles, shifts, FFT centring and CTF sign against RELION-written data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryotorch import conventions
from cryotorch.conventions import (
    euler_deg_to_matrix,
    irfft2_centered,
    irfft3_centered,
    matrix_to_euler_deg,
    padded_irfft3_centered,
    padded_rfft3_centered,
    rfft2_centered,
    rfft3_centered,
)
from cryotorch.data.particles import ctf_parameters
from cryotorch.io import ParticleImageReader, read_mrc, read_particles
from cryotorch.ops.ctf import compute_ctf
from cryotorch.ops.fourier import translate_2d_ft
from cryotorch.conventions import fft_frequencies_2d, image_shift_from_origin
from cryotorch.ops.projection import project_volumes
from cryotorch.ops.rotations import random_rotations

from conftest import DEVICES


def test_euler_matrix_matches_relion_formula_for_known_angles() -> None:
    # rot = 90: A = Rz(90) maps the reference x axis onto the image -y axis (passive rotation)
    a = euler_deg_to_matrix(torch.tensor([90.0, 0.0, 0.0], dtype=torch.float64))
    expected = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(a, expected, atol=1e-12, rtol=0)
    # tilt = 90 brings the reference z axis into the image plane along -x
    a = euler_deg_to_matrix(torch.tensor([0.0, 90.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(a @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)


def test_euler_round_trip_and_orthonormality() -> None:
    rotations = random_rotations(500, torch.Generator().manual_seed(1))
    euler = matrix_to_euler_deg(rotations)
    torch.testing.assert_close(euler_deg_to_matrix(euler), rotations, atol=1e-10, rtol=0)
    assert (euler[:, 1] >= 0).all() and (euler[:, 1] <= 180).all()
    eye = torch.eye(3, dtype=torch.float64).expand(500, 3, 3)
    torch.testing.assert_close(rotations @ rotations.transpose(1, 2), eye, atol=1e-12, rtol=0)
    degenerate = torch.tensor([[30.0, 0.0, 20.0], [0.0, 180.0, 45.0]], dtype=torch.float64)
    torch.testing.assert_close(euler_deg_to_matrix(matrix_to_euler_deg(euler_deg_to_matrix(degenerate))), euler_deg_to_matrix(degenerate), atol=1e-10, rtol=0)


@pytest.mark.parametrize("box", [32, 33])
def test_centred_fft_round_trip_and_centre(box: int) -> None:
    images = torch.randn(3, box, box, dtype=torch.float64)
    torch.testing.assert_close(irfft2_centered(rfft2_centered(images), box), images)
    volume = torch.randn(box, box, box, dtype=torch.float64)
    torch.testing.assert_close(irfft3_centered(rfft3_centered(volume), box), volume)
    # a delta at the centre has a flat, real spectrum
    delta = torch.zeros(box, box, box, dtype=torch.float64)
    delta[box // 2, box // 2, box // 2] = 1
    torch.testing.assert_close(rfft3_centered(delta), torch.ones(box, box, box // 2 + 1, dtype=torch.complex128))
    # the layout is NumPy's fftshift(rfftn(ifftshift(.))), for a batch and a transposed view too
    batch = torch.randn(2, box, box, box, dtype=torch.float64).transpose(-1, -2)
    reference = np.fft.fftshift(np.fft.rfftn(np.fft.ifftshift(batch.numpy(), axes=(1, 2, 3)), axes=(1, 2, 3)), axes=(1, 2))
    np.testing.assert_allclose(rfft3_centered(batch).numpy(), reference, rtol=0, atol=1e-10)
    inverse = np.fft.fftshift(np.fft.irfftn(np.fft.ifftshift(reference, axes=(1, 2)), s=(box,) * 3, axes=(1, 2, 3)), axes=(1, 2, 3))
    np.testing.assert_allclose(irfft3_centered(torch.from_numpy(reference), box).numpy(), inverse, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("box", "padded", "crop"), [(16, 32, 32), (16, 32, 14), (15, 31, 12), (16, 33, 21), (16, 16, 16)])
def test_padded_transforms_are_the_cropped_transforms_of_the_padded_grid(box: int, padded: int, crop: int, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the forward transform of a volume zero-padded to P, cropped to Q components, and the
    # central N voxels of the inverse of a grid that is zero beyond a Q crop, against the
    # whole P³ transforms; then again in slabs of a few lines
    generator = torch.Generator().manual_seed(box + padded + crop)
    volumes = torch.randn(2, box, box, box, dtype=torch.float64, generator=generator)
    whole = torch.zeros(2, padded, padded, padded, dtype=torch.float64)
    start = padded // 2 - box // 2
    window = slice(start, start + box)
    whole[:, window, window, window] = volumes
    first = padded // 2 - crop // 2
    crop_index = (slice(None), slice(first, first + crop), slice(first, first + crop), slice(0, crop // 2 + 1))
    spectrum = torch.view_as_complex(torch.randn(2, crop, crop, crop // 2 + 1, 2, dtype=torch.float64, generator=generator))
    grid = torch.zeros(2, padded, padded, padded // 2 + 1, dtype=torch.complex128)
    grid[crop_index] = spectrum
    forward = rfft3_centered(whole)[crop_index]
    inverse = irfft3_centered(grid, padded)[:, window, window, window]
    for slab_elements in (2**24, 64):
        monkeypatch.setattr(conventions, "_LINE_CHUNK_ELEMENTS", slab_elements)
        torch.testing.assert_close(padded_rfft3_centered(volumes.to(device), padded, crop).cpu(), forward, rtol=0, atol=1e-12)
        torch.testing.assert_close(padded_irfft3_centered(spectrum.to(device), padded, box).cpu(), inverse, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["centered", "shifted"])
def test_projections_reproduce_relion_project(shared_data, name: str) -> None:
    folder = shared_data / "maps" / "aspire_70S"
    volume = torch.as_tensor(np.array(read_mrc(folder / "clean70SRibosome_vol_65p.mrc").data))
    table = read_particles(folder / f"rln_proj_65_{name}.star")
    relion_images = torch.as_tensor(ParticleImageReader(table).read(np.arange(len(table))))
    rotations = euler_deg_to_matrix(torch.as_tensor(table.euler_deg)).float()
    projections = project_volumes(volume[None], rotations)[0].reshape(len(table), -1)
    box = volume.shape[-1]
    origin_px = torch.as_tensor(table.origin_angstrom / table.pixel_size_angstrom[:, None], dtype=torch.float32)
    images = translate_2d_ft(projections, image_shift_from_origin(origin_px), fft_frequencies_2d(box).reshape(-1, 2), box)
    images = irfft2_centered(images.reshape(len(table), box, box // 2 + 1), box)
    for ours, theirs in zip(images, relion_images):
        correlation = np.corrcoef(ours.flatten(), theirs.flatten())[0, 1]
        assert correlation >= 0.99
        assert float(ours.std() / theirs.std()) == pytest.approx(1.0, rel=0.02)
    if name == "shifted":
        # the opposite shift sign must fail: the test can tell the conventions apart
        wrong = translate_2d_ft(projections, origin_px, fft_frequencies_2d(box).reshape(-1, 2), box)
        wrong = irfft2_centered(wrong.reshape(len(table), box, box // 2 + 1), box)
        assert np.corrcoef(wrong[0].flatten(), relion_images[0].flatten())[0, 1] < 0.5


def test_trpv1_particles_match_ctf_projections_at_their_poses(shared_data) -> None:
    folder = shared_data / "real_particles" / "trpv1_cryojax"
    volume = torch.as_tensor(np.array(read_mrc(folder / "trpv1_volume.mrc").data))
    table = read_particles(folder / "trpv1_small_stack.star")
    images = torch.as_tensor(ParticleImageReader(table).read(np.arange(len(table))))
    box = volume.shape[-1]
    rows = np.arange(len(table))
    frequencies = fft_frequencies_2d(box).reshape(-1, 2)
    ctf = compute_ctf(ctf_parameters(table, rows), frequencies, box, float(table.pixel_size_angstrom[0]))
    origin_px = torch.as_tensor(table.origin_angstrom / table.pixel_size_angstrom[:, None], dtype=torch.float32)

    def mean_correlation(euler: torch.Tensor) -> float:
        projections = project_volumes(volume[None], euler_deg_to_matrix(euler).float())[0].reshape(len(table), -1)
        model = translate_2d_ft(projections * ctf, image_shift_from_origin(origin_px), frequencies, box)
        model = irfft2_centered(model.reshape(len(table), box, box // 2 + 1), box)
        return float(np.mean([np.corrcoef(m.flatten(), x.flatten())[0, 1] for m, x in zip(model, images)]))

    at_poses = mean_correlation(torch.as_tensor(table.euler_deg))
    random_poses = [mean_correlation(matrix_to_euler_deg(random_rotations(len(table), torch.Generator().manual_seed(s)))) for s in range(3)]
    assert at_poses > 0.18
    assert at_poses > max(random_poses) + 0.08
