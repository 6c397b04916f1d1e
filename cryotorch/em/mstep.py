"""M-step: sufficient statistics (all-reduced across processes) and the regularised update.

The class volumes are MAP reconstructions ``V = Σ w·L / (Σ w·2Q + 1/(p³·T·τ²))`` on the
padded grid (``p`` the padding factor, ``T`` RELION's tau2_fudge, τ² = ½·shell mean |V|² of
the current reference as the projector holds it, :func:`map_signal_power`; ``p³`` because a
padded voxel collects ``p³`` times less weight). The noise spectra, group scales, class
weights and origin prior follow from the maximum-posterior samples, as RELION's sums over
significant samples do to first order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cryotorch.conventions import irfft3_centered, rfft3_centered
from cryotorch.em.estep import EStepResult, PreparedBatch, WeightedSlices
from cryotorch.em.sums import TensorSums
from cryotorch.model.class_model import ClassModel
from cryotorch.ops.backprojection import insert_slices, reconstruct_from_sums, symmetrize_hermitian_plane
from cryotorch.ops.fourier import cached_radius_and_shell_3d, frequency_grid_3d, radial_average, shell_power_3d, shells_to_padded_grid, squared_magnitude
from cryotorch.ops.fsc import fourier_shell_correlation
from cryotorch.ops.projection import gridding_kernel_3d, padded_box_size

__all__ = ["TAU2_ESTIMATES", "SufficientStatistics", "HalfSetMaps", "maximization", "reconstruct_class", "map_signal_power", "expected_signal_power", "padded_shell_of_unpadded", "rigid_motion_basis", "remove_rigid_differences", "update_noise_and_weights", "fsc_regularisation", "half_map_fsc", "half_set_signal_power", "half_set_reconstruction"]

#: ways to update the prior's signal power τ² (see :func:`maximization`)
TAU2_ESTIMATES = ("map", "posterior", "fsc")


@dataclass
class SufficientStatistics(TensorSums):
    """Sums over particles that the M-step needs; every field is summed across ranks.

    Attributes
    ----------
    data, weight
        ``(K, Q, Q, Q // 2 + 1)`` back-projected ``Σ w·L`` and ``Σ w·2Q``: the whole padded
        grid (``Q = P``) or its centred crop that an iteration's slices reach
        (:func:`~cryotorch.ops.backprojection.crop_size`), zero beyond.
    class_sum
        ``(K,)`` Σ_i p(k | X_i).
    noise_power, noise_count
        ``(G, n_shells)`` Σ |X − s·CTF·P|² over best samples (per real/imaginary part ×2) and
        the number of components summed.
    scale_cross, scale_power
        ``(G,)`` Σ Re(X̄·CTF·P) and Σ CTF²|P|² at the best samples.
    offset_power, n_particles
        Σ |origin|² in Å² and the number of particles seen.
    """

    data: torch.Tensor
    weight: torch.Tensor
    class_sum: torch.Tensor
    noise_power: torch.Tensor
    noise_count: torch.Tensor
    scale_cross: torch.Tensor
    scale_power: torch.Tensor
    offset_power: torch.Tensor
    n_particles: torch.Tensor

    @classmethod
    def zeros(cls, n_classes: int, grid_size: int, n_groups: int, n_shells: int, device: torch.device) -> "SufficientStatistics":
        """Empty sums, on grids of ``grid_size`` (the padded size, or a crop's)."""
        grid = (n_classes, grid_size, grid_size, grid_size // 2 + 1)
        float64 = dict(dtype=torch.float64, device=device)
        return cls(
            data=torch.zeros(grid, dtype=torch.complex64, device=device),
            weight=torch.zeros(grid, dtype=torch.float32, device=device),
            class_sum=torch.zeros(n_classes, **float64),
            noise_power=torch.zeros(n_groups, n_shells, **float64),
            noise_count=torch.zeros(n_groups, n_shells, **float64),
            scale_cross=torch.zeros(n_groups, **float64),
            scale_power=torch.zeros(n_groups, **float64),
            offset_power=torch.zeros((), **float64),
            n_particles=torch.zeros((), **float64),
        )

    def insert(self, slices: list[WeightedSlices], frequencies: torch.Tensor, box_size: int, memory_budget_bytes: float, padded_size: int | None = None) -> None:
        """Back-project posterior-weighted slices into their classes' sums (grids that crop
        a ``padded_size`` grid: see :func:`~cryotorch.ops.backprojection.insert_slices`)."""
        for item in slices:
            insert_slices(
                self.data[item.class_index], self.weight[item.class_index], item.data, item.weight,
                item.rotations, frequencies, box_size, memory_budget_bytes, padded_size,
            )

    def accumulate(
        self,
        result: EStepResult,
        batch: PreparedBatch,
        groups: torch.Tensor,
        shells: torch.Tensor,
        frequencies: torch.Tensor,
        box_size: int,
        pixel_size_angstrom: float,
        memory_budget_bytes: float,
        padded_size: int | None = None,
    ) -> torch.Tensor:
        """Add one batch's E-step outcome.

        Parameters
        ----------
        groups
            ``(B,)`` 0-based optics group of each particle.
        shells
            ``(M,)`` shell index of each Fourier component used.
        padded_size
            Size of the padded grid that the sums crop (None: theirs).

        Returns
        -------
        torch.Tensor
            ``(B,)`` float64 each particle's residual power at its best sample over the power
            its noise spectrum expects, ``mean |X − s·CTF·P|² / (2σ²)`` over its components: 1
            for an image on its optics group's noise level. Its square root, times the
            particle's last normalisation, is RELION's normalisation correction (``--norm``)
            relative to the mean.
        """
        self.insert(result.slices, frequencies, box_size, memory_budget_bytes, padded_size)
        self.class_sum += result.class_posterior.double().sum(0)
        # noise and scale at the best sample: the best origin relative to the prior one
        offsets = result.best_origin_px - batch.prior_origin_px
        ramps = torch.polar(torch.ones_like(offsets[:, :1]), -2.0 * torch.pi / box_size * (offsets @ frequencies.T))
        centred = batch.spectra * ramps
        model = batch.ctf * result.best_projections
        residual = (centred - batch.scale[:, None] * model).abs().double() ** 2
        n_shells = self.noise_power.shape[1]
        flat = groups[:, None] * n_shells + shells[None, :]
        self.noise_power.view(-1).index_add_(0, flat.reshape(-1), residual.reshape(-1))
        self.noise_count.view(-1).index_add_(0, flat.reshape(-1), torch.ones_like(residual).reshape(-1))
        self.scale_cross.index_add_(0, groups, (centred.conj() * model).real.double().sum(-1))
        self.scale_power.index_add_(0, groups, (model.abs().double() ** 2).sum(-1))
        self.offset_power += (result.best_origin_px.double() ** 2).sum() * pixel_size_angstrom**2
        self.n_particles += result.best_class.shape[0]
        return (residual * batch.inv_sigma2.double()).mean(-1) / 2


def reconstruct_class(
    data: torch.Tensor, weight: torch.Tensor, tau2: torch.Tensor, box_size: int, tau2_fudge: float, padded_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAP reconstruction of one class from its back-projected sums.

    Parameters
    ----------
    data, weight
        ``(Q, Q, Q // 2 + 1)`` ``Σ w·L`` and ``Σ w·2Q`` on the padded grid (``Q = P``) or on
        its centred crop (:func:`~cryotorch.ops.backprojection.crop_size`: zero beyond, every
        shell that holds data whole).
    tau2
        ``(N // 2 + 1,)`` signal power per unpadded shell (the prior).
    tau2_fudge
        Regularisation parameter T.
    padded_size
        Size P of the padded grid (None: ``Q``).

    Returns
    -------
    volume
        ``(N, N, N)`` real-space map (before masking).
    ssnr
        ``(N // 2 + 1,)`` spectral signal-to-noise ratio per unpadded shell.
    inverse_denominator
        ``(Q, Q, Q // 2 + 1)`` ``1/(weight + 1/(p³·T·τ²))``.
    """
    size = data.shape[0]
    padded = size if padded_size is None else padded_size
    padded_shells = cached_radius_and_shell_3d(size, data.device)[1]
    p3 = (padded / box_size) ** 3
    data = symmetrize_hermitian_plane(data, conjugate=True)
    weight = symmetrize_hermitian_plane(weight, conjugate=False)
    # τ² per padded shell from the current reference's power (unpadded shell = padded / p)
    tau2_padded = shells_to_padded_grid(tau2, padded // 2 + 1, box_size, padded)
    regularisation = 1.0 / (p3 * tau2_fudge * tau2_padded.clamp(min=1e-30))
    regularisation[0] = 0.0
    volume = reconstruct_from_sums(data, weight, box_size, regularisation.float(), padded)
    mean_weight = radial_average(weight.double(), padded_shells, padded // 2 + 1)
    ssnr = (p3 * tau2_fudge * tau2_padded * mean_weight)[padded_shell_of_unpadded(box_size, padded, data.device)]
    inverse_denominator = 1.0 / (weight + regularisation.float()[padded_shells.clamp(max=padded // 2)]).clamp(min=1e-30)
    return volume, ssnr, inverse_denominator


def maximization(
    model: ClassModel,
    stats: SufficientStatistics,
    tau2_fudge: float,
    max_shell: int,
    mask: torch.Tensor,
    common_frame: bool = False,
    symmetry_matrices: torch.Tensor | None = None,
    tau2_estimate: str = "map",
    second_half: SufficientStatistics | None = None,
    padded_size: int | None = None,
) -> list[int]:
    """Update ``model`` in place from the summed statistics; returns the empty classes.

    Parameters
    ----------
    max_shell
        Shells up to this radius were measured this iteration (noise spectra beyond keep
        their previous values).
    mask
        ``(N, N, N)`` reference mask applied to each new class map (solvent flattening).
    common_frame
        Remove from the new maps their small rigid turns and shifts against each other
        (:func:`remove_rigid_differences`).
    symmetry_matrices
        ``(G, 3, 3)`` point group of the maps: the common frame then moves them only in ways
        the group leaves unchanged.
    tau2_estimate
        How the prior's signal power τ² is updated: ``"map"``, half the power of the new
        solvent-masked map in every shell (RELION's Class3D); ``"posterior"``, its expected
        value given the data (:func:`expected_signal_power`) in the measured shells (beyond,
        τ² keeps its value); ``"fsc"``, from the FSC of the class's two half sets
        (:func:`half_set_signal_power`, RELION's Refine3D update), before the map is made.
    second_half
        With ``"fsc"``: the sums of the particles of half set 2 (``stats`` holds all).
    padded_size
        Size P of the padded grid whose centred crop the sums hold (None: the sums' own);
        ``model.inverse_denominator`` becomes the same crop.
    """
    box = model.box_size
    padded = stats.data.shape[1] if padded_size is None else padded_size
    inverse_denominators = torch.zeros_like(stats.weight)
    empty = []
    # what the sums were made with, for the self-fit discount of the next E-step
    model.inserted_sigma2.copy_(model.sigma2_noise)
    model.inserted_radius.fill_(max_shell)
    for k in range(model.n_classes):
        if float(stats.weight[k].sum()) <= 0:
            empty.append(k)
            continue
        if tau2_estimate == "fsc":
            if second_half is None:
                raise ValueError("tau2_estimate='fsc' needs the sums of half set 2 (second_half)")
            data = torch.stack([stats.data[k] - second_half.data[k], second_half.data[k]])
            weight = torch.stack([stats.weight[k] - second_half.weight[k], second_half.weight[k]])
            model.tau2[k] = half_set_signal_power(data, weight, box, mask, padded)[0]
        volume, model.ssnr[k], inverse_denominators[k] = reconstruct_class(stats.data[k], stats.weight[k], model.tau2[k], box, tau2_fudge, padded)
        model.volumes[k] = volume * mask
        if tau2_estimate == "posterior":
            measured = expected_signal_power(stats.data[k], stats.weight[k], model.tau2[k], box, padded)
            model.tau2[k, : max_shell + 1] = measured[: max_shell + 1]
    model.inverse_denominator = inverse_denominators
    update_noise_and_weights(model, stats, max_shell)
    if common_frame and model.n_classes > 1:
        model.volumes.copy_(remove_rigid_differences(model.volumes, model.class_weights, mask, symmetry_matrices))
    if tau2_estimate == "map":
        for k in range(model.n_classes):
            if k not in empty:
                model.tau2[k] = map_signal_power(model.volumes[k][None], padded / box)[0]
    return empty


def map_signal_power(volumes: torch.Tensor, padding_factor: float) -> torch.Tensor:
    """The prior's signal power τ² of maps, as RELION's Class3D takes it from its references.

    Half the mean ``|F|²`` per shell of each map as the projector holds it: gridding-corrected,
    zero-padded and transformed (:func:`prepare_fourier_volumes`), with the padded grid's
    component at radius ``r`` in unpadded shell ``round(r / p)`` (RELION's
    ``Projector::computeFourierTransformMap``). The gridding correction divides the map by a
    kernel that falls towards the box edge, which raises the power by ~15 % at low resolution
    and by up to ~50 % in the shells where the map fades; taken from the plain map instead, τ²
    shrinks the outer shells of the next map more, and that map's τ² still more: on the
    benchmark set the maps settled 0.6 Å short of RELION's (``docs/benchmarks.md``).

    Parameters
    ----------
    volumes
        ``(K, N, N, N)`` real maps.
    padding_factor
        Oversampling ``p`` of the projector's Fourier grid.

    Returns
    -------
    torch.Tensor
        ``(K, N // 2 + 1)`` float64 signal power per unpadded shell.
    """
    box_size = volumes.shape[-1]
    padded_size = padded_box_size(box_size, padding_factor)
    n_shells = box_size // 2 + 1
    # the power does not depend on where the map sits in the padded box: padded at the end
    # of each axis (the standard transform's own zero padding, no centring), and transformed
    # along z in slabs of y rows, so that no padded grid is held whole
    corrected = volumes / gridding_kernel_3d(box_size, padded_size, volumes.device)
    spectrum = torch.fft.fft(torch.fft.rfft(corrected, n=padded_size, dim=-1), n=padded_size, dim=-2)  # (K, N, P, H)
    k_full = torch.fft.fftfreq(padded_size, 1 / padded_size, device=volumes.device)
    k_half = torch.arange(padded_size // 2 + 1, device=volumes.device, dtype=k_full.dtype)
    sums = torch.zeros(volumes.shape[0], n_shells + 1, dtype=torch.float64, device=volumes.device)
    counts = torch.zeros(n_shells + 1, dtype=torch.float64, device=volumes.device)
    step = max(1, 2**22 // (padded_size * (padded_size // 2 + 1)))
    for start in range(0, padded_size, step):
        rows = slice(start, start + step)
        slab = torch.fft.fft(spectrum[:, :, rows], n=padded_size, dim=-3)  # (K, P, rows, H)
        radius = (k_full[:, None, None] ** 2 + k_full[rows][None, :, None] ** 2 + k_half[None, None, :] ** 2).sqrt()
        shells = torch.round(radius * box_size / padded_size).long().clamp(max=n_shells).reshape(-1)
        sums.index_add_(1, shells, squared_magnitude(slab).reshape(volumes.shape[0], -1).double())
        counts += torch.bincount(shells, minlength=n_shells + 1).double()
    return 0.5 * sums[:, :n_shells] / counts[:n_shells].clamp(min=1)


def expected_signal_power(data: torch.Tensor, weight: torch.Tensor, tau2: torch.Tensor, box_size: int, padded_size: int | None = None) -> torch.Tensor:
    """Update of the prior's signal power τ²: ``E[|V|²/2 | data]`` per shell.

    The posterior under the current prior (``T = 1``) has mean ``m`` and, per component,
    variance ``v = 1/(Σ w·2Q + 1/(p³ τ²))``; ``E[|V|²/2] = |m|²/2 + v`` is the EM update of τ²,
    whose fixed point is the power of the signal. The power of the map alone (``|m|²/2`` of the
    solvent-masked map, RELION's Class3D estimate) has a fixed point only where the data's
    SSNR exceeds about ``1 − (masked share of the noise)``: beyond, τ² falls to what the mask
    leaks into the shell, and the map there holds mostly leaked noise (``docs/architecture.md``).

    Parameters
    ----------
    data, weight
        ``(Q, Q, Q // 2 + 1)`` back-projected sums of one class on the padded grid or its
        centred crop (as :func:`reconstruct_class`).
    tau2
        ``(N // 2 + 1,)`` current signal power per unpadded shell.
    box_size
        Unpadded box size N.
    padded_size
        Size P of the padded grid (None: ``Q``).

    Returns
    -------
    torch.Tensor
        ``(N // 2 + 1,)`` float64 expected signal power per unpadded shell (on a crop, only
        the shells whose padded shells it holds whole are meaningful).
    """
    padded = data.shape[0] if padded_size is None else padded_size
    mean, _, variance = reconstruct_class(data, weight, tau2, box_size, 1.0, padded)
    mean_power = 0.5 * shell_power_3d(rfft3_centered(mean).to(torch.complex128))
    shell_variance = radial_average(variance.double(), cached_radius_and_shell_3d(data.shape[0], data.device)[1], padded // 2 + 1)
    return mean_power + shell_variance[padded_shell_of_unpadded(box_size, padded, data.device)] / (padded / box_size) ** 3


def padded_shell_of_unpadded(box_size: int, padded_size: int, device: torch.device) -> torch.Tensor:
    """``(N // 2 + 1,)`` nearest padded-grid shell of each unpadded shell (``r · P / N``, rounded)."""
    return (torch.arange(box_size // 2 + 1, device=device) * padded_size / box_size).round().long().clamp(max=padded_size // 2)


def rigid_motion_basis(volume: torch.Tensor) -> torch.Tensor:
    """``(6, N, N, N)`` first-order changes of ``volume`` under shifts along x, y, z and turns
    about the x, y, z axes through the box centre (voxel units, radians).

    A map moved by a small shift ``t`` and turn ``ω`` is ``V + Σ t_b·∂_b V + Σ ω_a·(a × r)·∇V``;
    the gradient is taken in Fourier space, so it is exact for a band-limited map.
    """
    box = volume.shape[-1]
    spectrum = rfft3_centered(volume)
    frequencies = frequency_grid_3d(box, volume.device).to(volume.dtype)  # (N, N, N // 2 + 1, 3): kx, ky, kz
    gradient = []
    for axis in range(3):  # x, y, z
        k = frequencies[..., axis]
        # a Nyquist component stands for both ±N/2, whose derivatives cancel
        derivative = torch.where(k.abs() == box / 2, 0.0, 2j * torch.pi * k / box)
        gradient.append(irfft3_centered(spectrum * derivative, box))
    d_x, d_y, d_z = gradient
    axis_values = torch.arange(box, device=volume.device, dtype=volume.dtype) - box // 2
    z, y, x = axis_values[:, None, None], axis_values[None, :, None], axis_values[None, None, :]
    return torch.stack([d_x, d_y, d_z, y * d_z - z * d_y, z * d_x - x * d_z, x * d_y - y * d_x])


def remove_rigid_differences(
    volumes: torch.Tensor, class_weights: torch.Tensor, mask: torch.Tensor, symmetry_matrices: torch.Tensor | None = None
) -> torch.Tensor:
    """Class maps ``(K, N, N, N)`` with their small rigid motions against the weighted mean
    map removed: each map loses the least-squares fit (inside ``mask``) of its difference
    from the mean by the mean's :func:`rigid_motion_basis`.

    A class's frame is arbitrary (the poses of its particles turn with it), so nothing ties
    the classes' frames together, and near-identical classes can drift apart by a few
    degrees, or take up the particles' pose errors, instead of their structural
    differences. Kept in the mean's frame to first order, they can differ only in ways that
    are not rigid motions; a structural difference loses only its small rigid-motion part.

    With ``symmetry_matrices`` ``(G, 3, 3)`` (RELION's, identity included) the fitted shifts
    and turns keep only their part that every symmetry operator leaves unchanged (their
    projection by the group mean ``Σ_g L_g / G``: along the axis for Cn, none for Dn, T, O,
    I), so that symmetric maps stay symmetric.
    """
    weights = class_weights.to(volumes.dtype).clamp(min=0)
    mean = (weights[:, None, None, None] * volumes).sum(0) / weights.sum().clamp(min=1e-30)
    basis = rigid_motion_basis(mean).reshape(6, -1)
    flat_mask = mask.reshape(-1)
    differences = (volumes - mean).reshape(volumes.shape[0], -1)
    # normal equations summed in double over chunks of voxels: no double copy of the basis
    gram = torch.zeros(6, 6, dtype=torch.float64, device=volumes.device)
    right = torch.zeros(6, volumes.shape[0], dtype=torch.float64, device=volumes.device)
    chunk = 2**20
    for start in range(0, flat_mask.numel(), chunk):
        part = slice(start, start + chunk)
        fitted = (basis[:, part] * flat_mask[part]).double()
        gram += fitted @ fitted.T
        right += fitted @ (differences[:, part] * flat_mask[part]).double().T
    coefficients = torch.linalg.solve(gram + 1e-9 * gram.diagonal().mean() * torch.eye(6, dtype=gram.dtype, device=gram.device), right)  # (6, K)
    if symmetry_matrices is not None:
        invariant = symmetry_matrices.to(coefficients).mean(0)  # (3, 3) projector onto the fixed vectors
        coefficients = torch.cat([invariant @ coefficients[:3], invariant @ coefficients[3:]])
    correction = (coefficients.T.to(volumes.dtype) @ basis).reshape(volumes.shape)
    return volumes - correction * mask


def update_noise_and_weights(model: ClassModel, stats: SufficientStatistics, max_shell: int) -> None:
    """Class weights, noise spectra (up to ``max_shell``), group scales and origin prior."""
    n_shells = model.box_size // 2 + 1
    total = float(stats.class_sum.sum())
    if total > 0:
        model.class_weights.copy_(stats.class_sum / total)
    measured = stats.noise_count > 0
    # RELION's σ² is per real/imaginary part: half the mean squared complex residual
    new_sigma2 = 0.5 * stats.noise_power / stats.noise_count.clamp(min=1)
    shells = torch.arange(n_shells, device=measured.device)
    update = measured & (shells[None, :] <= max_shell)
    model.sigma2_noise.copy_(torch.where(update, new_sigma2, model.sigma2_noise))
    scale = torch.where(stats.scale_power > 0, stats.scale_cross / stats.scale_power.clamp(min=1e-30), model.group_scale)
    model.group_scale.copy_(scale / scale.mean())
    if float(stats.n_particles) > 0:
        model.offset_sigma_angstrom.copy_(torch.sqrt(stats.offset_power / (2 * stats.n_particles)).clamp(min=0.5 * model.pixel_size_angstrom))



def fsc_regularisation(fsc: torch.Tensor, mean_weight_padded: torch.Tensor, box_size: int, padded_size: int, tau2_fudge: float) -> torch.Tensor:
    """``1/τ²`` per padded-grid shell from a half-map FSC (RELION's FSC-based τ² update).

    ``SSNR = T · FSC/(1-FSC)`` (FSC clamped to [0.001, 0.999]) and, since the data term of a
    shell is its mean CTF² weight, ``1/τ² = mean weight / SSNR``.

    Parameters
    ----------
    fsc
        ``(N // 2 + 1,)`` half-map FSC per unpadded shell.
    mean_weight_padded
        ``(n_padded_shells,)`` mean accumulated weight per padded shell.
    """
    ssnr_padded = shells_to_padded_grid(_ssnr_from_fsc(fsc, tau2_fudge), mean_weight_padded.shape[0], box_size, padded_size)
    return mean_weight_padded.double() / ssnr_padded


def _ssnr_from_fsc(fsc: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor · FSC/(1 − FSC)`` per shell, the FSC clamped to [0.001, 0.999] (RELION's
    bounds); factor 2 gives the SSNR of the map from both half sets."""
    clamped = fsc.clamp(0.001, 0.999)
    return factor * clamped / (1 - clamped)


@dataclass
class HalfSetMaps:
    """Half maps and full map of one structure, each filtered by the half-set FSC.

    Attributes
    ----------
    halves
        ``(2, N, N, N)`` half maps.
    full
        ``(N, N, N)`` map from both halves.
    fsc
        ``(N // 2 + 1,)`` FSC of the lightly regularised (optionally masked) half maps,
        which sets the filters.
    """

    halves: torch.Tensor
    full: torch.Tensor
    fsc: torch.Tensor


def half_set_reconstruction(
    data: torch.Tensor,
    weight: torch.Tensor,
    box_size: int,
    tau2_fudge: float,
    wiener_constant: float = 1e-3,
    mask: torch.Tensor | None = None,
    final_halves: bool = True,
    padded_size: int | None = None,
) -> HalfSetMaps:
    """Reconstruct half maps, measure their FSC, and reconstruct again with τ² from it.

    The first half maps use a small Wiener constant (``wiener_constant`` × mean weight); their
    FSC gives ``1/τ²`` per shell (:func:`fsc_regularisation`) for the final half maps and,
    with ``FSC_full = 2 FSC/(1 + FSC)``, for the full map: each map is filtered by its own
    signal-to-noise ratio, shell by shell.

    Parameters
    ----------
    data, weight
        ``(2, Q, Q, Q // 2 + 1)`` back-projected sums of the two half sets on the padded grid
        or its centred crop (as :func:`reconstruct_class`).
    mask
        ``(N, N, N)`` mask applied to the first half maps before their FSC, or None.
    final_halves
        Reconstruct the half maps again with the FSC-based τ²; False returns the first ones
        (when only the full map is wanted).
    padded_size
        Size P of the padded grid (None: ``Q``).
    """
    data, weight = _symmetrized_halves(data, weight)
    padded = data.shape[1] if padded_size is None else padded_size
    n_padded_shells = padded // 2 + 1
    padded_shells = cached_radius_and_shell_3d(data.shape[1], data.device)[1]
    first, fsc = half_map_fsc(data, weight, box_size, wiener_constant, mask, padded)
    halves = first
    if final_halves:
        halves = torch.stack([
            reconstruct_from_sums(data[h], weight[h], box_size, fsc_regularisation(fsc, radial_average(weight[h].double(), padded_shells, n_padded_shells), box_size, padded, tau2_fudge).float(), padded)
            for h in (0, 1)
        ])
    fsc_full = 2 * fsc.clamp(min=0) / (1 + fsc.clamp(min=0))
    mean_weight = radial_average(weight.sum(0).double(), padded_shells, n_padded_shells)
    full = reconstruct_from_sums(data.sum(0), weight.sum(0), box_size, fsc_regularisation(fsc_full, mean_weight, box_size, padded, tau2_fudge).float(), padded)
    return HalfSetMaps(halves, full, fsc)


def _symmetrized_halves(data: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-set sums ``(2, P, P, P // 2 + 1)`` with their Hermitian planes made consistent."""
    return (
        torch.stack([symmetrize_hermitian_plane(d, conjugate=True) for d in data]),
        torch.stack([symmetrize_hermitian_plane(w, conjugate=False) for w in weight]),
    )


def half_map_fsc(
    data: torch.Tensor, weight: torch.Tensor, box_size: int, wiener_constant: float = 1e-3, mask: torch.Tensor | None = None, padded_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightly regularised half maps and their FSC.

    Parameters
    ----------
    data, weight
        ``(2, Q, Q, Q // 2 + 1)`` back-projected sums of the two half sets, Hermitian planes
        symmetrised, on the padded grid or its centred crop.
    wiener_constant
        Each half map's regularisation, as a fraction of its mean weight (over the whole
        padded grid).
    mask
        ``(N, N, N)`` mask applied to both half maps before their FSC, or None.
    padded_size
        Size P of the padded grid (None: ``Q``).

    Returns
    -------
    halves
        ``(2, N, N, N)`` half maps (unmasked).
    fsc
        ``(N // 2 + 1,)`` their FSC per shell.
    """
    padded = data.shape[1] if padded_size is None else padded_size
    # the mean over the whole grid: a crop holds all of the weight in fewer components
    share = (data.shape[1] / padded) ** 2 * (data.shape[-1] / (padded // 2 + 1))
    halves = torch.stack([reconstruct_from_sums(data[h], weight[h], box_size, wiener_constant * float(weight[h].mean()) * share, padded) for h in (0, 1)])
    weighting = 1.0 if mask is None else mask
    return halves, fourier_shell_correlation(rfft3_centered(halves[0] * weighting), rfft3_centered(halves[1] * weighting))


def half_set_signal_power(
    data: torch.Tensor, weight: torch.Tensor, box_size: int, mask: torch.Tensor | None = None, padded_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior's signal power τ² of a structure from the FSC of its two half sets.

    The full map's SSNR is ``2·FSC/(1 − FSC)`` (FSC clamped to [0.001, 0.999]) and its noise
    power per component is the inverse of the shell's mean weight, so ``τ² = SSNR /
    (p³ · mean weight)``, ``p³`` because a padded voxel collects ``p³`` times less weight
    (RELION's Refine3D update, before its ``T``). Noise and signal are both measured in the
    maps, so that shells without signal get τ² ≈ 0, whatever gridding and interpolation do
    to the noise.

    Parameters
    ----------
    data, weight
        ``(2, Q, Q, Q // 2 + 1)`` back-projected sums of the two half sets on the padded grid
        or its centred crop (as :func:`reconstruct_class`).
    box_size
        Unpadded box size N.
    mask
        ``(N, N, N)`` mask the FSC is measured in (the one the maps are multiplied by), or None.
    padded_size
        Size P of the padded grid (None: ``Q``).

    Returns
    -------
    tau2
        ``(N // 2 + 1,)`` float64 signal power per unpadded shell; 0 where no data were inserted.
    fsc
        ``(N // 2 + 1,)`` FSC of the half maps.
    """
    data, weight = _symmetrized_halves(data, weight)
    padded = data.shape[1] if padded_size is None else padded_size
    _, fsc = half_map_fsc(data, weight, box_size, mask=mask, padded_size=padded)
    ssnr = _ssnr_from_fsc(fsc, 2.0)
    mean_weight = radial_average(weight.sum(0).double(), cached_radius_and_shell_3d(data.shape[1], data.device)[1], padded // 2 + 1)
    per_unpadded = mean_weight[padded_shell_of_unpadded(box_size, padded, data.device)] * (padded / box_size) ** 3
    return torch.where(per_unpadded > 0, ssnr / per_unpadded.clamp(min=1e-300), torch.zeros_like(ssnr)), fsc
