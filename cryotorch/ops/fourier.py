"""Fourier-space helpers on the centred-rfft layout of :mod:`cryotorch.conventions`."""

from __future__ import annotations

import functools

import torch

from cryotorch.conventions import fft_frequencies_2d, irfft2_centered, irfft3_centered, rfft2_centered, rfft3_centered

__all__ = [
    "squared_magnitude",
    "frequency_grid_3d",
    "radius_grid_2d",
    "radius_grid_3d",
    "cached_radius_and_shell_3d",
    "shell_index_2d",
    "shell_index_3d",
    "translate_2d_ft",
    "coloured_noise_2d",
    "radial_average",
    "shell_power_3d",
    "shells_to_padded_grid",
    "fourier_resample",
]


def squared_magnitude(values: torch.Tensor) -> torch.Tensor:
    """``|z|²`` of complex ``values`` (any shape), as ``Re(z)² + Im(z)²``: without the square
    root that ``abs()`` takes, about three times faster on a CPU than ``abs() ** 2``."""
    return values.real.square().add_(values.imag.square())


def frequency_grid_3d(box_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``(N, N, N // 2 + 1, 3)`` integer ``(kx, ky, kz)`` of the centred rfft of an N³ volume."""
    k_full = torch.arange(box_size, device=device, dtype=torch.float32) - box_size // 2
    k_half = torch.arange(box_size // 2 + 1, device=device, dtype=torch.float32)
    kz, ky, kx = torch.meshgrid(k_full, k_full, k_half, indexing="ij")
    return torch.stack([kx, ky, kz], dim=-1)


def radius_grid_2d(box_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``(N, N // 2 + 1)`` frequency radius in cycles per box."""
    return fft_frequencies_2d(box_size, device).norm(dim=-1)


@functools.lru_cache(maxsize=4)
def _radius_and_shell_3d(box_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The grids of :func:`radius_grid_3d` and :func:`shell_index_3d`, computed once per size
    and device (each M-step asks for them several times per class). An iteration asks for two
    or three sizes (the box, the crop of the padded grid); the crop grows with the resolution,
    and the grids of a 512-px padded grid take 1.6 GB, so only the last four sizes are kept."""
    radius = frequency_grid_3d(box_size, device).norm(dim=-1)
    return radius, torch.round(radius).long()


def cached_radius_and_shell_3d(box_size: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The grids of :func:`radius_grid_3d` and :func:`shell_index_3d` themselves, shared by
    every caller: read them, never write them (no copy of a padded grid's size is made)."""
    return _radius_and_shell_3d(box_size, torch.device(device or "cpu"))


def radius_grid_3d(box_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``(N, N, N // 2 + 1)`` frequency radius in cycles per box (a copy the caller owns)."""
    return _radius_and_shell_3d(box_size, torch.device(device or "cpu"))[0].clone()


def shell_index_2d(box_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``(N, N // 2 + 1)`` int64 Fourier shell (rounded radius) of each rfft component."""
    return torch.round(radius_grid_2d(box_size, device)).long()


def shell_index_3d(box_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``(N, N, N // 2 + 1)`` int64 Fourier shell (rounded radius) of each rfft component (a
    copy the caller owns)."""
    return _radius_and_shell_3d(box_size, torch.device(device or "cpu"))[1].clone()


def translate_2d_ft(spectrum: torch.Tensor, shifts_px: torch.Tensor, frequencies: torch.Tensor, box_size: int) -> torch.Tensor:
    """Translate images given by Fourier components: ``out(x) = in(x - shift)``.

    Parameters
    ----------
    spectrum
        ``(..., M)`` complex Fourier components at ``frequencies``.
    shifts_px
        ``(..., 2)`` translations ``(x, y)`` in pixels, broadcast against the leading dims.
    frequencies
        ``(M, 2)`` ``(kx, ky)`` in cycles per box.
    box_size
        Image size N in pixels.
    """
    phase = -2.0 * torch.pi / box_size * (shifts_px.to(frequencies.dtype) @ frequencies.T)  # (..., M)
    return spectrum * torch.polar(torch.ones_like(phase), phase)


def coloured_noise_2d(white: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """Real noise images with a given spectrum, from white ones.

    Parameters
    ----------
    white
        ``(B, N, N)`` images of independent unit Gaussian pixels.
    sigma2
        ``(B, S)`` variance of the real and of the imaginary part of each centred rfft
        component (:func:`~cryotorch.conventions.rfft2_centered`, unnormalised) per Fourier
        shell; components in shells ``S`` and beyond get none.

    Returns
    -------
    torch.Tensor
        ``(B, N, N)`` images whose components in shell ``s`` have ``E|F|² = 2 σ²(s)``.
    """
    box = white.shape[-1]
    shells = shell_index_2d(box, white.device)
    padded = torch.nn.functional.pad(sigma2.to(white.dtype), (0, 1))  # one zero shell for the rest
    # a white image of unit variance holds E|F|² = N² in every component
    gain = (2 * padded[:, shells.clamp(max=sigma2.shape[-1])] / box**2).sqrt()
    return irfft2_centered(rfft2_centered(white) * gain, box)


def radial_average(values: torch.Tensor, shell_index: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Mean of ``values`` over each Fourier shell.

    Parameters
    ----------
    values
        ``(..., *S)`` real values on a grid of shape ``S``.
    shell_index
        ``S`` int64 shell of each grid point; points at or beyond ``n_shells`` are ignored.
    n_shells
        Number of shells returned.

    Returns
    -------
    torch.Tensor
        ``(..., n_shells)`` shell means (0 for empty shells).
    """
    # the points beyond go to one more shell, dropped at the end: no boolean gather (half the
    # time), and each shell adds the same values in the same order as without them
    flat_shell = shell_index.reshape(-1).clamp(max=n_shells)
    flat_values = values.reshape(*values.shape[: values.dim() - shell_index.dim()], -1)
    sums = torch.zeros(*flat_values.shape[:-1], n_shells + 1, dtype=flat_values.dtype, device=values.device)
    sums.index_add_(-1, flat_shell, flat_values)
    counts = torch.bincount(flat_shell, minlength=n_shells + 1)[:n_shells].to(flat_values.dtype)
    return sums[..., :n_shells] / counts.clamp(min=1)


def shell_power_3d(volume_ft: torch.Tensor, n_shells: int | None = None) -> torch.Tensor:
    """Rotationally averaged power ``|F|²`` of a centred-rfft volume, ``(..., n_shells)``.

    The rfft holds each Hermitian pair once except on the ``kx = 0`` plane; averaging per shell
    over the stored half is unbiased because both halves of a shell have the same expectation.
    """
    box_size = volume_ft.shape[-3]
    n_shells = n_shells or box_size // 2 + 1
    return radial_average(squared_magnitude(volume_ft), shell_index_3d(box_size, volume_ft.device), n_shells)


def shells_to_padded_grid(values: torch.Tensor, n_padded_shells: int, box_size: int, padded_size: int) -> torch.Tensor:
    """Per-shell values of an N box, linearly interpolated onto the shells of a padded grid.

    Padded shell ``r`` is unpadded shell ``r · N / P``; beyond the last unpadded shell the last
    value is kept.

    Parameters
    ----------
    values
        ``(n_shells,)`` values per unpadded shell.
    n_padded_shells
        Number of padded-grid shells wanted.

    Returns
    -------
    torch.Tensor
        ``(n_padded_shells,)`` interpolated values.
    """
    position = (torch.arange(n_padded_shells, dtype=torch.float64, device=values.device) * box_size / padded_size).clamp(max=values.shape[0] - 1)
    lower = position.floor().long()
    upper = (lower + 1).clamp(max=values.shape[0] - 1)
    fraction = position - lower
    return values[lower] * (1 - fraction) + values[upper] * fraction


def fourier_resample(values: torch.Tensor, box_size: int, ndim: int = 3) -> torch.Tensor:
    """``(..., N, N[, N])`` images (``ndim`` 2) or volumes (3) resampled to ``n = box_size``
    (even) pixels a side in Fourier space, their values kept (a band-limited image on another
    grid of the same extent): the pixel size becomes ``N/n`` times larger.

    A smaller box keeps the components below its Nyquist frequency; a larger one pads with
    zeros, leaving out the Nyquist lines or planes of an even N, whose components stand for
    both ``±N/2`` and have no single place on the finer grid.
    """
    if ndim not in (2, 3):
        raise ValueError(f"Fourier resampling is for images (ndim=2) or volumes (3), got ndim={ndim}")
    forward, inverse = (rfft2_centered, irfft2_centered) if ndim == 2 else (rfft3_centered, irfft3_centered)
    n_in = values.shape[-1]
    if box_size % 2 or box_size < 2:
        raise ValueError(f"Fourier resampling needs an even box, got {n_in} → {box_size}")
    if box_size == n_in:
        return values
    spectrum = forward(values)
    if box_size < n_in:
        start = n_in // 2 - box_size // 2
        resampled = spectrum[(..., *[slice(start, start + box_size)] * (ndim - 1), slice(0, box_size // 2 + 1))]
    else:
        nyquist = 1 - n_in % 2
        start = box_size // 2 - n_in // 2
        columns = slice(0, n_in // 2 + 1 - nyquist)
        resampled = spectrum.new_zeros(*spectrum.shape[:-ndim], *[box_size] * (ndim - 1), box_size // 2 + 1)
        resampled[(..., *[slice(start + nyquist, start + n_in)] * (ndim - 1), columns)] = spectrum[(..., *[slice(nyquist, None)] * (ndim - 1), columns)]
    return inverse(resampled, box_size) * (box_size / n_in) ** ndim
