"""RELION's CTF formula against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch_ctf

from cryotorch.conventions import fft_frequencies_2d
from cryotorch.ops.ctf import CtfParameters, compute_ctf, electron_wavelength_angstrom


def params(**overrides: float) -> CtfParameters:
    values = dict(
        defocus_u_angstrom=15000.0, defocus_v_angstrom=15000.0, defocus_angle_deg=0.0, voltage_kv=300.0,
        spherical_aberration_mm=2.7, amplitude_contrast=0.1, phase_shift_deg=0.0, bfactor_angstrom2=0.0, scale=1.0,
    )
    values.update(overrides)
    return CtfParameters(**{k: torch.tensor([v], dtype=torch.float64) for k, v in values.items()})


def test_wavelength_at_300_kv() -> None:
    assert float(electron_wavelength_angstrom(torch.tensor(300.0))) == pytest.approx(0.019687, abs=2e-6)


def test_hand_computed_value_and_sign() -> None:
    box, pixel = 64, 2.0
    frequencies = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    ctf = compute_ctf(params(), frequencies, box, pixel)[0]
    q = 0.1
    assert float(ctf[0]) == pytest.approx(q, abs=1e-6)  # sin(atan(Q/sqrt(1-Q²))) = Q: positive at DC
    s = 10.0 / (box * pixel)
    wavelength = 0.0196875
    chi = math.pi * wavelength * (-15000.0) * s**2 + math.pi / 2 * 2.7e7 * wavelength**3 * s**4 - math.atan(q / math.sqrt(1 - q * q))
    assert float(ctf[1]) == pytest.approx(-math.sin(chi), abs=1e-4)


def test_astigmatism_angle_is_measured_from_x() -> None:
    box, pixel = 64, 2.0
    along_x = torch.tensor([[12.0, 0.0]])
    astigmatic = compute_ctf(params(defocus_u_angstrom=20000.0, defocus_v_angstrom=10000.0, defocus_angle_deg=0.0), along_x, box, pixel)
    round_u = compute_ctf(params(defocus_u_angstrom=20000.0, defocus_v_angstrom=20000.0), along_x, box, pixel)
    torch.testing.assert_close(astigmatic, round_u)


@pytest.mark.parametrize("angle", [0.0, 30.0, 100.0])
def test_matches_torch_ctf(angle: float) -> None:
    box, pixel = 64, 1.5
    p = params(defocus_u_angstrom=18000.0, defocus_v_angstrom=16000.0, defocus_angle_deg=angle, phase_shift_deg=20.0)
    ours = compute_ctf(p, fft_frequencies_2d(box).reshape(-1, 2), box, pixel).reshape(box, box // 2 + 1)
    reference = torch_ctf.calculate_ctf_2d(
        defocus=1.7, astigmatism=0.1, astigmatism_angle=angle, voltage=300.0, spherical_aberration=2.7,
        amplitude_contrast=0.1, phase_shift=20.0, pixel_size=pixel, image_shape=(box, box), rfft=True, fftshift=True,
    )
    reference = reference.reshape(box, box // 2 + 1)
    # torch-ctf's fftshift puts DC at index N // 2 along y, as the centred rfft does
    torch.testing.assert_close(ours.double(), reference.double(), atol=2e-3, rtol=0)  # torch-ctf computes in float32


def test_bfactor_and_scale() -> None:
    frequencies = torch.tensor([[8.0, 0.0]])
    plain = compute_ctf(params(), frequencies, 64, 2.0)
    damped = compute_ctf(params(bfactor_angstrom2=100.0, scale=0.5), frequencies, 64, 2.0)
    s2 = (8.0 / 128.0) ** 2
    torch.testing.assert_close(damped, plain * 0.5 * math.exp(-100.0 / 4 * s2))
