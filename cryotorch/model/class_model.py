"""The state of a 3D classification: K class volumes, noise spectra, scales and priors."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ClassModel"]


class ClassModel(nn.Module):
    """K class volumes with their noise model and priors, all as buffers (checkpointable).

    Buffers
    -------
    volumes
        ``(K, N, N, N)`` float32 real-space class maps.
    inverse_denominator
        ``(K, Q, Q, Q // 2 + 1)`` float32 ``1/(weight + 1/τ²)`` of the last reconstruction on
        the centred crop of the ``(P, P, P // 2 + 1)`` padded Fourier grid that its sums
        reached (Q = 0 before the first): a particle's own share of its class map, which the
        E-step uses to discount the particle's fit to the map it helped to make.
    inserted_sigma2
        ``(G, N // 2 + 1)`` float64 noise variances the last reconstruction's sums were weighted
        with (the E-step's ``sigma2_noise``, before the M-step updated it).
    inserted_radius
        ``()`` float64 Fourier radius (shells) of the components the last reconstruction's sums
        hold; 0 before the first.
    class_weights
        ``(K,)`` float64 prior class probabilities (RELION's rlnClassDistribution).
    sigma2_noise
        ``(G, N // 2 + 1)`` float64 noise variance per optics group and Fourier shell, in units
        of |image DFT|² per real and imaginary part, as RELION's rlnSigma2Noise is per part;
        RELION's forward transform is divided by the N² pixels, so its values are N⁴ times
        smaller (model STAR files carry these, unconverted: docs/conventions.md).
    group_scale
        ``(G,)`` float64 intensity scale per optics group (rlnGroupScaleCorrection).
    tau2
        ``(K, N // 2 + 1)`` float64 signal-power prior per class and shell (½ mean |V|²).
    ssnr
        ``(K, N // 2 + 1)`` float64 spectral SNR of each class reconstruction.
    offset_sigma_angstrom
        ``()`` float64 width of the Gaussian prior on origins.
    """

    volumes: torch.Tensor
    inverse_denominator: torch.Tensor
    inserted_sigma2: torch.Tensor
    inserted_radius: torch.Tensor
    class_weights: torch.Tensor
    sigma2_noise: torch.Tensor
    group_scale: torch.Tensor
    tau2: torch.Tensor
    ssnr: torch.Tensor
    offset_sigma_angstrom: torch.Tensor

    def __init__(self, n_classes: int, box_size: int, padded_size: int, n_groups: int, pixel_size_angstrom: float) -> None:
        super().__init__()
        n_shells = box_size // 2 + 1
        self.box_size = box_size
        self.padded_size = padded_size
        self.pixel_size_angstrom = pixel_size_angstrom
        self.register_buffer("volumes", torch.zeros(n_classes, box_size, box_size, box_size))
        self.register_buffer("inverse_denominator", torch.zeros(n_classes, 0, 0, 1))
        self.register_buffer("inserted_sigma2", torch.ones(n_groups, n_shells, dtype=torch.float64))
        self.register_buffer("inserted_radius", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("class_weights", torch.full((n_classes,), 1.0 / n_classes, dtype=torch.float64))
        self.register_buffer("sigma2_noise", torch.ones(n_groups, n_shells, dtype=torch.float64))
        self.register_buffer("group_scale", torch.ones(n_groups, dtype=torch.float64))
        self.register_buffer("tau2", torch.ones(n_classes, n_shells, dtype=torch.float64))
        self.register_buffer("ssnr", torch.zeros(n_classes, n_shells, dtype=torch.float64))
        self.register_buffer("offset_sigma_angstrom", torch.tensor(10.0, dtype=torch.float64))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        # the crop of the last reconstruction's grid: its size is the checkpoint's
        crop = state_dict.get(prefix + "inverse_denominator")
        if isinstance(crop, torch.Tensor) and crop.dim() == 4 and crop.shape[0] == self.n_classes and crop.shape[1] <= self.padded_size:
            self.inverse_denominator = torch.zeros_like(crop, device=self.volumes.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    @property
    def n_classes(self) -> int:
        """Number of classes K."""
        return self.volumes.shape[0]

    def resolution_shells(self) -> torch.Tensor:
        """``(K,)`` int64 last shell (from 1) where each class's SSNR is still ≥ 1 (RELION's rule)."""
        below = self.ssnr[:, 1:] < 1.0
        first_below = torch.where(below.any(dim=1), below.float().argmax(dim=1), torch.full_like(below[:, 0], below.shape[1], dtype=torch.long))
        return first_below.clamp(min=1)

    def resolution_angstrom(self) -> torch.Tensor:
        """``(K,)`` estimated resolution of each class in Å."""
        return self.box_size * self.pixel_size_angstrom / self.resolution_shells().double()
