"""Pose search grids: HEALPix orientations with adaptive oversampling, translation grids."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch

from cryotorch.conventions import euler_deg_to_matrix, matrix_to_euler_deg
from cryotorch.ops.healpix import OrientationGrid, angular_step_deg, orientation_grid, oversample_orientations, pairwise_matrix_angle_deg, trace_angle_deg
from cryotorch.ops.symmetry import symmetry_matrices

__all__ = [
    "PoseGrid",
    "LocalSearch",
    "local_search",
    "local_search_size",
    "build_pose_grid",
    "grid_perturbation",
    "perturb_pose_grid",
    "mirror_translation_children",
    "GridSamples",
    "nearest_translation_px",
    "translation_grid",
    "coarse_radius_shells",
]

_SPREAD_CHUNK = 1 << 20  # children per chunk when a grid's child spread is measured
_NEAREST_CHUNK = 64  # rotations per neighbourhood of a GridSamples query
_WHOLE_CHUNK = 1 << 22  # rotation × sample traces per product of a GridSamples query over its whole grid
# grids of at most this many samples are searched whole by GridSamples (a query then costs
# O(samples) flops; by neighbourhoods it costs a neighbourhood, in dozens of small operations)
_WHOLE_SAMPLES = 1 << 16
_VIEW_CHUNK = 1 << 22  # view × direction cosines per chunk of PoseGrid.coarse_within
# a grid keeps the angles and matrices of its orientations and of their children where they
# number at most this many (96 bytes each: 50 MB); a finer grid computes them when asked
_TABLE_ORIENTATIONS = 1 << 19


@dataclass
class PoseGrid:
    """Coarse orientations and translations, and their adaptive-oversampling children.

    The grid holds the HEALPix directions of its coarse orientations and their psi step, as
    RELION does: the angles and matrices of coarse orientation ``r`` (direction
    ``r // n_psi``, psi sample ``r % n_psi``) and of its children are computed when asked
    for (:meth:`coarse_matrices`, :meth:`children_euler_deg`), so that a fine grid holds
    ``O(D)`` values for its ``R = D · n_psi`` coarse orientations and ``R·F`` children. A
    grid of at most :data:`_TABLE_ORIENTATIONS` of them computes them all once, the first
    time they are asked for, and then looks them up: the same values in a few operations
    instead of a hundred per call (which, on a GPU, are each a kernel launch).

    Attributes
    ----------
    orientations
        The coarse HEALPix directions and psi samples (before ``turn``).
    oversampling
        Orders of adaptive oversampling: each orientation has ``F = 4^os · 2^os`` children;
        0: its only child is itself.
    coarse_shifts_px
        ``(T, 2)`` coarse translation offsets (added to the particle's prior origin).
    fine_shifts_px
        ``(T, S, 2)`` the ``S`` oversampled translations of each coarse one.
    coarse_step_deg
        Angular step of the coarse grid.
    symmetry_matrices
        ``(G, 3, 3)`` float64 RELION matrices ``L`` of the point group whose asymmetric unit
        the orientations cover (identity first): a grid pose ``A`` stands for all ``A·L``,
        so a local search near the unit's border continues past it.
    turn
        ``(3, 3)`` float64 matrix every orientation is multiplied by on the right (the
        perturbation of :func:`perturb_pose_grid`), or None.
    """

    orientations: OrientationGrid
    oversampling: int
    coarse_shifts_px: torch.Tensor
    fine_shifts_px: torch.Tensor
    coarse_step_deg: float
    symmetry_matrices: torch.Tensor
    turn: torch.Tensor | None = None

    @property
    def n_rotations(self) -> int:
        """Number ``R`` of coarse orientations."""
        return self.orientations.n_orientations

    @property
    def n_children(self) -> int:
        """Number ``F`` of children of each coarse orientation."""
        return 8**self.oversampling

    def direction_of(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n,)`` the viewing direction (row of :attr:`coarse_directions`) of the coarse
        orientations ``rows`` ``(n,)``."""
        return self.orientations.direction_index(rows)

    def coarse_euler_deg(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n, 3)`` float64 Euler angles (degrees) of the coarse orientations ``rows``
        ``(n,)`` int64, turned as the grid is."""
        euler = self.orientations.euler_deg(rows)
        if self.turn is None:
            return euler
        return matrix_to_euler_deg(euler_deg_to_matrix(euler) @ self.turn)

    def coarse_matrices(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n, 3, 3)`` float32 RELION matrices of the coarse orientations ``rows`` ``(n,)``,
        as the coarse pass scores them."""
        table = self._coarse_table
        return self._computed_coarse_matrices(rows) if table is None else table[0][rows]

    def _computed_coarse_matrices(self, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`coarse_matrices` computed from the HEALPix directions and psi samples."""
        matrices = euler_deg_to_matrix(self.orientations.euler_deg(rows))
        return (matrices if self.turn is None else matrices @ self.turn).float()

    @cached_property
    def _coarse_table(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(R, 3, 3)`` :meth:`coarse_matrices` and :meth:`coarse_matrices64` of every coarse
        orientation, made once where the grid has at most :data:`_TABLE_ORIENTATIONS` of
        them; None otherwise."""
        if self.n_rotations > _TABLE_ORIENTATIONS:
            return None
        every = torch.arange(self.n_rotations, device=self.orientations.pixels.device)
        return self._computed_coarse_matrices(every), self._computed_coarse_matrices64(every)

    def coarse_matrices64(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n, 3, 3)`` float64 matrices of the coarse orientations ``rows`` ``(n,)``, for
        the angles of local searches."""
        table = self._coarse_table
        return self._computed_coarse_matrices64(rows) if table is None else table[1][rows]

    def _computed_coarse_matrices64(self, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`coarse_matrices64` computed from the angles of :meth:`coarse_euler_deg`."""
        return euler_deg_to_matrix(self.coarse_euler_deg(rows))

    def children_euler_deg(self, parents: torch.Tensor) -> torch.Tensor:
        """``(P, F, 3)`` float64 Euler angles (degrees) of the children of the coarse
        orientations ``parents`` ``(P,)``: RELION's oversampled pixels and psi values
        (:func:`~cryotorch.ops.healpix.oversample_orientations`), turned as the grid is."""
        table = self._children_table
        return self._computed_children_euler_deg(parents) if table is None else table[0][parents]

    def _computed_children_euler_deg(self, parents: torch.Tensor) -> torch.Tensor:
        """:meth:`children_euler_deg` computed from the HEALPix pixels and psi samples
        (without oversampling, the coarse orientations' own angles)."""
        if self.oversampling == 0:
            return self.coarse_euler_deg(parents)[:, None]
        grid = self.orientations
        fine = oversample_orientations(grid.order, grid.pixel_index(parents), grid.psi_index(parents), self.oversampling)
        if self.turn is None:
            return fine
        return matrix_to_euler_deg(euler_deg_to_matrix(fine) @ self.turn)

    def children_matrices(self, parents: torch.Tensor) -> torch.Tensor:
        """``(P, F, 3, 3)`` float32 RELION matrices of the children of ``parents`` ``(P,)``;
        without oversampling the coarse matrices themselves, as the coarse pass scores them."""
        if self.oversampling == 0:
            return self.coarse_matrices(parents)[:, None]
        return self.children_matrices64(parents).float()

    def children_matrices64(self, parents: torch.Tensor) -> torch.Tensor:
        """``(P, F, 3, 3)`` float64 matrices of :meth:`children_euler_deg`, for the angles
        between samples (with oversampling, :meth:`children_matrices` are these, rounded)."""
        table = self._children_table
        return self._matrices_of(self._computed_children_euler_deg(parents)) if table is None else table[1][parents]

    @staticmethod
    def _matrices_of(euler: torch.Tensor) -> torch.Tensor:
        """``(P, F, 3, 3)`` float64 matrices of the ``(P, F, 3)`` angles ``euler``."""
        return euler_deg_to_matrix(euler.reshape(-1, 3)).reshape(*euler.shape[:2], 3, 3)

    @cached_property
    def _children_table(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(R, F, 3)`` :meth:`children_euler_deg` and ``(R, F, 3, 3)``
        :meth:`children_matrices64` of every coarse orientation, made once where the grid
        has at most :data:`_TABLE_ORIENTATIONS` children; None otherwise."""
        if self.n_rotations * self.n_children > _TABLE_ORIENTATIONS:
            return None
        euler = self._computed_children_euler_deg(torch.arange(self.n_rotations, device=self.orientations.pixels.device))
        return euler, self._matrices_of(euler)

    def _first_of_directions(self) -> torch.Tensor:
        """``(D,)`` the first coarse orientation (psi sample 0) of every direction."""
        grid = self.orientations
        return torch.arange(grid.n_directions, device=grid.pixels.device) * grid.n_psi

    @cached_property
    def child_spread_deg(self) -> torch.Tensor:
        """``(D,)`` float32 the largest angle (degrees) between a coarse orientation of each
        direction and one of its children (float32 matrices, as they are scored), measured
        in chunks of directions. The angle between ``Rz(ψ)·M`` and ``Rz(ψ + δ)·M'`` does not
        depend on ``ψ``, so one psi sample stands for all. Small for most; near the poles
        the children's rot, and with it their angle, can differ by much more than a step."""
        parents_of = self._first_of_directions()
        if self.oversampling == 0:
            return torch.zeros(parents_of.shape[0], device=parents_of.device)
        chunk = max(1, _SPREAD_CHUNK // self.n_children)
        lowest = []
        for parents in parents_of.split(chunk):
            children = self.children_matrices(parents).reshape(parents.numel(), self.n_children, 9)
            # trace of (parent)ᵀ·child for every child: (P, F, 9) @ (P, 9, 1)
            traces = torch.bmm(children, self.coarse_matrices64(parents).float().reshape(-1, 9, 1))
            lowest.append(traces.amin(dim=(1, 2)))
        return trace_angle_deg(torch.cat(lowest))

    @cached_property
    def coarse_directions(self) -> torch.Tensor:
        """``(D, 3)`` float64 the viewing directions of the coarse orientations (the third
        rows of their matrices, which all orientations of a HEALPix pixel share)."""
        return self.coarse_matrices64(self._first_of_directions())[:, 2]

    def coarse_within(self, views: torch.Tensor, limit_deg: float | torch.Tensor) -> torch.Tensor:
        """``(P,)`` ascending numbers of the coarse orientations whose viewing direction lies
        within ``limit_deg`` of one of the unit vectors ``views`` ``(V, 3)`` (float64); every
        orientation from 180° on. ``limit_deg`` is one angle, or one per direction ``(D,)``.
        The views are compared with the directions :data:`_VIEW_CHUNK` values at a time."""
        directions = self.coarse_directions
        limit = torch.as_tensor(limit_deg, dtype=torch.float64, device=directions.device)
        cosine = torch.cos(torch.deg2rad(limit)).masked_fill(limit >= 180, -math.inf)
        near = torch.zeros(directions.shape[0], dtype=torch.bool, device=directions.device)
        for chunk in views.split(max(1, _VIEW_CHUNK // directions.shape[0])):
            near |= ((chunk @ directions.T) >= cosine).any(dim=0)
        n_psi = self.orientations.n_psi
        return (near.nonzero() * n_psi + torch.arange(n_psi, device=near.device)).reshape(-1)

    def without_oversampling(self) -> "PoseGrid":
        """The same coarse grid whose only child of each sample is the sample itself (this
        grid, where it has no oversampling)."""
        return self if self.oversampling == 0 else self._unrefined

    @cached_property
    def _unrefined(self) -> "PoseGrid":
        """:meth:`without_oversampling`'s grid, made once."""
        return replace(self, oversampling=0, fine_shifts_px=self.coarse_shifts_px[:, None, :])


@dataclass(frozen=True)
class LocalSearch:
    """The coarse orientations a batch's local searches score, and their prior.

    Attributes
    ----------
    rotations
        ``(U,)`` ascending numbers of the coarse orientations some particle searches.
    log_prior
        ``(B, U)`` float64 ``−angle²/2σ²`` to each particle's prior orientation, ``−inf``
        where the particle does not search.
    """

    rotations: torch.Tensor
    log_prior: torch.Tensor


def local_search(grid: PoseGrid, prior_euler_deg: torch.Tensor, sigma_deg: float) -> LocalSearch:
    """The local searches of particles at ``prior_euler_deg`` ``(B, 3)`` (degrees) over the
    coarse orientations of ``grid``: a Gaussian prior of width ``sigma_deg`` on the angle to
    the nearest symmetry mate of each grid pose, cut at ``3σ``, and never fewer orientations
    than those within one coarse step of the nearest (so that a search narrower than the grid
    still finds a sample).

    Only the candidates are measured: a rotation by θ turns the viewing direction by at most
    θ, so an orientation whose direction lies farther than the cut from every particle's
    cannot be searched. The cut is widened until it holds each particle's nearest
    orientation plus a step; the result equals the angles of every pair.
    """
    prior = euler_deg_to_matrix(prior_euler_deg.double())  # (B, 3, 3)
    mates = grid.symmetry_matrices.to(prior)
    # the viewing direction of A is its third row; that of a mate B·L, Lᵀ times B's, so the
    # cosine to it is that of L·(A's direction) to B's
    views = torch.einsum("gij,bj->gbi", mates, prior[:, 2]).reshape(-1, 3)
    limit = 3 * sigma_deg + grid.coarse_step_deg
    while True:
        candidates = grid.coarse_within(views, limit + 1e-6)
        angles = pairwise_matrix_angle_deg(prior, grid.coarse_matrices64(candidates), grid.symmetry_matrices)  # (B, C)
        nearest = angles.amin(dim=1, keepdim=True) if candidates.numel() else torch.full((prior.shape[0], 1), math.inf, dtype=prior.dtype, device=prior.device)
        needed = max(3 * sigma_deg, float(nearest.max()) + grid.coarse_step_deg)
        if needed <= limit or limit >= 180:
            break
        limit = min(needed, 180.0)
    searched = (angles <= 3 * sigma_deg) | (angles <= nearest + grid.coarse_step_deg)
    kept = searched.any(dim=0)
    angles, searched = angles[:, kept], searched[:, kept]
    return LocalSearch(candidates[kept], torch.where(searched, -(angles**2) / (2 * sigma_deg**2), -math.inf))


def local_search_size(grid: PoseGrid, sigma_deg: float) -> int:
    """About how many coarse orientations one particle's local search of width ``sigma_deg``
    scores (:func:`local_search`): those within ``θ = max(3σ, 1.5 steps)`` of its pose, the
    fraction ``(θ − sin θ)/π`` of all rotations, times the symmetry mates each grid pose
    stands for; at most the grid."""
    theta = math.radians(max(3 * sigma_deg, 1.5 * grid.coarse_step_deg))
    n_rot = grid.n_rotations
    return max(1, min(n_rot, math.ceil(n_rot * grid.symmetry_matrices.shape[0] * (theta - math.sin(theta)) / math.pi)))


def translation_grid(range_px: float, step_px: float, device: torch.device | None = None) -> torch.Tensor:
    """``(T, 2)`` offsets on a square grid of ``step_px`` inside a disc of ``range_px`` (RELION's)."""
    n = int(math.floor(range_px / step_px + 1e-6))
    axis = torch.arange(-n, n + 1, dtype=torch.float32, device=device) * step_px
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    offsets = torch.stack([x.flatten(), y.flatten()], dim=-1)
    return offsets[offsets.norm(dim=-1) <= range_px + 1e-6]


def build_pose_grid(
    healpix_order: int,
    offset_range_px: float,
    offset_step_px: float,
    symmetry: str,
    oversampling: int = 1,
    device: torch.device | None = None,
) -> PoseGrid:
    """The coarse HEALPix × translation grid and its oversampled children.

    The coarse grid is ``relion_refine``'s ``--healpix_order`` and ``--offset_step`` (RELION's
    GUI passes its angular and offset steps coarsened by the oversampling); adaptive oversampling by
    ``oversampling`` orders splits each orientation into ``4^os · 2^os`` and each translation
    into ``(2^os)²`` finer samples: the coarse one and those a fine step, two, ... further
    along +x and +y (:func:`mirror_translation_children` turns them to −x and −y).

    RELION centres a coarse translation's children on it (± a quarter of a 2 px step), and
    searches around the particle's origin rounded to whole pixels, so that the fine
    translations keep to the half-pixel points. Around the origin itself, centred children
    would miss it, and move every particle by half a fine step along x and y in every
    iteration; rounding the origin keeps the grid off the particle's position in the coarse
    pass and in the broad particles' unoversampled fine pass (on the benchmark set 1.5–2.5
    points of class accuracy, ``docs/benchmarks.md``). Children from their coarse translation
    make both passes score the origin itself, and keep the fine translations of every
    iteration on the lattice of fine steps through the particle's first origin.
    """
    coarse_shifts = translation_grid(offset_range_px, offset_step_px, device)
    n_sub = 2**oversampling
    sub = torch.arange(n_sub, dtype=torch.float32, device=device) / n_sub  # from the coarse one
    sub_y, sub_x = torch.meshgrid(sub, sub, indexing="ij")
    sub_offsets = torch.stack([sub_x.flatten(), sub_y.flatten()], dim=-1) * offset_step_px  # (S, 2)
    return PoseGrid(
        orientations=orientation_grid(healpix_order, symmetry, device=device),
        oversampling=oversampling,
        coarse_shifts_px=coarse_shifts,
        fine_shifts_px=coarse_shifts[:, None, :] + sub_offsets[None],
        coarse_step_deg=angular_step_deg(healpix_order),
        symmetry_matrices=symmetry_matrices(symmetry, device=device),
    )


def grid_perturbation(seed: int, iteration: int, factor: float) -> float:
    """RELION's random perturbation of the sampling grid in ``iteration`` (1-based), in units
    of the coarse steps: a walk that moves by ``U(factor/2, factor)`` every iteration and wraps
    into ``[-factor, factor)``, so that consecutive iterations sample far apart. The same seed
    and iteration give the same value (on every process, and after a resume)."""
    value = 0.0
    if factor <= 0:
        return value
    for step in range(1, iteration + 1):
        value += float(np.random.default_rng([seed, step]).uniform(0.5 * factor, factor))
        value = (value + factor) % (2 * factor) - factor
    return value


def mirror_translation_children(grid: PoseGrid) -> PoseGrid:
    """The grid with each coarse translation's children turned about it, from ``c + d`` to
    ``c − d``: the same lattice of fine translations, reached from the other side.

    Children on one side of their coarse translation let a particle whose coarse posterior
    holds one translation move by a fine step only that way; alternating the side every
    iteration lets it move either way (:meth:`Class3DJob.pose_grid
    <cryotorch.jobs.class3d.Class3DJob.pose_grid>`).
    """
    coarse = grid.coarse_shifts_px[:, None, :]
    mirrored = replace(grid, fine_shifts_px=2 * coarse - grid.fine_shifts_px)
    # what the grid has computed so far of its orientations (and its unoversampled grid, whose
    # only children are the coarse samples) holds for the mirrored one
    fields = set(grid.__dataclass_fields__)
    vars(mirrored).update({name: value for name, value in vars(grid).items() if name not in fields})
    return mirrored


def perturb_pose_grid(grid: PoseGrid, perturbation: float, coarse_offset_step_px: float) -> PoseGrid:
    """The grid with every orientation ``A`` turned to ``A·R(p, p, p)`` (``p = perturbation ×``
    the coarse angular step, R the Euler matrix of rot = tilt = psi = p) and every translation
    moved by ``perturbation × coarse_offset_step_px`` along x and y, as ``relion_refine
    --perturb`` does.

    On a fixed grid every iteration rebuilds the maps from the same discrete poses, so that
    their errors (up to half a step) repeat and add up; moving the grid every iteration
    spreads them.
    """
    if perturbation == 0:
        return grid
    angle = perturbation * grid.coarse_step_deg
    turn = euler_deg_to_matrix(torch.tensor([angle, angle, angle], dtype=torch.float64, device=grid.orientations.pixels.device))
    shift = perturbation * coarse_offset_step_px
    moved = replace(
        grid,
        coarse_shifts_px=grid.coarse_shifts_px + shift,
        fine_shifts_px=grid.fine_shifts_px + shift,
        turn=turn if grid.turn is None else grid.turn @ turn,
    )
    if "child_spread_deg" in vars(grid):
        # a turn of parent and children alike keeps every angle between them
        vars(moved)["child_spread_deg"] = grid.child_spread_deg
    return moved


class GridSamples:
    """The samples of a pass, grouped by the grid's coarse orientations, for :meth:`nearest`
    queries: each coarse orientation's children (itself on a grid without oversampling,
    :meth:`PoseGrid.without_oversampling`).

    Only the samples of coarse orientations within ``L`` plus their own child spread of a
    rotation are compared, ``L`` widened until it exceeds the best angle found: a child
    within ``L`` has its parent within ``L`` plus the parent's spread (the angle between
    rotations is a metric). Candidates are found by their viewing direction first (a turn by
    θ moves a direction by at most θ), then by their angle. So a query costs a
    neighbourhood, not the grid, and the children are computed for that neighbourhood only.
    A grid of at most ``whole_limit`` samples is instead compared whole, one matrix product
    per :data:`_WHOLE_CHUNK` traces: the same nearest samples in a few operations instead of
    dozens per 64 rotations.
    """

    def __init__(self, grid: PoseGrid, whole_limit: int = _WHOLE_SAMPLES) -> None:
        self.grid = grid
        self.spread_deg = grid.child_spread_deg
        every = torch.arange(grid.n_rotations, device=grid.orientations.pixels.device)
        # (R·F, 9) every sample, in the grid's order, where it is searched whole
        self.every = grid.children_matrices(every).reshape(-1, 9) if grid.n_rotations * grid.n_children <= whole_limit else None

    def nearest(self, rotations: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 3)`` the sample nearest to each of ``rotations`` ``(B, 3, 3)`` (smallest
        angle between them, no symmetry: the largest trace of ``Aᵀ·C``), for chunks of
        :data:`_NEAREST_CHUNK` rotations at a time (of :data:`_WHOLE_CHUNK` traces where the
        grid is searched whole)."""
        if self.every is not None:
            flat = rotations.reshape(-1, 9).float()
            chunk = max(1, _WHOLE_CHUNK // self.every.shape[0])
            return torch.cat([self.every[(part @ self.every.T).argmax(dim=1)] for part in flat.split(chunk)]).reshape(-1, 3, 3)
        return torch.cat([self._nearest(chunk) for chunk in rotations.split(_NEAREST_CHUNK)])

    def _nearest(self, rotations: torch.Tensor) -> torch.Tensor:
        flat64 = rotations.reshape(-1, 9).double()
        flat = flat64.float()
        views = rotations[:, 2].double()
        limit = self.grid.coarse_step_deg
        while True:
            # the coarse orientations within reach, limit + their own spread (and 0.1°: float32
            # traces hold small angles to ~0.03°), first by their viewing direction, then by
            # their angle
            reach_deg = limit + self.spread_deg.double() + 0.1  # (D,)
            near = self.grid.coarse_within(views, reach_deg)  # (P,)
            if near.numel():
                reach = torch.deg2rad(reach_deg[self.grid.direction_of(near)].clamp(max=180.0))
                traces = flat64 @ self.grid.coarse_matrices64(near).reshape(-1, 9).T  # (B, P)
                near = near[(traces >= 1 + 2 * torch.cos(reach) - 1e-9).any(dim=0)]
            if near.numel():
                candidates = self.grid.children_matrices(near).reshape(-1, 9)  # (P·F, 9), in the grid's order
                value, position = (flat @ candidates.T).max(dim=1)
                worst_deg = float(trace_angle_deg(value.double().min()))
                if worst_deg <= limit or limit >= 180:
                    return candidates[position].reshape(-1, 3, 3)
                limit = min(worst_deg, 180.0)
            else:
                limit = min(2 * limit, 180.0)


def nearest_translation_px(grid: PoseGrid) -> torch.Tensor:
    """``(2,)`` the x and the y of the grid's fine translations nearest to its centre (px).

    The grid is centred on each particle's position, which its fine translations hold (the
    coarse ones are among their own children, :func:`build_pose_grid`), but on a perturbed
    grid, which misses it by the perturbation's remainder.
    """
    shifts = grid.fine_shifts_px.reshape(-1, 2)
    return shifts.gather(0, shifts.abs().argmin(0, keepdim=True))[0]


def coarse_radius_shells(box_size: int, pixel_size_angstrom: float, particle_diameter_angstrom: float, angular_step: float) -> float:
    """Fourier radius (shells) that a coarse angular step can resolve (RELION's coarse size).

    A rotation by ``angular_step`` moves the rim of a particle of diameter D by
    ``π D · step/360``; with RELION's safety factor 1.2 that distance is the finest detail the
    coarse pass can tell apart.
    """
    rotated_distance = math.pi * particle_diameter_angstrom * angular_step / 360.0
    coarse_resolution = rotated_distance / 1.2
    return box_size * pixel_size_angstrom / coarse_resolution
