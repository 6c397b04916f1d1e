"""RELION's contrast transfer function, evaluated at arbitrary Fourier components.

``CTF(s) = -scale · exp(-B s²/4) · sin(π λ Δf(α) s² + π/2 Cs λ³ s⁴ - φ - atan(Q/√(1-Q²)))``
with ``Δf(α) = -(ΔfU+ΔfV)/2 - (ΔfU-ΔfV)/2 · cos(2(α - α_ast))``, ``s`` in Å⁻¹, ``λ`` the
relativistic electron wavelength in Å, Cs in Å. This is RELION's ``CTF::getCTF`` sign: the
CTF is positive at low frequency, so protein-white particles are ``CTF · projection``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["CtfParameters", "electron_wavelength_angstrom", "compute_ctf"]


@dataclass
class CtfParameters:
    """Per-particle CTF parameters as ``(B,)`` tensors (Å, degrees, kV, mm as named)."""

    defocus_u_angstrom: torch.Tensor
    defocus_v_angstrom: torch.Tensor
    defocus_angle_deg: torch.Tensor
    voltage_kv: torch.Tensor
    spherical_aberration_mm: torch.Tensor
    amplitude_contrast: torch.Tensor
    phase_shift_deg: torch.Tensor
    bfactor_angstrom2: torch.Tensor
    scale: torch.Tensor


def electron_wavelength_angstrom(voltage_kv: torch.Tensor) -> torch.Tensor:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    volts = voltage_kv * 1e3
    return 12.2643247 / torch.sqrt(volts * (1.0 + volts * 0.978466e-6))


def compute_ctf(
    params: CtfParameters, frequencies: torch.Tensor, box_size: int, pixel_size_angstrom: torch.Tensor | float
) -> torch.Tensor:
    """CTF of B particles at M Fourier components.

    Parameters
    ----------
    params
        ``(B,)`` parameters per particle.
    frequencies
        ``(M, 2)`` ``(kx, ky)`` in cycles per box.
    box_size
        Image size N in pixels.
    pixel_size_angstrom
        Scalar or ``(B,)`` pixel size in Å.

    Returns
    -------
    torch.Tensor
        ``(B, M)`` real CTF values.
    """
    dtype = torch.float64
    pixel = torch.as_tensor(pixel_size_angstrom, dtype=dtype, device=frequencies.device).reshape(-1, 1)
    s = frequencies.to(dtype)[None] / (box_size * pixel[..., None])  # (B or 1, M, 2) in 1/Å
    s2 = (s**2).sum(-1)  # (B, M)
    azimuth = torch.atan2(s[..., 1], s[..., 0])
    p = {name: value.to(dtype).reshape(-1, 1) for name, value in vars(params).items()}
    wavelength = electron_wavelength_angstrom(p["voltage_kv"])
    defocus_mean = -(p["defocus_u_angstrom"] + p["defocus_v_angstrom"]) / 2
    defocus_deviation = -(p["defocus_u_angstrom"] - p["defocus_v_angstrom"]) / 2
    defocus = defocus_mean + defocus_deviation * torch.cos(2 * (azimuth - torch.deg2rad(p["defocus_angle_deg"])))
    q = p["amplitude_contrast"]
    amplitude_phase = torch.atan(q / torch.sqrt(1 - q**2))
    cs_angstrom = p["spherical_aberration_mm"] * 1e7
    chi = (
        math.pi * wavelength * defocus * s2
        + math.pi / 2 * cs_angstrom * wavelength**3 * s2**2
        - torch.deg2rad(p["phase_shift_deg"])
        - amplitude_phase
    )
    ctf = -torch.sin(chi) * torch.exp(-p["bfactor_angstrom2"] / 4 * s2) * p["scale"]
    return ctf.to(frequencies.dtype)
