"""Fourier shell correlation and resolution at a threshold (0.143 gold standard, 0.5)."""

from __future__ import annotations

import torch

from cryotorch.ops.fourier import radial_average, shell_index_3d

__all__ = ["fourier_shell_correlation", "resolution_at_threshold"]


def fourier_shell_correlation(volume_a_ft: torch.Tensor, volume_b_ft: torch.Tensor) -> torch.Tensor:
    """FSC of two centred-rfft volumes, ``(N // 2 + 1,)`` shells from DC to Nyquist.

    ``FSC(r) = Re Σ A B* / sqrt(Σ|A|² Σ|B|²)`` over the components of shell r.
    """
    box_size = volume_a_ft.shape[-3]
    n_shells = box_size // 2 + 1
    shells = shell_index_3d(box_size, volume_a_ft.device)
    cross = radial_average((volume_a_ft * volume_b_ft.conj()).real.double(), shells, n_shells)
    power_a = radial_average(volume_a_ft.abs().double() ** 2, shells, n_shells)
    power_b = radial_average(volume_b_ft.abs().double() ** 2, shells, n_shells)
    denominator = torch.sqrt(power_a * power_b)
    return torch.where(denominator > 0, cross / denominator.clamp(min=1e-300), torch.zeros_like(cross))


def resolution_at_threshold(fsc: torch.Tensor, box_size: int, pixel_size_angstrom: float, threshold: float = 0.143) -> float:
    """Resolution in Å where the FSC first falls below ``threshold`` (linear between shells).

    Returns the Nyquist resolution when the curve never crosses, as RELION does.
    """
    below = (fsc[1:] < threshold).nonzero()
    if below.numel() == 0:
        return 2.0 * pixel_size_angstrom
    shell = int(below[0]) + 1
    upper, lower = float(fsc[shell - 1]), float(fsc[shell])
    crossing = shell - 1 + (upper - threshold) / (upper - lower) if upper != lower else float(shell)
    return box_size * pixel_size_angstrom / max(crossing, 1e-6)
