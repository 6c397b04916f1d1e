"""E-step: posteriors over (class × orientation × translation) as matrix products.

For particle i in optics group g, translation t, class k and orientation R, over Fourier
components f inside the current resolution (the stored rfft half plane, as RELION sums):

    log p(X_i | k, R, t) = −Σ_f |X_i^t − s·CTF_i·P_kR|² / (2σ_g²)
                         = −‖X_i‖²/2σ² + Σ_f Re(conj(L_it)·P_kR) − Σ_f Q_i·|P_kR|²
    L_it = X_i^t·s·CTF_i/σ²,   Q_i = s²·CTF_i²/(2σ²)

The cross term is one real GEMM ``[(i,t) × 2F] @ [2F × (k,R)]`` and the norm term one GEMM
``[i × F] @ [F × (k,R)]``. A coarse pass at the resolution the coarse angular step can
resolve keeps the samples holding the top ``significance`` of the posterior mass; the fine
pass rescores only their oversampled children at the full current resolution. The M-step
sums come out of the same matrices: weighted slices ``W @ L`` and weights ``W @ 2Q``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryotorch.conventions import euler_deg_to_matrix
from cryotorch.em.sampling import PoseGrid
from cryotorch.ops.healpix import rotation_angle_deg
from cryotorch.ops.projection import extract_slices

__all__ = ["PreparedBatch", "EStepSettings", "WeightedSlices", "EStepResult", "expectation", "phase_ramps", "score_batch"]


@dataclass
class PreparedBatch:
    """Particle data in the E-step's terms, for ``B`` particles and ``M`` Fourier components.

    Attributes
    ----------
    spectra
        ``(B, M)`` complex image components, translated to undo the prior origin.
    ctf
        ``(B, M)`` CTF values (ones without CTF correction).
    inv_sigma2
        ``(B, M)`` 1/σ² of each component's shell and the particle's optics group.
    scale
        ``(B,)`` intensity scale of the particle's group.
    prior_origin_px
        ``(B, 2)`` the particle's current origin (x, y) in pixels.
    prior_euler_deg
        ``(B, 3)`` the particle's current (or given) orientation.
    """

    spectra: torch.Tensor
    ctf: torch.Tensor
    inv_sigma2: torch.Tensor
    scale: torch.Tensor
    prior_origin_px: torch.Tensor
    prior_euler_deg: torch.Tensor

    def select(self, index: torch.Tensor) -> "PreparedBatch":
        """The sub-batch of particles ``index``."""
        return PreparedBatch(*(getattr(self, name)[index] for name in self.__dataclass_fields__))


@dataclass
class EStepSettings:
    """How the E-step searches and how much memory it may use.

    Attributes
    ----------
    frequencies
        ``(M, 2)`` components used, sorted by radius (cycles per box).
    n_coarse
        Number of leading components used by the coarse pass.
    box_size
        Image size N.
    pixel_size_angstrom
        Pixel size in Å.
    align
        Search orientations and translations; False keeps each particle's pose.
    significance
        Posterior mass kept by the coarse pass (RELION's adaptive oversampling fraction).
    max_significant
        Cap on coarse samples kept per particle.
    local_sigma_deg
        Width of a Gaussian prior around each particle's current orientation (searches
        restricted to 3σ); None searches globally.
    scale_sigma
        Width of the Gaussian prior ``N(1, σ²)`` on a per-particle, per-class intensity scale
        that is profiled out of each score (0: no such scale).
    memory_budget_bytes
        Working memory for one fine-pass sub-batch.
    """

    frequencies: torch.Tensor
    n_coarse: int
    box_size: int
    pixel_size_angstrom: float
    align: bool = True
    significance: float = 0.999
    max_significant: int = 500
    local_sigma_deg: float | None = None
    scale_sigma: float = 0.0
    memory_budget_bytes: float = 2**28


@dataclass
class WeightedSlices:
    """Posterior-weighted data of one class along ``n`` orientations, ready for insertion."""

    class_index: int
    rotations: torch.Tensor  # (n, 3, 3)
    data: torch.Tensor  # (n, M) complex Σ w·L
    weight: torch.Tensor  # (n, M) real Σ w·2Q


@dataclass
class EStepResult:
    """Per-particle outcome of the E-step for ``B`` particles.

    Attributes
    ----------
    best_class, best_euler_deg, best_origin_px
        ``(B,)``, ``(B, 3)``, ``(B, 2)`` maximum-posterior sample (origin absolute, px).
    max_posterior
        ``(B,)`` its probability (rlnMaxValueProbDistribution).
    n_significant
        ``(B,)`` samples holding the ``significance`` mass (rlnNrOfSignificantSamples).
    log_likelihood
        ``(B,)`` log Σ p(X|θ)p(θ) with the ‖X‖² term (rlnLogLikeliContribution).
    class_posterior
        ``(B, K)`` p(k | X).
    angular_spread_deg
        ``(B,)`` posterior-weighted RMS angle from the best orientation.
    best_projections
        ``(B, M)`` CTF-free projection of the best class at the best orientation.
    slices
        Weighted slices for the M-step.
    """

    best_class: torch.Tensor
    best_euler_deg: torch.Tensor
    best_origin_px: torch.Tensor
    max_posterior: torch.Tensor
    n_significant: torch.Tensor
    log_likelihood: torch.Tensor
    class_posterior: torch.Tensor
    angular_spread_deg: torch.Tensor
    best_projections: torch.Tensor
    slices: list[WeightedSlices]


def phase_ramps(shifts_px: torch.Tensor, frequencies: torch.Tensor, box_size: int) -> torch.Tensor:
    """``(T, M)`` factors ``exp(-2πi f·t/N)`` that translate images by ``+t`` pixels.

    An image whose particle was moved by ``-origin`` is centred by translating it by
    ``+origin`` (:mod:`cryotorch.conventions`), so a trial origin offset ``t`` on top of the
    prior origin multiplies the prior-centred spectrum by this ramp (the sign of
    :func:`cryotorch.ops.fourier.translate_2d_ft`).
    """
    phase = -2.0 * math.pi / box_size * (shifts_px @ frequencies.T)
    return torch.polar(torch.ones_like(phase), phase)


def score_batch(
    batch: PreparedBatch, projections: torch.Tensor, ramps: torch.Tensor, n: int, scale_sigma: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihoods ``(B, T, C)`` of B particles × T translations against C projections.

    With ``scale_sigma > 0`` each particle may match each projection at its own intensity
    ``a`` with a prior ``N(1, σ²)``; the score is maximised over ``a`` in closed form:
    ``a* = (cross + 1/σ²)/(2·norm + 1/σ²)``, score ``a*·cross − a*²·norm − (a* − 1)²/2σ²``.
    Classes then compete on the shape of their maps rather than on an amplitude that, after a
    random start, mostly reflects how much junk each happens to hold.

    Returns the scores without the ‖X‖² constant, and ``L`` ``(B, T, n)`` for the M-step.
    """
    factor = batch.scale[:, None] * batch.ctf[:, :n] * batch.inv_sigma2[:, :n]  # (B, n)
    shifted = batch.spectra[:, None, :n] * ramps[None, :, :n]  # (B, T, n)
    weighted = shifted * factor[:, None, :]  # L
    b, t = weighted.shape[:2]
    stacked = torch.cat([weighted.real, weighted.imag], dim=-1).reshape(b * t, 2 * n)
    projections_stacked = torch.cat([projections.real, projections.imag], dim=-1)  # (C, 2n)
    cross = (stacked @ projections_stacked.T).reshape(b, t, -1)
    q = 0.5 * (batch.scale[:, None] * batch.ctf[:, :n]) ** 2 * batch.inv_sigma2[:, :n]  # (B, n)
    norm = (q @ (projections.abs() ** 2).T)[:, None, :]  # (B, 1, C)
    return _profile_scale(cross, norm, scale_sigma), weighted


def _profile_scale(cross: torch.Tensor, norm: torch.Tensor, scale_sigma: float) -> torch.Tensor:
    """``cross − norm``, or its maximum over an intensity scale with prior ``N(1, σ²)``.

    With precision ``p = 1/σ²``, ``max_a a·c − a²·n − (p/2)(a − 1)²`` is reached at
    ``a* = (c + p)/(2n + p)`` and equals ``(c + p)²/(2(2n + p)) − p/2``; computed in place on
    ``cross``, which is the largest array of the E-step.
    """
    if scale_sigma <= 0:
        return cross.sub_(norm)
    precision = 1.0 / scale_sigma**2
    return cross.add_(precision).square_().div_(2 * (2 * norm + precision)).sub_(0.5 * precision)


def _offset_log_prior(origins_px: torch.Tensor, pixel_size_angstrom: float, sigma_angstrom: float) -> torch.Tensor:
    """Gaussian log prior of absolute origins ``(..., 2)`` in pixels."""
    return -(origins_px**2).sum(-1) * pixel_size_angstrom**2 / (2 * sigma_angstrom**2)


def _significant(posterior: torch.Tensor, fraction: float, cap: int) -> torch.Tensor:
    """Boolean mask of the fewest samples per row holding ``fraction`` of its mass (≤ cap).

    Only the ``cap`` largest values per row can qualify, so a partial ``topk`` replaces a
    full sort of every row.
    """
    cap = min(cap, posterior.shape[-1])
    ordered, order = torch.topk(posterior, cap, dim=-1)
    before = ordered.cumsum(-1) - ordered  # mass strictly above each sample
    keep_sorted = before < fraction
    return torch.zeros(posterior.shape, dtype=torch.bool, device=posterior.device).scatter(-1, order, keep_sorted)


def _significant_logits(logits: torch.Tensor, fraction: float, cap: int) -> torch.Tensor:
    """:func:`_significant` of ``softmax(logits)``, without forming the whole softmax."""
    cap = min(cap, logits.shape[-1])
    top, order = torch.topk(logits, cap, dim=-1)
    posterior = torch.exp(top - torch.logsumexp(logits, dim=-1, keepdim=True))
    keep_sorted = (posterior.cumsum(-1) - posterior) < fraction
    return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter(-1, order, keep_sorted)


def expectation(
    batch: PreparedBatch,
    volumes_ft: torch.Tensor,
    coarse_projections: torch.Tensor | None,
    grid: PoseGrid | None,
    log_class_prior: torch.Tensor,
    offset_sigma_angstrom: float,
    settings: EStepSettings,
    forced_class: torch.Tensor | None = None,
    class_offset: torch.Tensor | None = None,
) -> EStepResult:
    """Posteriors and M-step sums for one batch.

    Parameters
    ----------
    batch
        Prepared particles.
    volumes_ft
        ``(K, P, P, P // 2 + 1)`` prepared Fourier volumes (for fine projections).
    coarse_projections
        ``(K, R, n_coarse)`` projections along the grid's coarse orientations (alignment only).
    grid
        The pose grid (alignment only).
    log_class_prior
        ``(K,)`` log class weights.
    offset_sigma_angstrom
        Width of the origin prior.
    forced_class
        ``(B,)`` class per particle to assign instead of its posterior (RELION's random
        initial split of identical references), or None.
    class_offset
        ``(B, K)`` per-particle additions to the class log-prior, or None.
    """
    per_particle_prior = log_class_prior[None, :].expand(batch.spectra.shape[0], -1)
    if class_offset is not None:
        per_particle_prior = per_particle_prior + class_offset
    if not settings.align:
        return _expectation_fixed_pose(batch, volumes_ft, per_particle_prior, settings, forced_class)
    assert grid is not None and coarse_projections is not None
    n_classes = volumes_ft.shape[0]
    class_mask = _class_mask(forced_class, batch.spectra.shape[0], n_classes, batch.spectra.device)
    n_coarse = settings.n_coarse
    frequencies = settings.frequencies
    ramps_coarse = phase_ramps(grid.coarse_shifts_px, frequencies[:n_coarse], settings.box_size)
    n_rot = grid.coarse_rotations.shape[0]
    scores, _ = score_batch(batch, coarse_projections.reshape(n_classes * n_rot, n_coarse), ramps_coarse, n_coarse, settings.scale_sigma)
    b, t = scores.shape[:2]
    logits = scores.reshape(b, t, n_classes, n_rot)
    # class and origin priors (and the class mask) as one small (B, T, K, 1) term, added in place
    class_term = torch.where(class_mask, per_particle_prior, -math.inf)  # (B, K)
    origins = batch.prior_origin_px[:, None, :] + grid.coarse_shifts_px[None]  # (B, T, 2)
    offset_term = _offset_log_prior(origins, settings.pixel_size_angstrom, offset_sigma_angstrom)  # (B, T)
    logits.add_((offset_term[:, :, None] + class_term[:, None, :])[..., None].to(logits.dtype))
    if settings.local_sigma_deg is not None:
        angles = rotation_angle_deg(batch.prior_euler_deg[:, None, :], grid.coarse_euler_deg[None].to(batch.prior_euler_deg.dtype))  # (B, R)
        orientation_prior = -(angles**2) / (2 * settings.local_sigma_deg**2)
        # searched: within 3σ, and never fewer than the coarse samples nearest to the prior
        searched = (angles <= 3 * settings.local_sigma_deg) | (angles <= angles.min(dim=1, keepdim=True).values + grid.coarse_step_deg)
        orientation_prior = torch.where(searched, orientation_prior, -math.inf)
        logits.add_(orientation_prior[:, None, None, :].to(logits.dtype))
    significant = _significant_logits(logits.reshape(b, -1), settings.significance, settings.max_significant).reshape(b, t, n_classes, n_rot)
    return _fine_pass(batch, volumes_ft, grid, significant, per_particle_prior, offset_sigma_angstrom, settings, class_mask)


def _class_mask(forced_class: torch.Tensor | None, n: int, n_classes: int, device: torch.device) -> torch.Tensor:
    """``(B, K)`` classes each particle may belong to."""
    if forced_class is None:
        return torch.ones(n, n_classes, dtype=torch.bool, device=device)
    return torch.nn.functional.one_hot(forced_class, n_classes).bool()


def _fine_pass(
    batch: PreparedBatch,
    volumes_ft: torch.Tensor,
    grid: PoseGrid,
    significant: torch.Tensor,
    log_class_prior: torch.Tensor,
    offset_sigma_angstrom: float,
    settings: EStepSettings,
    class_mask: torch.Tensor,
) -> EStepResult:
    """Rescore the oversampled children of the significant coarse samples, in sub-batches.

    A sub-batch scores its particles against the union of their significant samples, so it
    grows only while that dense score matrix fits ``settings.memory_budget_bytes``.
    """
    results: list[EStepResult] = []
    n_particles = significant.shape[0]
    pairs = significant.any(dim=1).flatten(1)  # (B, K·R)
    shifts = significant.any(dim=(2, 3))  # (B, T)
    n_sub = grid.fine_shifts_px.shape[1] * grid.fine_euler_deg.shape[1]
    n_components = settings.frequencies.shape[0]
    start = 0
    while start < n_particles:
        # union sizes of every prefix of the remaining particles, from running maxima
        union_pairs = pairs[start:].int().cummax(dim=0).values.sum(-1).double()
        union_shifts = shifts[start:].int().cummax(dim=0).values.sum(-1).double()
        count = torch.arange(1, n_particles - start + 1, device=pairs.device, dtype=torch.float64)
        cost = 4.0 * (count * union_shifts * (union_pairs * n_sub + 4 * n_components) + union_pairs * n_sub * 6 * n_components)
        stop = start + max(1, int((cost <= settings.memory_budget_bytes).sum()))
        index = torch.arange(start, stop, device=significant.device)
        results.append(
            _fine_sub_batch(batch.select(index), volumes_ft, grid, significant[start:stop], log_class_prior[start:stop], offset_sigma_angstrom, settings, class_mask[start:stop])
        )
        start = stop
    return _concatenate(results)


def _fine_sub_batch(
    batch: PreparedBatch,
    volumes_ft: torch.Tensor,
    grid: PoseGrid,
    significant: torch.Tensor,
    log_class_prior: torch.Tensor,
    offset_sigma_angstrom: float,
    settings: EStepSettings,
    class_mask: torch.Tensor,
) -> EStepResult:
    device = batch.spectra.device
    n_classes = volumes_ft.shape[0]
    box = settings.box_size
    frequencies = settings.frequencies
    n = frequencies.shape[0]
    b = significant.shape[0]
    shift_used = significant.any(dim=(0, 2, 3)).nonzero()[:, 0]  # (Tu,)
    pair_used = significant.any(dim=(0, 1)).nonzero()  # (Uc, 2) (class, coarse rotation)
    n_sub_shift = grid.fine_shifts_px.shape[1]
    n_sub_rot = grid.fine_euler_deg.shape[1]
    fine_shifts = grid.fine_shifts_px[shift_used].reshape(-1, 2)  # (Tu·S, 2)
    fine_euler = grid.fine_euler_deg[pair_used[:, 1]].reshape(-1, 3)  # (Uc·F, 3)
    fine_class = pair_used[:, 0].repeat_interleave(n_sub_rot)  # (Uc·F,)
    fine_rotations = euler_deg_to_matrix(fine_euler).float()
    projections = torch.zeros(fine_euler.shape[0], n, dtype=torch.complex64, device=device)
    for k in range(n_classes):
        members = (fine_class == k).nonzero()[:, 0]
        if members.numel():
            projections[members] = extract_slices(volumes_ft[k : k + 1], fine_rotations[members], frequencies, box, settings.memory_budget_bytes)[0]
    ramps = phase_ramps(fine_shifts, frequencies, box)
    scores, weighted = score_batch(batch, projections, ramps, n, settings.scale_sigma)  # (b, Tu·S, Uc·F), (b, Tu·S, n)
    allowed = significant[:, shift_used][:, :, pair_used[:, 0], pair_used[:, 1]]  # (b, Tu, Uc)
    allowed = allowed[:, :, None, :, None].expand(b, -1, n_sub_shift, -1, n_sub_rot).reshape(b, fine_shifts.shape[0], -1)
    allowed = allowed & class_mask[:, fine_class][:, None, :]
    origins = batch.prior_origin_px[:, None, :] + fine_shifts[None]  # (b, Tf, 2)
    logits = scores + log_class_prior[:, fine_class][:, None, :]
    logits = logits + _offset_log_prior(origins, settings.pixel_size_angstrom, offset_sigma_angstrom)[:, :, None]
    if settings.local_sigma_deg is not None:
        angles = rotation_angle_deg(batch.prior_euler_deg[:, None, :], fine_euler[None].to(batch.prior_euler_deg.dtype))
        logits = logits - (angles**2 / (2 * settings.local_sigma_deg**2))[:, None, :].to(logits.dtype)
    logits = torch.where(allowed, logits, -math.inf)
    flat = logits.reshape(b, -1)
    log_evidence = torch.logsumexp(flat, dim=-1)
    posterior = torch.exp(flat - log_evidence[:, None]).reshape(logits.shape)  # (b, Tf, Rf)

    best = posterior.reshape(b, -1).argmax(dim=-1)
    best_shift, best_rot = best // logits.shape[2], best % logits.shape[2]
    best_euler = fine_euler[best_rot]
    rotation_posterior = posterior.sum(1)  # (b, Rf)
    angles_to_best = rotation_angle_deg(best_euler[:, None, :], fine_euler[None])  # (b, Rf)
    spread = torch.sqrt((rotation_posterior * angles_to_best.to(rotation_posterior.dtype) ** 2).sum(-1))
    class_posterior = torch.zeros(b, n_classes, dtype=posterior.dtype, device=device).index_add_(1, fine_class, rotation_posterior)
    image_norm = 0.5 * (batch.spectra.abs() ** 2 * batch.inv_sigma2).sum(-1)

    # M-step sums: Σ_{i,t} w·L per fine orientation, Σ_i (Σ_t w)·2Q per fine orientation
    weights = posterior.permute(2, 0, 1).reshape(-1, b * fine_shifts.shape[0])  # (Rf, b·Tf)
    data = torch.complex(weights @ weighted.real.reshape(-1, n), weights @ weighted.imag.reshape(-1, n))
    two_q = (batch.scale[:, None] * batch.ctf) ** 2 * batch.inv_sigma2  # (b, n)
    weight = rotation_posterior.T @ two_q  # (Rf, n)
    # orientations carrying a negligible share of any particle's posterior add nothing visible
    active = rotation_posterior.amax(0) > 1e-4
    slices = [
        WeightedSlices(k, fine_rotations[members], data[members], weight[members])
        for k in range(n_classes)
        if (members := ((fine_class == k) & active).nonzero()[:, 0]).numel()
    ]
    return EStepResult(
        best_class=fine_class[best_rot],
        best_euler_deg=best_euler.double(),
        best_origin_px=batch.prior_origin_px + fine_shifts[best_shift],
        max_posterior=posterior.reshape(b, -1).max(dim=-1).values,
        n_significant=_significant(posterior.reshape(b, -1), settings.significance, settings.max_significant * n_sub_rot * n_sub_shift).sum(-1),
        log_likelihood=log_evidence - image_norm,
        class_posterior=class_posterior,
        angular_spread_deg=spread,
        best_projections=projections[best_rot],
        slices=slices,
    )


def _expectation_fixed_pose(
    batch: PreparedBatch,
    volumes_ft: torch.Tensor,
    log_class_prior: torch.Tensor,
    settings: EStepSettings,
    forced_class: torch.Tensor | None,
) -> EStepResult:
    """Classification without alignment: one orientation and translation per particle."""
    device = batch.spectra.device
    n_classes = volumes_ft.shape[0]
    frequencies = settings.frequencies
    b, n = batch.spectra.shape
    rotations = euler_deg_to_matrix(batch.prior_euler_deg).float()
    projections = extract_slices(volumes_ft, rotations, frequencies, settings.box_size, settings.memory_budget_bytes)  # (K, b, n)
    factor = batch.scale[:, None] * batch.ctf * batch.inv_sigma2
    weighted = batch.spectra * factor  # L (b, n)
    q = 0.5 * (batch.scale[:, None] * batch.ctf) ** 2 * batch.inv_sigma2
    # diagonal of the same GEMMs: each particle against its own orientation only
    cross = torch.einsum("bn,kbn->bk", weighted.real, projections.real) + torch.einsum("bn,kbn->bk", weighted.imag, projections.imag)
    norm = torch.einsum("bn,kbn->bk", q, projections.abs() ** 2)
    logits = _profile_scale(cross, norm, settings.scale_sigma) + log_class_prior
    logits = torch.where(_class_mask(forced_class, b, n_classes, device), logits, -math.inf)
    log_evidence = torch.logsumexp(logits, dim=-1)
    posterior = torch.exp(logits - log_evidence[:, None])  # (b, K)
    best = posterior.argmax(dim=-1)
    image_norm = 0.5 * (batch.spectra.abs() ** 2 * batch.inv_sigma2).sum(-1)
    two_q = 2 * q
    slices = [
        WeightedSlices(k, rotations[members], posterior[members, k, None] * weighted[members], posterior[members, k, None] * two_q[members])
        for k in range(n_classes)
        if (members := (posterior[:, k] > 0).nonzero()[:, 0]).numel()
    ]
    return EStepResult(
        best_class=best,
        best_euler_deg=batch.prior_euler_deg,
        best_origin_px=batch.prior_origin_px,
        max_posterior=posterior.max(dim=-1).values,
        n_significant=_significant(posterior, settings.significance, n_classes).sum(-1),
        log_likelihood=log_evidence - image_norm,
        class_posterior=posterior,
        angular_spread_deg=torch.zeros(b, dtype=posterior.dtype, device=device),
        best_projections=projections.permute(1, 0, 2)[torch.arange(b, device=device), best],
        slices=slices,
    )


def _concatenate(results: list[EStepResult]) -> EStepResult:
    """One result from the results of consecutive sub-batches."""
    if len(results) == 1:
        return results[0]
    fields = {name: torch.cat([getattr(r, name) for r in results]) for name in EStepResult.__dataclass_fields__ if name != "slices"}
    return EStepResult(**fields, slices=[s for r in results for s in r.slices])
