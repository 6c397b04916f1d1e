"""E-step: posteriors over (class × orientation × translation) as matrix products.

For particle i in optics group g, translation t, class k and orientation R, over Fourier
components f inside the current resolution (the stored rfft half plane, as RELION sums):

    log p(X_i | k, R, t) = −Σ_f |X_i^t − s·CTF_i·P_kR|² / (2σ_g²)
                         = −‖X_i‖²/2σ² + Σ_f Re(conj(L_it)·P_kR) − Σ_f Q_i·|P_kR|²
    L_it = X_i^t·s·CTF_i/σ²,   Q_i = s²·CTF_i²/(2σ²)

The cross term is one real GEMM ``[(i,t) × 2F] @ [2F × (k,R)]`` and the norm term one GEMM
``[i × F] @ [F × (k,R)]``; a global search pairs each orientation with the one turned by 180°
in its plane, whose projection is the conjugate, so that two GEMMs of depth F over half the
orientations give both (:class:`HalfTurnProjections`). A coarse pass at the resolution the coarse angular step can
resolve keeps the samples holding the top ``significance`` of the posterior mass; the fine
pass rescores only their oversampled children at the full current resolution. The M-step
sums come out of the same matrices: weighted slices ``W @ L`` and weights ``W @ 2Q``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cryotorch.conventions import euler_deg_to_matrix
from cryotorch.em.sampling import PoseGrid, local_search
from cryotorch.em.sums import TensorSums
from cryotorch.ops.fourier import squared_magnitude
from cryotorch.ops.healpix import pairwise_matrix_angle_deg, rowwise_matrix_angle_deg
from cryotorch.ops.projection import extract_slices

if TYPE_CHECKING:
    from cryotorch.monitor.timing import PhaseTimer

__all__ = ["PreparedBatch", "EStepSettings", "FinePassCache", "SliceTable", "PassOffsets", "ScoreProjections", "HalfTurnProjections", "CoarseProjections", "global_search_batches", "WeightedSlices", "EStepResult", "SignificantSamples", "expectation", "phase_ramps", "score_terms", "coarse_logits", "score_batch", "profiled_scale", "scaled_score", "class_ess", "class_temperature"]


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

    def image_norm(self) -> torch.Tensor:
        """``(B,)`` ``½ Σ |X|²/σ²``: the constant of each particle's log-likelihood that the
        scores leave out, added back for its log-likelihood contribution."""
        return 0.5 * (squared_magnitude(self.spectra) * self.inv_sigma2).sum(-1)

    def ctf_factor(self, n: int | None = None) -> torch.Tensor:
        """``(B, n)`` ``scale·CTF/σ²`` of the first ``n`` components (all of them: None): the
        factor that turns an image's spectrum into ``L``, the cross term's operand."""
        return self.scale[:, None] * self.ctf[:, :n] * self.inv_sigma2[:, :n]

    def ctf_weight(self, n: int | None = None) -> torch.Tensor:
        """``(B, n)`` ``(scale·CTF)²/σ²`` of the first ``n`` components (all of them: None):
        twice the factor ``q`` of ``|P|²`` in the scores (``L·P − q·|P|²``), and what each
        image adds to the reconstruction's weights (times its posterior)."""
        return (self.scale[:, None] * self.ctf[:, :n]) ** 2 * self.inv_sigma2[:, :n]


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
    max_significant_oversampled
        Particles with more significant coarse samples than this are not oversampled: their
        pose is uncertain over many coarse steps, so the finer children would add cost but
        no precision. Their fine pass scores the coarse samples themselves at full resolution
        (through the ``unrefined_projections`` of :func:`expectation`). None oversamples every
        particle (RELION).
    local_sigma_deg
        Width of a Gaussian prior around each particle's current orientation (searches
        restricted to 3σ, :func:`~cryotorch.em.sampling.local_search`; the coarse pass scores
        only the orientations some particle of the batch searches); None searches globally.
    scale_sigma
        Width of the Gaussian prior ``N(1, σ²)`` on a per-particle, per-class intensity scale
        that is profiled out of each score (0: no such scale).
    memory_budget_bytes
        Working memory for one fine-pass sub-batch.
    coarse_piece_rotations
        A global search's coarse pass scores this many orientations at a time and keeps only
        each particle's ``max_significant`` best samples between the pieces, so that its
        score matrix is ``(B, T, K·piece)`` however large the grid; None scores all at once.
    padded_size
        Size P of the padded grid whose centred crop the prepared volumes hold (None: they
        hold all of it).
    target_class_ess
        Without alignment: flatten the class posteriors, ``p ∝ p(X|k)^τ p(k)^τ`` with one
        temperature ``τ ≤ 1`` per batch, until the batch's mean class ESS ``1/Σ_k p²`` reaches
        this value (class-similarity annealing); None leaves them as they are.
    hard_classification
        Without alignment: back-project each particle into its best class only.
    """

    frequencies: torch.Tensor
    n_coarse: int
    box_size: int
    pixel_size_angstrom: float
    align: bool = True
    significance: float = 0.999
    max_significant: int = 500
    max_significant_oversampled: int | None = None
    local_sigma_deg: float | None = None
    scale_sigma: float = 0.0
    memory_budget_bytes: float = 2**28
    coarse_piece_rotations: int | None = None
    target_class_ess: float | None = None
    hard_classification: bool = False
    padded_size: int | None = None


@dataclass
class PassOffsets:
    """Per-particle additions ``(B, K)`` to each class's cross term in each pass of an aligned
    E-step (None: nothing in that pass).

    The self-fit discount differs between the passes: a particle's own contribution to its
    last class returns in each pass at that pass's sample nearest to its last pose, and only
    in the components the pass scores.

    Attributes
    ----------
    coarse
        In the coarse pass (its orientations and translations, its first ``n_coarse``
        components).
    fine
        In the fine pass over the oversampled children of the significant coarse samples.
    unrefined
        In the fine pass of the particles that ``max_significant_oversampled`` exempts from
        oversampling (the coarse samples, every component).
    """

    coarse: torch.Tensor | None
    fine: torch.Tensor | None
    unrefined: torch.Tensor | None


@dataclass(frozen=True)
class ScoreProjections:
    """Projections laid out for the score GEMMs of :func:`score_terms`.

    The coarse pass scores every batch of an iteration against the same projections, so they
    are laid out once per iteration rather than once per batch.

    Attributes
    ----------
    stacked
        ``(..., C, 2n)`` real and imaginary parts side by side, the cross term's operand.
    power
        ``(..., C, n)`` ``|P|²``, the norm term's operand.
    """

    stacked: torch.Tensor
    power: torch.Tensor

    @classmethod
    def of(cls, projections: torch.Tensor) -> ScoreProjections:
        """The layout of complex projections ``(..., C, n)``."""
        return cls(torch.cat([projections.real, projections.imag], dim=-1), squared_magnitude(projections))

    def flatten(self) -> ScoreProjections:
        """All leading dimensions as one: ``(C, 2n)`` and ``(C, n)``."""
        return ScoreProjections(self.stacked.reshape(-1, self.stacked.shape[-1]), self.power.reshape(-1, self.power.shape[-1]))


class _TableSlots:
    """Rows of a table of ``capacity`` rows for integer keys: a key keeps its row until the
    table is full, which empties it. The keys held are kept sorted beside their rows, so the
    map costs the table's size, not the number of possible keys."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self.keys = torch.empty(0, dtype=torch.long, device=device)  # ascending
        self.rows = torch.empty(0, dtype=torch.long, device=device)

    @property
    def n_used(self) -> int:
        """Number of rows taken."""
        return self.keys.numel()

    def find(self, keys: torch.Tensor) -> torch.Tensor:
        """``(U,)`` the rows of ``keys`` ``(U,)``, −1 where a key holds none."""
        if not self.n_used:
            return torch.full_like(keys, -1)
        position = torch.searchsorted(self.keys, keys).clamp_(max=self.n_used - 1)
        return torch.where(self.keys[position] == keys, self.rows[position], -1)

    def insert(self, keys: torch.Tensor) -> torch.Tensor:
        """The new rows, in order, of the distinct ``keys`` ``(U,)`` that hold none yet."""
        rows = torch.arange(self.n_used, self.n_used + keys.numel(), device=keys.device)
        new_keys, order = keys.sort()
        # merge two ascending runs: each element moves by the number of the other's before it
        merged = self.n_used + keys.numel()
        at_old = torch.arange(self.n_used, device=keys.device) + torch.searchsorted(new_keys, self.keys)
        at_new = torch.arange(keys.numel(), device=keys.device) + torch.searchsorted(self.keys, new_keys)
        all_keys, all_rows = self.keys.new_empty(merged), self.rows.new_empty(merged)
        all_keys[at_old], all_rows[at_old] = self.keys, self.rows
        all_keys[at_new], all_rows[at_new] = new_keys, rows[order]
        self.keys, self.rows = all_keys, all_rows
        return rows

    def clear(self) -> None:
        """Free every row."""
        self.keys, self.rows = self.keys[:0], self.rows[:0]

    def assign(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows of the distinct ``keys`` ``(U,)``, and the positions in ``keys`` whose rows
        are new and must be filled now; None when they are more than the table holds."""
        if keys.numel() > self.capacity:
            return None
        rows = self.find(keys)
        missing = (rows < 0).nonzero()[:, 0]
        if missing.numel():
            if self.n_used + missing.numel() > self.capacity:
                self.clear()
                missing = torch.arange(keys.numel(), device=keys.device)
            rows[missing] = self.insert(keys[missing])
        return rows, missing


# columns of a half-turn GEMM per chunk on a CPU: its two (B·T, columns) products stay in the
# cache while the priors are added and the turned pairs written out. Elsewhere a chunk holds
# about 2^24 products, so that kernel launches stay few
_HALF_TURN_CHUNK_COLUMNS = 192
_HALF_TURN_CHUNK_VALUES = 2**24


@dataclass(frozen=True)
class HalfTurnProjections:
    """Projections of whole viewing directions, laid out for the coarse score GEMMs through
    the half-turn pairs of their psi samples (:meth:`scores`).

    Turning a projection by 180° in its plane conjugates it: orientation ``Rz(ψ + 180°)·A``
    samples the map at ``−Aᵀk``, where a real map's transform is the conjugate of its value
    at ``Aᵀk``. Of the ``2H`` psi samples of a direction, the last ``H`` are the first ``H``
    turned by 180°: with ``a = Σ Re(L)·Re(P)`` and ``c = Σ Im(L)·Im(P)`` over the first H,
    their cross terms are ``a + c`` and the turned ones' ``a − c``, and both norm terms are
    equal. Two GEMMs of depth ``n`` over the first H projections give all 2H, half the
    flops of one GEMM of depth ``2n`` over all of them (:class:`ScoreProjections`).

    Attributes
    ----------
    real, imag
        ``(G·H, n)`` real and imaginary parts of the first ``H`` psi samples of ``G``
        (class, direction) groups, classes outer.
    power
        ``(G·H, n)`` ``|P|²``.
    n_half
        ``H``, half the psi samples of a direction.
    """

    real: torch.Tensor
    imag: torch.Tensor
    power: torch.Tensor
    n_half: int

    @classmethod
    def of(cls, projections: torch.Tensor, n_half: int) -> HalfTurnProjections:
        """The layout of complex projections ``(K, D·H, n)``: the first ``H`` psi samples of
        each of D directions, per class."""
        flat = projections.reshape(-1, projections.shape[-1])
        return cls(flat.real.contiguous(), flat.imag.contiguous(), squared_magnitude(flat), n_half)

    @property
    def n_columns(self) -> int:
        """Number ``C = G·2H`` of projections the layout stands for."""
        return 2 * self.real.shape[0]

    def with_turns(self, values: torch.Tensor) -> torch.Tensor:
        """``(..., G·2H)`` values of all the projections from ``(..., G·H)`` values that a
        projection and its turned pair share."""
        lead, groups = values.shape[:-1], values.shape[-1] // self.n_half
        return values.reshape(*lead, groups, 1, self.n_half).expand(*lead, groups, 2, self.n_half).reshape(*lead, -1)

    def scores(self, stacked: torch.Tensor, shared: torch.Tensor, row_term: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, G·2H)`` cross terms plus ``shared`` ``(B, G·H)`` (what a projection and its
        turned pair add alike: e.g. minus the norm term) and ``row_term`` ``(B, T)``.

        ``stacked`` ``(B·T, 2n)`` holds ``Re(L)`` and ``Im(L)`` side by side. Computed in
        chunks of columns (on a CPU, whose products stay in the cache); written into the flat
        buffer ``out`` if given.
        """
        n = self.real.shape[1]
        b, t = row_term.shape
        m = stacked.shape[0]
        h = self.n_half
        groups = self.real.shape[0] // h
        total = m * groups * 2 * h
        result = stacked.new_empty(total) if out is None else out[:total]
        pairs = result.view(b, t, groups, 2, h)
        columns_per_chunk = _HALF_TURN_CHUNK_COLUMNS if stacked.device.type == "cpu" else max(_HALF_TURN_CHUNK_COLUMNS, _HALF_TURN_CHUNK_VALUES // m)
        step = max(1, columns_per_chunk // h)
        work = stacked.new_empty(2, m * min(step, groups) * h)
        for first in range(0, groups, step):
            g = min(step, groups - first)
            columns = slice(first * h, (first + g) * h)
            direct = torch.matmul(stacked[:, :n], self.real[columns].T, out=work[0, : m * g * h].view(m, g * h)).view(b, t, g, h)
            turned = torch.matmul(stacked[:, n:], self.imag[columns].T, out=work[1, : m * g * h].view(m, g * h)).view(b, t, g, h)
            direct.add_(shared[:, columns].view(b, 1, g, h)).add_(row_term[:, :, None, None])
            torch.add(direct, turned, out=pairs[:, :, first : first + g, 0])
            torch.sub(direct, turned, out=pairs[:, :, first : first + g, 1])
        return result.view(b, t, -1)


class CoarseProjections:
    """The coarse pass's projections of an iteration, laid out for the score GEMMs.

    A global search scores every orientation in every batch, in pieces of
    ``settings.coarse_piece_rotations`` orientations (:meth:`pieces`). When all ``R``
    projections fit a quarter of ``memory_budget_bytes`` they are extracted and laid out
    once, on first use, and kept; otherwise each batch extracts each piece anew and drops it
    once scored, so that only one piece is held at a time. A local search scores the few
    orientations near a batch's particles: only those are extracted and laid out, when a
    batch first asks for them, and kept in a table of at most ``memory_budget_bytes / 4``
    (emptied when full), so that the batches of a neighbourhood share them and a fine grid's
    projections are never all held at once.

    Parameters
    ----------
    volumes_ft
        ``(K, Q, Q, Q // 2 + 1)`` prepared Fourier volumes, the padded grid or its centred
        crop (``padded_size``).
    grid
        The pose grid whose coarse orientations (:meth:`PoseGrid.coarse_matrices`) are
        projected.
    frequencies
        ``(n, 2)`` the coarse pass's components.
    box_size
        Image size N.
    memory_budget_bytes
        Working memory of an extraction; a quarter of it holds the projections of a global
        search or a local search's table.
    padded_size
        Size P of the padded grid (None: that of ``volumes_ft``).
    """

    def __init__(
        self, volumes_ft: torch.Tensor, grid: PoseGrid, frequencies: torch.Tensor, box_size: int, memory_budget_bytes: float, padded_size: int | None = None
    ) -> None:
        self.volumes_ft, self.grid, self.frequencies, self.box_size = volumes_ft, grid, frequencies, box_size
        self.padded_size = padded_size
        self.memory_budget_bytes = memory_budget_bytes
        n_classes, n = volumes_ft.shape[0], frequencies.shape[0]
        self.holds_all = self.fit_whole(n_classes, grid.n_rotations, n, memory_budget_bytes)
        self._pieces: tuple[int, list[HalfTurnProjections]] | None = None
        # a (class, orientation) takes 2n floats stacked and n of |P|²
        capacity = int(max(1, min(grid.n_rotations, memory_budget_bytes / 4 // (n_classes * n * 12))))
        self.slots = _TableSlots(capacity, volumes_ft.device)
        self._table: ScoreProjections | None = None
        self._scores = torch.empty(0, device=volumes_ft.device)

    def score_buffer(self, n_values: int) -> torch.Tensor:
        """A flat float buffer of at least ``n_values`` for a batch's coarse scores, the same
        for every batch of the iteration (grown when a batch needs more).

        On a CPU a fresh score matrix of each batch is mapped anew, and touching its pages
        costs about a fifth as much as the GEMM that fills it.
        """
        if self._scores.numel() < n_values:
            self._scores = torch.empty(n_values, device=self.volumes_ft.device)
        return self._scores

    @staticmethod
    def fit_whole(n_classes: int, n_rotations: int, n_components: int, memory_budget_bytes: float) -> bool:
        """Whether the laid-out projections of ``n_rotations`` orientations of ``n_classes``
        maps at ``n_components`` components fit a quarter of ``memory_budget_bytes``: 3
        floats per component of half of them, the others being their half turns."""
        return n_classes * n_rotations * n_components * 6 <= memory_budget_bytes / 4

    def _layout(self, rotations: torch.Tensor) -> ScoreProjections:
        """``(K, U, 2n)`` / ``(K, U, n)`` layout of the coarse orientations ``rotations`` ``(U,)``."""
        return ScoreProjections.of(self._extract(rotations))

    def _extract(self, rotations: torch.Tensor) -> torch.Tensor:
        """``(K, U, n)`` projections along the coarse orientations ``rotations`` ``(U,)``."""
        matrices = self.grid.coarse_matrices(rotations)
        return extract_slices(self.volumes_ft, matrices, self.frequencies, self.box_size, self.memory_budget_bytes, self.padded_size)

    def pieces(self, piece_rotations: int | None = None) -> Iterator[tuple[int, int, HalfTurnProjections]]:
        """Every orientation, about ``piece_rotations`` at a time (None: all at once), as
        ``(first orientation, number of orientations W, layout of the K·W projections)``,
        classes outer. A piece holds whole directions (at least one): the ``6·2^order`` psi
        samples of a direction pair up by half turns (:class:`HalfTurnProjections`)."""
        n_rot, n_psi = self.grid.n_rotations, self.grid.orientations.n_psi
        half = n_psi // 2
        width = n_rot if piece_rotations is None else min(n_rot, max(n_psi, piece_rotations - piece_rotations % n_psi))
        starts = range(0, n_rot, width)
        if self._pieces is not None and self._pieces[0] == width:
            for start, layout in zip(starts, self._pieces[1]):
                yield start, min(width, n_rot - start), layout
            return
        kept: list[HalfTurnProjections] = []
        device = self.volumes_ft.device
        for start in starts:
            stop = min(n_rot, start + width)
            # the first half of the psi samples of the piece's directions
            rotations = (torch.arange(start, stop, n_psi, device=device)[:, None] + torch.arange(half, device=device)).reshape(-1)
            layout = HalfTurnProjections.of(self._extract(rotations), half)
            if self.holds_all:
                kept.append(layout)
            yield start, stop - start, layout
        if self.holds_all:
            self._pieces = (width, kept)

    def scoring(self, rotations: torch.Tensor) -> ScoreProjections:
        """The layout ``(K·U, 2n)`` / ``(K·U, n)`` (classes outer) of the orientations
        ``rotations`` ``(U,)`` of a local search."""
        assigned = self.slots.assign(rotations)
        if assigned is None:
            return self._layout(rotations).flatten()
        rows, missing = assigned
        if self._table is None:
            n_classes, n = self.volumes_ft.shape[0], self.frequencies.shape[0]
            device = self.volumes_ft.device
            capacity = self.slots.capacity
            self._table = ScoreProjections(torch.empty(n_classes, capacity, 2 * n, device=device), torch.empty(n_classes, capacity, n, device=device))
        if missing.numel():
            layout = self._layout(rotations[missing])
            self._table.stacked[:, rows[missing]] = layout.stacked
            self._table.power[:, rows[missing]] = layout.power
        return ScoreProjections(self._table.stacked[:, rows], self._table.power[:, rows]).flatten()


def global_search_batches(
    n_shifts: int, n_classes: int, n_rotations: int, n_components: int, n_coarse: int, work_bytes: float, held: bool
) -> tuple[int, int | None]:
    """Particles per batch and orientations per coarse piece of a global search.

    A coarse score (particle, translation, class, orientation) costs about 16 bytes of work
    arrays, a particle ``64·n_components`` more. A batch scores all orientations at once when
    that fits ``work_bytes`` for enough particles that its score GEMM has 1,024 rows (particles
    × translations), and otherwise scores them in pieces that fit. Where the projections are
    not ``held`` (:attr:`CoarseProjections.holds_all`) every batch extracts them anew, so a
    batch takes enough particles for 32,768 rows (at most 512), which makes the extraction a
    small share of the work; and a piece's projections also fit ``work_bytes``. Either way a
    batch takes no more particles than leave room for pieces of 256 orientations, so that a
    small budget does not shrink the pieces to a few orientations, each scored on its own.

    Parameters
    ----------
    n_shifts, n_classes, n_rotations
        T, K and R of the coarse pass.
    n_components, n_coarse
        Components of the fine pass and of the coarse pass.
    work_bytes
        Working memory of a batch's coarse pass.
    held
        Whether the iteration keeps every coarse projection.

    Returns
    -------
    batch_size, piece_rotations
        Piece None: all orientations at once.
    """
    per_score = 16 * n_shifts * n_classes  # bytes per particle and orientation
    per_particle = 64 * n_components
    fit = int(work_bytes / (per_particle + per_score * min(n_rotations, 256)))
    least = max(1, min(512, math.ceil((1024 if held else 32768) / n_shifts), fit))
    whole = int(min(512, work_bytes / (per_score * n_rotations + per_particle)))
    if held and whole >= least:
        return whole, None
    piece = int((work_bytes / least - per_particle) / per_score)
    if not held:
        piece = min(piece, int(work_bytes / (6 * n_classes * n_coarse)))
    return least, max(1, min(n_rotations, piece))


@dataclass
class WeightedSlices:
    """Posterior-weighted data of one class along ``n`` orientations, ready for insertion."""

    class_index: int
    rotations: torch.Tensor  # (n, 3, 3)
    data: torch.Tensor  # (n, M) complex Σ w·L
    weight: torch.Tensor  # (n, M) real Σ w·2Q


@dataclass
class SliceTable(TensorSums):
    """Posterior-weighted slice sums of fine ids ``(k·R + r)·F + f`` of a
    :class:`FinePassCache`'s grid: sums of disjoint sets of particles, to be inserted once
    (:meth:`FinePassCache.table_slices`). A table holds rows for the ids its particles reached
    only, ascending; two tables add row by row (:meth:`add_`), where an id missing from one
    counts as zeros, as if every table held every id (:meth:`dense`, the layout in which
    processes add them: :meth:`tensors`)."""

    ids: torch.Tensor  # (U,) ascending fine ids
    data: torch.Tensor  # (U, M) complex Σ w·L
    weight: torch.Tensor  # (U, M) real Σ w·2Q

    def tensors(self) -> list[torch.Tensor]:
        """The sums (not the ids): processes add :meth:`dense` tables of the same ids."""
        return [self.data, self.weight]

    def add_(self, other: SliceTable) -> SliceTable:
        """Add ``other``'s sums row by row, in place: the rows of ids held by both are the
        sums ``self + other``, those of one table alone its own values."""
        if torch.equal(self.ids, other.ids):
            self.data.add_(other.data)
            self.weight.add_(other.weight)
            return self
        ids = torch.unique(torch.cat([self.ids, other.ids]))
        mine, theirs = torch.searchsorted(ids, self.ids), torch.searchsorted(ids, other.ids)
        data = self.data.new_zeros(ids.shape[0], self.data.shape[1])
        weight = self.weight.new_zeros(ids.shape[0], self.weight.shape[1])
        data[mine], weight[mine] = self.data, self.weight
        self.ids, self.data, self.weight = ids, data.index_add_(0, theirs, other.data), weight.index_add_(0, theirs, other.weight)
        return self

    def dense(self, n_ids: int) -> SliceTable:
        """The same sums with a row for each of the ``n_ids`` fine ids (zeros where none was
        added)."""
        data = self.data.new_zeros(n_ids, self.data.shape[1])
        weight = self.weight.new_zeros(n_ids, self.weight.shape[1])
        data[self.ids], weight[self.ids] = self.data, self.weight
        return SliceTable(torch.arange(n_ids, device=self.ids.device), data, weight)


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

    def select(self, index: torch.Tensor) -> "EStepResult":
        """The per-particle fields of particles ``index`` (slices are sums, kept whole)."""
        fields = {name: getattr(self, name)[index] for name in self.__dataclass_fields__ if name != "slices"}
        return EStepResult(**fields, slices=self.slices)


@dataclass
class SignificantSamples:
    """The significant coarse samples of B particles, as lists rather than a dense mask.

    Attributes
    ----------
    index
        ``(B, C)`` positions in the flattened ``(T, K·U)`` coarse samples (translation,
        then class · U + scored orientation).
    valid
        ``(B, C)`` which of them are significant (the rest fill the rows).
    n_pairs
        ``K·U``, the number of (class, scored orientation) pairs.
    rotations
        ``(U,)`` ascending coarse orientation numbers of the scored orientations in a local
        search (the batch's neighbourhood, so that the masks of the fine pass stay the size
        of what was scored, not of the grid); in a global search the number ``R`` of the
        grid's orientations, all scored in order (no list of R numbers is held).
    """

    index: torch.Tensor
    valid: torch.Tensor
    n_pairs: int
    rotations: torch.Tensor | int

    def select(self, rows: torch.Tensor | slice) -> "SignificantSamples":
        """The samples of particles ``rows``."""
        return SignificantSamples(self.index[rows], self.valid[rows], self.n_pairs, self.rotations)

    def class_and_rotation(self, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The classes and the grid's coarse orientation numbers of ``pairs``."""
        if isinstance(self.rotations, int):
            return pairs // self.rotations, pairs % self.rotations
        n_scored = self.rotations.shape[0]
        return pairs // n_scored, self.rotations[pairs % n_scored]

    def union_growth(self, n_shifts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,)`` numbers of distinct pairs and of distinct translations (of ``n_shifts``)
        among the significant samples of the first 1, 2, ..., B particles.

        A pair (translation) joins the union at the first particle holding it, so the counts
        are the cumulative sums of how many first occurrences each particle holds.
        """
        b = self.index.shape[0]
        rows = self.valid.nonzero()[:, 0]
        index = self.index[self.valid]

        def growth(keys: torch.Tensor, n_keys: int) -> torch.Tensor:
            first = torch.full((n_keys,), b, dtype=torch.long, device=keys.device).scatter_reduce_(0, keys, rows, "amin")
            return torch.bincount(first, minlength=b + 1)[:b].cumsum(0)

        return growth(index % self.n_pairs, self.n_pairs), growth(index // self.n_pairs, n_shifts)

    def union(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sorted translations ``(Tu,)`` and pairs ``(Uc,)`` some particle has significant
        samples in, and the ``(b, Tu, Uc)`` mask of each particle's significant samples."""
        rows = self.valid.nonzero()[:, 0]
        index = self.index[self.valid]
        shift, pair = index // self.n_pairs, index % self.n_pairs
        shift_used, pair_used = torch.unique(shift), torch.unique(pair)
        mask = torch.zeros(self.index.shape[0], shift_used.numel(), pair_used.numel(), dtype=torch.bool, device=index.device)
        mask[rows, torch.searchsorted(shift_used, shift), torch.searchsorted(pair_used, pair)] = True
        return shift_used, pair_used, mask


def phase_ramps(shifts_px: torch.Tensor, frequencies: torch.Tensor, box_size: int) -> torch.Tensor:
    """``(T, M)`` factors ``exp(-2πi f·t/N)`` that translate images by ``+t`` pixels.

    An image whose particle was moved by ``-origin`` is centred by translating it by
    ``+origin`` (:mod:`cryotorch.conventions`), so a trial origin offset ``t`` on top of the
    prior origin multiplies the prior-centred spectrum by this ramp (the sign of
    :func:`cryotorch.ops.fourier.translate_2d_ft`).
    """
    phase = -2.0 * math.pi / box_size * (shifts_px @ frequencies.T)
    return torch.polar(torch.ones_like(phase), phase)


class _ReusedGathers:
    """Output arrays of large row gathers, reused from one call to the next.

    The fine pass gathers tens of MB of operands per sub-batch. Into a new array each time, a
    CPU spends most of the gather faulting the array's pages in (a 74 MB gather took 40 ms
    into a new array and 4 ms into a reused one on the 2-core benchmark VM). An array here
    grows to the largest gather asked of it and stays with its :class:`FinePassCache` for
    the iteration: no more than the operands of one sub-batch, whose work arrays fit the
    fine pass's budget (on a GPU, PyTorch's caching allocator keeps such blocks anyway). A
    gather's result is valid until the next gather of the same name.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, torch.Tensor] = {}

    def rows(self, name: str, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``source[index]``: rows of ``source`` along its first dimension for an integer
        ``index`` of any shape, as ``index.shape + source.shape[1:]``."""
        flat = index.reshape(-1)
        shape = (flat.shape[0], *source.shape[1:])
        numel = math.prod(shape)
        array = self._arrays.get(name)
        if array is None or array.numel() < numel or array.dtype != source.dtype or array.device != source.device:
            array = self._arrays[name] = torch.empty(numel, dtype=source.dtype, device=source.device)
        out = array[:numel].view(shape)
        torch.index_select(source, 0, flat, out=out)
        return out.view(*index.shape, *source.shape[1:])


class FinePassCache:
    """The fine pass's state over one iteration: child projections, and slice sums.

    The fine pass of every batch asks for the children of its significant (class, coarse
    orientation) pairs. The ``F`` children of a coarse orientation are projected for all K
    classes the first time any class asks for them, and kept in a table: extracting the K
    classes together reads each trilinear neighbour once for all of them (three classes
    cost about 1.2 times one), and once the classes take shape most coarse orientations are
    significant for several (2.1 of 3 on the benchmark set of ``docs/benchmarks.md``). Its
    posterior-weighted slices are summed per fine orientation in a second table, so that an
    orientation is inserted into the volumes at most once per leaf of the iteration's batches
    (:func:`~cryotorch.data.particles.tree_leaves`) rather than once per batch: class3d either
    drains the table at the end of each leaf (:meth:`drain`), or, where it holds every fine id
    (:attr:`holds_every_sum`), takes it whole (:meth:`take_table`) and adds the leaves' tables
    in the summation tree, so that each orientation is inserted once per iteration.
    Each table holds at most ``memory_budget_bytes``: a full projection table is emptied and
    refilled, a full sum table is handed back for insertion (:meth:`add`, :meth:`drain`), so
    memory stays bounded whatever the number of samples.

    Parameters
    ----------
    volumes_ft
        ``(K, Q, Q, Q // 2 + 1)`` prepared Fourier volumes, the padded grid or its centred
        crop (``padded_size``).
    grid
        The pose grid whose children (:meth:`PoseGrid.children_matrices`) are projected.
    frequencies
        ``(M, 2)`` components of the projections.
    box_size
        Image size N.
    memory_budget_bytes
        Size of each table.
    padded_size
        Size P of the padded grid (None: that of ``volumes_ft``).
    """

    def __init__(
        self, volumes_ft: torch.Tensor, grid: PoseGrid, frequencies: torch.Tensor, box_size: int, memory_budget_bytes: float, padded_size: int | None = None
    ) -> None:
        n_classes = volumes_ft.shape[0]
        n_rot, n_sub = grid.n_rotations, grid.n_children
        n = frequencies.shape[0]
        device = volumes_ft.device
        self.volumes_ft, self.grid, self.frequencies, self.box_size = volumes_ft, grid, frequencies, box_size
        self.padded_size = padded_size
        self.memory_budget_bytes = memory_budget_bytes
        capacity = int(max(1, min(n_rot, memory_budget_bytes // (n_classes * n_sub * n * 8))))
        self.slots = _TableSlots(capacity, device)
        self.table = torch.empty(capacity, n_classes, n_sub, n, dtype=torch.complex64, device=device)
        self.sum_capacity = int(max(1, min(n_classes * n_rot * n_sub, memory_budget_bytes // (n * 12))))
        self.sum_slots = _TableSlots(self.sum_capacity, device)
        # rows are zeroed when a fine id takes them, so untouched memory is never written
        self.sum_data = torch.empty(self.sum_capacity, n, dtype=torch.complex64, device=device)
        self.sum_weight = torch.empty(self.sum_capacity, n, device=device)
        self.sum_ids = torch.empty(self.sum_capacity, dtype=torch.long, device=device)
        self.gathers = _ReusedGathers()

    def projections(self, classes: torch.Tensor, coarse_rotations: torch.Tensor) -> torch.Tensor:
        """``(U, F, M)`` child projections of the pairs ``(classes[u], coarse_rotations[u])``."""
        rotations, pair_rotation = torch.unique(coarse_rotations, return_inverse=True)
        assigned = self.slots.assign(rotations)
        if assigned is None:
            # more orientations than the table holds: each is extracted for its pairs' classes only
            n_sub, n = self.grid.n_children, self.frequencies.shape[0]
            values = torch.empty(classes.numel(), n_sub, n, dtype=torch.complex64, device=classes.device)
            for k in torch.unique(classes).tolist():
                members = (classes == k).nonzero()[:, 0]
                values[members] = self._extract(self.volumes_ft[k : k + 1], coarse_rotations[members])[0]
            return values
        rows, missing = assigned
        if missing.numel():
            self.table[rows[missing]] = self._extract(self.volumes_ft, rotations[missing]).transpose(0, 1)
        return self.table[rows[pair_rotation], classes]

    def _extract(self, volumes_ft: torch.Tensor, coarse_rotations: torch.Tensor) -> torch.Tensor:
        """``(k, U, F, M)`` projections of the ``k`` maps ``volumes_ft`` along the children of
        ``coarse_rotations`` ``(U,)``."""
        n_sub, n = self.grid.n_children, self.frequencies.shape[0]
        matrices = self.grid.children_matrices(coarse_rotations).reshape(-1, 3, 3)
        values = extract_slices(volumes_ft, matrices, self.frequencies, self.box_size, self.memory_budget_bytes, self.padded_size)
        return values.reshape(volumes_ft.shape[0], -1, n_sub, n)

    def add(self, ids: torch.Tensor, data: torch.Tensor, weight: torch.Tensor) -> list[WeightedSlices]:
        """Add slice sums of distinct fine ids ``(k·R + r)·F + f``; returns the slices to
        insert now (the table's contents when it is full, or these sums when they alone
        exceed it)."""
        if ids.numel() > self.sum_capacity:
            return self._slices(ids, data, weight)
        drained: list[WeightedSlices] = []
        rows = self.sum_slots.find(ids)
        if self.sum_slots.n_used + int((rows < 0).sum()) > self.sum_capacity:
            drained = self.drain()
            rows = torch.full_like(ids, -1)
        new = (rows < 0).nonzero()[:, 0]
        if new.numel():
            rows[new] = self.sum_slots.insert(ids[new])
            self.sum_ids[rows[new]] = ids[new]
            self.sum_data[rows[new]] = 0
            self.sum_weight[rows[new]] = 0
        self.sum_data.index_add_(0, rows, data)
        self.sum_weight.index_add_(0, rows, weight)
        return drained

    @property
    def n_ids(self) -> int:
        """Number of fine ids, ``K·R·F``."""
        return self.volumes_ft.shape[0] * self.grid.n_rotations * self.grid.n_children

    @property
    def holds_every_sum(self) -> bool:
        """True where the sum table has a row for every fine id, so that it never hands slices
        back before :meth:`take_table`."""
        return self.sum_capacity == self.n_ids

    @property
    def slice_table_bytes(self) -> int:
        """Size of the largest :class:`SliceTable` of this cache (a row for every fine id)."""
        return self.n_ids * self.frequencies.shape[0] * 12

    def empty_table(self) -> SliceTable:
        """A :class:`SliceTable` without rows."""
        n, device = self.frequencies.shape[0], self.frequencies.device
        return SliceTable(torch.empty(0, dtype=torch.long, device=device), torch.empty(0, n, dtype=torch.complex64, device=device), torch.empty(0, n, device=device))

    def take_table(self) -> SliceTable:
        """The summed slices held, as a :class:`SliceTable` of their ids; the sum table is
        emptied. Only where :attr:`holds_every_sum`, so that no sum was handed back before."""
        if not self.holds_every_sum:
            raise ValueError(f"the sum table holds {self.sum_capacity} of {self.n_ids} fine ids; drain() it instead")
        used = slice(0, self.sum_slots.n_used)
        ids, order = torch.sort(self.sum_ids[used])
        table = SliceTable(ids, self.sum_data[used][order], self.sum_weight[used][order])
        self.sum_slots.clear()
        return table

    def table_slices(self, table: SliceTable) -> list[WeightedSlices]:
        """The rows of ``table`` that hold any sum, per class, ready for insertion (a row of
        zeros would add nothing)."""
        rows = ((table.weight != 0).any(dim=1) | (table.data != 0).any(dim=1)).nonzero()[:, 0]
        return self._slices(table.ids[rows], table.data[rows], table.weight[rows])

    def drain(self) -> list[WeightedSlices]:
        """The summed slices held, per class; the table is emptied."""
        used = slice(0, self.sum_slots.n_used)
        slices = self._slices(self.sum_ids[used], self.sum_data[used].clone(), self.sum_weight[used].clone())
        self.sum_slots.clear()
        return slices

    def _slices(self, ids: torch.Tensor, data: torch.Tensor, weight: torch.Tensor) -> list[WeightedSlices]:
        n_rot, n_sub = self.grid.n_rotations, self.grid.n_children
        classes = ids // (n_rot * n_sub)
        parents, of = torch.unique(ids // n_sub % n_rot, return_inverse=True)
        rotations = self.grid.children_matrices(parents)[of, ids % n_sub]
        return [
            WeightedSlices(k, rotations[members], data[members], weight[members])
            for k in torch.unique(classes).tolist()
            for members in [(classes == k).nonzero()[:, 0]]
        ]


def _score_operands(batch: PreparedBatch, ramps: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L`` ``(B, T, n)``, its real and imaginary parts side by side ``(B·T, 2n)`` (the cross
    term's operand) and ``Q`` ``(B, n)`` (the norm term's)."""
    factor = batch.ctf_factor(n)  # (B, n)
    shifted = batch.spectra[:, None, :n] * ramps[None, :, :n]  # (B, T, n)
    weighted = shifted * factor[:, None, :]  # L
    b, t = weighted.shape[:2]
    stacked = torch.cat([weighted.real, weighted.imag], dim=-1).reshape(b * t, 2 * n)
    q = 0.5 * batch.ctf_weight(n)  # (B, n)
    return weighted, stacked, q


def score_terms(batch: PreparedBatch, projections: ScoreProjections, ramps: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two GEMMs of the score of B particles × T translations against C projections
    (``projections`` laid out as ``(C, 2n)`` and ``(C, n)``).

    Returns the cross term ``Σ Re(conj(L)·P)`` ``(B, T, C)``, the norm term ``Σ Q·|P|²``
    ``(B, 1, C)`` and ``L`` ``(B, T, n)`` for the M-step; the score is ``cross − norm``.
    """
    weighted, stacked, q = _score_operands(batch, ramps, n)
    b, t = weighted.shape[:2]
    cross = (stacked @ projections.stacked.T).reshape(b, t, -1)
    norm = (q @ projections.power.T)[:, None, :]  # (B, 1, C)
    return cross, norm, weighted


def coarse_logits(
    batch: PreparedBatch,
    layout: ScoreProjections | HalfTurnProjections,
    ramps: torch.Tensor,
    n: int,
    row_term: torch.Tensor,
    class_term: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cross − norm + row_term + class_term`` ``(B, T, C)`` of B particles × T translations
    against the C projections of ``layout`` (K classes outer), and the norm term ``(B, C)``.

    Parameters
    ----------
    row_term
        ``(B, T)`` added to every projection's score (e.g. the translations' log prior).
    class_term
        ``(B, K)`` added to the scores of each class's projections, or None.
    out
        Flat buffer the scores are written into (its first B·T·C values), or None.
    """
    _, stacked, q = _score_operands(batch, ramps, n)
    b, t = row_term.shape
    norm = q @ layout.power.T  # (B, C), or (B, G·H) shared by the half-turn pairs
    shared = -norm if class_term is None else (class_term[:, :, None] - norm.view(b, class_term.shape[1], -1)).view(b, -1)
    if isinstance(layout, HalfTurnProjections):
        return layout.scores(stacked, shared, row_term, out), layout.with_turns(norm)
    n_columns = layout.stacked.shape[0]
    cross = stacked @ layout.stacked.T if out is None else torch.matmul(stacked, layout.stacked.T, out=out[: b * t * n_columns].view(b * t, n_columns))
    return cross.view(b, t, n_columns).add_(shared[:, None, :]).add_(row_term[:, :, None]), norm


def score_batch(
    batch: PreparedBatch, projections: torch.Tensor, ramps: torch.Tensor, n: int, scale: torch.Tensor | None = None, scale_sigma: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihoods ``(B, T, C)`` of B particles × T translations against C projections.

    With ``scale`` ``(B, C)`` each particle matches each projection at that intensity, under
    the prior ``N(1, σ²)`` of :func:`scaled_score`. Returns the scores without the ‖X‖²
    constant, and ``L`` ``(B, T, n)`` for the M-step.
    """
    cross, norm, weighted = score_terms(batch, ScoreProjections.of(projections), ramps, n)
    if scale is None:
        return cross.sub_(norm), weighted
    return scaled_score(cross, norm, scale[:, None, :], scale_sigma), weighted


def profiled_scale(cross: torch.Tensor, norm: torch.Tensor, scale_sigma: float) -> torch.Tensor:
    """The intensity ``a* = (c + p)/(2n + p)`` maximising :func:`scaled_score` (``p = 1/σ²``).

    Classes scored at their own best intensity compete on the shape of their maps rather than
    on an amplitude that, after a random start, mostly reflects how much junk each holds.
    """
    precision = 1.0 / scale_sigma**2
    return (cross + precision) / (2 * norm + precision)


def scaled_score(cross: torch.Tensor, norm: torch.Tensor, scale: torch.Tensor, scale_sigma: float) -> torch.Tensor:
    """``a·c − a²·n − (a − 1)²/2σ²``: the score of the projection scaled by ``a``, with the
    log prior ``N(1, σ²)`` of ``a``; computed in place on ``cross`` (the largest array)."""
    penalty = scale.square() * norm + (scale - 1).square() / (2 * scale_sigma**2)
    return cross.mul_(scale).sub_(penalty)


def _class_best(
    logits: torch.Tensor, norm: torch.Tensor, offset_prior: torch.Tensor, orientation_prior: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each class's best sample: its logit, and the cross and norm terms there, each ``(B, K)``.

    ``logits`` ``(B, T, K, W)`` are ``cross − norm`` plus the log priors ``offset_prior``
    ``(B, T)`` and ``orientation_prior`` ``(B, W)`` (None: flat; −inf: not searched); ``norm``
    is ``(B, K, W)``. The intensity of each particle and class is profiled there
    (:func:`profiled_scale`): one intensity per particle and class keeps the classes competing
    on shape, while wrong poses cannot make up part of their misfit through it, as they could
    with an intensity per pose.
    """
    per_shift, rotation = logits.max(dim=3)  # (B, T, K)
    best, shift = per_shift.max(dim=1)  # (B, K)
    rotation = rotation.gather(1, shift[:, None, :])[:, 0, :]  # (B, K)
    prior = offset_prior.gather(1, shift)
    if orientation_prior is not None:
        prior = prior + orientation_prior.gather(1, rotation)
    best_norm = norm.gather(2, rotation[..., None])[..., 0]
    return best, best - prior + best_norm, best_norm


_EXP_FLOOR = -80.0  # e^-80 ≈ 2e-35: negligible beside the largest term (1), and not denormal


def _offset_log_prior(origins_px: torch.Tensor, pixel_size_angstrom: float, sigma_angstrom: float) -> torch.Tensor:
    """Gaussian log prior of absolute origins ``(..., 2)`` in pixels."""
    return -(origins_px**2).sum(-1) * pixel_size_angstrom**2 / (2 * sigma_angstrom**2)


def _significant_count(posterior: torch.Tensor, fraction: float, cap: int) -> torch.Tensor:
    """``(B,)`` number of the fewest samples per row of ``posterior`` ``(B, S)`` holding
    ``fraction`` of its mass (≤ cap).

    Only the ``cap`` largest values per row can qualify, so a partial ``topk`` replaces a
    full sort of every row. Nor can a value below ``(1 − fraction)/S`` (S values per row): the
    values below it hold less than ``1 − fraction`` of a row's mass, so more than ``fraction``
    lies above each of them; the ``topk`` takes no more values than the fullest row has above
    that bound.
    """
    n_values = posterior.shape[-1]
    above = int((posterior >= (1.0 - fraction) / n_values).sum(-1).max()) if posterior.numel() else 0
    ordered = torch.topk(posterior, min(cap, n_values, max(1, above)), dim=-1).values
    before = ordered.cumsum(-1) - ordered  # mass strictly above each sample
    return (before < fraction).sum(-1)


def _top_logits(logits: torch.Tensor, cap: int, floor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``C = min(cap, T·P)`` largest of ``logits`` ``(B, T, P)`` (T translations × P
    class-orientation pairs) per row, largest first ``(B, C)``, their flat positions ``t·P + p``
    ``(B, C)``, and the log of the row's softmax normaliser ``(B, 1)`` (−inf for a row of −inf).

    With ``floor`` ``(B, 1)``, the ``cap``-th largest value of each row found elsewhere, only
    the samples above it are sure to be returned (fewer may be, and others with them).
    ``logits`` is left as it is.
    """
    b, t, p = logits.shape
    # the C largest samples lie in the C pairs whose maxima over translations are largest: a
    # sample outside them is below C pair maxima, i.e. below C other samples. Top-k over the
    # pairs' maxima and then over their C·T samples costs half a top-k over all T·P samples.
    # Above a floor, only the pairs whose maxima exceed it are needed
    maxima = logits.amax(dim=1)  # (B, P)
    n_pairs = min(cap, p)
    if floor is not None:
        n_pairs = max(1, min(n_pairs, int((maxima > floor).sum(-1).max())))
    pair_maxima, pairs = torch.topk(maxima, n_pairs, dim=-1)  # (B, Pc)
    candidates = logits.gather(2, pairs[:, None, :].expand(b, t, -1)).reshape(b, -1)  # (B, T·Pc)
    top, position = torch.topk(candidates, min(cap, candidates.shape[1]), dim=-1)
    order = position // pairs.shape[1] * p + pairs.gather(1, position % pairs.shape[1])
    # the softmax normaliser Σ e^(x − peak) from the row maxima that top-k found. Its terms
    # below e^-80 change the sum by less than float precision; clamped, exp avoids its slow
    # path for very negative arguments (several times slower on CPU). Nor do the pairs left
    # out of the candidates where their maxima lie at least `bound` below the peak: each of
    # their fewer than T·P terms is then below 2^-24/(T·P), together below half a unit in
    # the last place of the sum (≥ 1). There the candidates' terms are the sum; elsewhere
    # (broad posteriors) the terms of every pair whose maximum lies within `bound` of the
    # peak are, gathered from the row (a tenth of a broad row's pairs on the benchmark set)
    peak = top[:, :1]
    bound = math.log(t * p) + 24 * math.log(2)
    total = candidates.sub_(peak).clamp_(min=_EXP_FLOOR).exp_().sum(-1, keepdim=True)
    broad = (pair_maxima[:, -1:] > peak - bound).nonzero()[:, 0] if n_pairs < p else pairs.new_empty(0)
    if broad.numel():
        row, pair = (maxima[broad] > peak[broad] - bound).nonzero(as_tuple=True)
        terms = logits[broad[row], :, pair].sub_(peak[broad[row]]).clamp_(min=_EXP_FLOOR).exp_().sum(-1)  # (near pairs,)
        total[broad] = torch.zeros(broad.shape[0], dtype=total.dtype, device=total.device).index_add_(0, row, terms)[:, None]
    return top, order, torch.where(torch.isfinite(peak), peak + total.log(), -math.inf)


def _significant(top: torch.Tensor, log_normaliser: torch.Tensor, fraction: float) -> torch.Tensor:
    """``(B, C)`` which of the largest logits ``top`` ``(B, C)`` (largest first) of rows with
    softmax normaliser ``exp(log_normaliser)`` ``(B, 1)`` are among the fewest samples holding
    ``fraction`` of the row's mass."""
    posterior = torch.exp(top - log_normaliser)
    return (posterior.cumsum(-1) - posterior) < fraction


def expectation(
    batch: PreparedBatch,
    volumes_ft: torch.Tensor,
    coarse_projections: CoarseProjections | None,
    grid: PoseGrid | None,
    fine_projections: FinePassCache | None,
    log_class_prior: torch.Tensor,
    offset_sigma_angstrom: float,
    settings: EStepSettings,
    forced_class: torch.Tensor | None = None,
    class_offset: torch.Tensor | PassOffsets | None = None,
    unrefined_projections: FinePassCache | None = None,
    timer: PhaseTimer | None = None,
) -> EStepResult:
    """Posteriors and M-step sums for one batch.

    Parameters
    ----------
    batch
        Prepared particles.
    volumes_ft
        ``(K, P, P, P // 2 + 1)`` prepared Fourier volumes (projected at the fixed poses
        without alignment).
    coarse_projections
        Projections along the grid's coarse orientations, ``n_coarse`` components (alignment
        only), shared by the batches of an iteration.
    grid
        The pose grid (alignment only).
    fine_projections
        Projections of the grid's oversampled orientations and slice sums (alignment only),
        shared by the batches of an iteration; drain its sums at the end of the iteration.
    log_class_prior
        ``(K,)`` log class weights.
    offset_sigma_angstrom
        Width of the origin prior.
    forced_class
        ``(B,)`` class per particle to assign instead of its posterior (RELION's random
        initial split of identical references), or None.
    class_offset
        ``(B, K)`` per-particle additions to each class's cross term (the self-fit discount),
        or None; with alignment a :class:`PassOffsets` gives each pass its own. Like the cross
        term they are multiplied by the class's intensity when one is profiled
        (``settings.scale_sigma``), since that is how much of them the score holds.
    unrefined_projections
        Full-resolution projections and slice sums of the coarse samples themselves (a cache
        over ``grid.without_oversampling()``), for the particles that
        ``settings.max_significant_oversampled`` exempts from oversampling; drain it at the
        end of the iteration too. Needed when that limit is set, unused when it is None.
    timer
        With alignment, charged with the ``"coarse pass"`` (the local neighbourhood too) and
        the ``"fine pass"``, or None.
    """
    per_particle_prior = log_class_prior[None, :].expand(batch.spectra.shape[0], -1)
    if not settings.align:
        if isinstance(class_offset, PassOffsets):
            raise ValueError("without alignment class_offset is one (B, K) tensor")
        return _expectation_fixed_pose(batch, volumes_ft, per_particle_prior, settings, forced_class, class_offset)
    if isinstance(class_offset, torch.Tensor):
        raise ValueError("with alignment class_offset is a PassOffsets: each pass holds a different share of the cross term")
    offsets = class_offset
    assert grid is not None and coarse_projections is not None and fine_projections is not None
    n_classes = volumes_ft.shape[0]
    class_mask = _class_mask(forced_class, batch.spectra.shape[0], n_classes, batch.spectra.device)
    n_coarse = settings.n_coarse
    frequencies = settings.frequencies
    ramps_coarse = phase_ramps(grid.coarse_shifts_px, frequencies[:n_coarse], settings.box_size)
    n_rot = grid.n_rotations
    orientation_prior = None
    searched_rotations = None
    if settings.local_sigma_deg is not None:
        local = local_search(grid, batch.prior_euler_deg, settings.local_sigma_deg)
        searched_rotations, orientation_prior = local.rotations, local.log_prior  # (U,), (B, U)
    n_scored = n_rot if searched_rotations is None else searched_rotations.shape[0]
    origins = batch.prior_origin_px[:, None, :] + grid.coarse_shifts_px[None]  # (B, T, 2)
    offset_prior = _offset_log_prior(origins, settings.pixel_size_angstrom, offset_sigma_angstrom).float()  # (B, T)
    if searched_rotations is None:
        pieces = functools.partial(coarse_projections.pieces, settings.coarse_piece_rotations)
    else:
        local_layout = coarse_projections.scoring(searched_rotations)
        pieces = functools.partial(iter, [(0, n_scored, local_layout)])
    order, valid, class_scale = _coarse_pass(
        batch,
        pieces,
        n_scored,
        ramps_coarse,
        settings,
        offset_prior,
        None if orientation_prior is None else orientation_prior.float(),
        None if offsets is None or offsets.coarse is None else offsets.coarse.float(),
        torch.where(class_mask, per_particle_prior, -math.inf).float(),
        coarse_projections.score_buffer,
    )
    if timer is not None:
        timer.lap("coarse pass")
    b = order.shape[0]
    significant = SignificantSamples(order, valid, n_classes * n_scored, n_rot if searched_rotations is None else searched_rotations)
    best_pair = order[:, 0] % significant.n_pairs  # class · U + scored orientation
    broad = torch.zeros(b, dtype=torch.bool, device=best_pair.device)
    if settings.max_significant_oversampled is not None:
        if unrefined_projections is None:
            raise ValueError("settings.max_significant_oversampled needs unrefined_projections (a FinePassCache over grid.without_oversampling())")
        broad = valid.sum(-1) > settings.max_significant_oversampled
    results, parts = [], []
    passes = (
        ((~broad).nonzero()[:, 0], fine_projections, None if offsets is None else offsets.fine),
        (broad.nonzero()[:, 0], unrefined_projections, None if offsets is None else offsets.unrefined),
    )
    for members, cache, offset in passes:
        if not members.numel():
            continue
        assert cache is not None
        # in order of their number of significant samples, and among equal numbers of their
        # best coarse orientations: a sub-batch holds lists of similar lengths, and particles
        # whose best orientations are neighbours, which share most samples
        order = valid[members].sum(-1) * significant.n_pairs + best_pair[members]
        members = members[torch.argsort(order, stable=True)]
        prior = per_particle_prior[members]
        if offset is not None:
            # the fine pass adds them after scaling its scores
            prior = prior + offset[members] * (1.0 if class_scale is None else class_scale[members])
        results.append(
            _fine_pass(
                batch.select(members),
                cache,
                significant.select(members),
                prior,
                offset_sigma_angstrom,
                settings,
                class_mask[members],
                None if class_scale is None else class_scale[members],
            )
        )
        parts.append(members)
    if timer is not None:
        timer.lap("fine pass")
    return _concatenate(results).select(torch.argsort(torch.cat(parts)))


def _coarse_pass(
    batch: PreparedBatch,
    pieces: Callable[[], Iterator[tuple[int, int, ScoreProjections | HalfTurnProjections]]],
    n_scored: int,
    ramps: torch.Tensor,
    settings: EStepSettings,
    offset_prior: torch.Tensor,
    orientation_prior: torch.Tensor | None,
    coarse_offset: torch.Tensor | None,
    class_bias: torch.Tensor,
    scores: Callable[[int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The coarse pass of B particles: their ``max_significant`` best samples and which of
    them are significant, and each particle's intensity per class (None without a scale).

    The ``U = n_scored`` orientations arrive in pieces ``(first, W, layout (K·W, ·))`` from
    ``pieces()``; each piece's scores ``(B, T, K·W)`` are reduced to their best samples and
    their softmax normaliser before the next is scored, so that no more than one piece's are
    held, and the result is the one that scoring all U at once gives. With an intensity scale
    (``settings.scale_sigma``) each class's best sample is found first, so several pieces are
    scored twice.

    Parameters
    ----------
    ramps
        ``(T, n)`` the coarse translations' phase ramps.
    offset_prior
        ``(B, T)`` log prior of each translation.
    orientation_prior
        ``(B, U)`` log prior of each scored orientation (−inf: not searched), or None (flat).
    coarse_offset
        ``(B, K)`` additions to each class's cross term, or None.
    class_bias
        ``(B, K)`` log class prior, −inf for a class a particle may not take.
    scores
        Gives a flat buffer of at least the number of floats asked for (``B·T·K·W`` for a
        piece of W orientations), into which each piece's scores are written in turn (e.g.
        :meth:`CoarseProjections.score_buffer`); None: fresh ones.

    Returns
    -------
    order, valid
        ``(B, C)`` positions ``t·K·U + k·U + u`` of the best samples, largest first, and which
        are significant.
    class_scale
        ``(B, K)`` or None.
    """
    n_classes = class_bias.shape[1]
    b, t = class_bias.shape[0], ramps.shape[0]

    def score(
        start: int, width: int, layout: ScoreProjections | HalfTurnProjections, bias: torch.Tensor | None
    ) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A piece's logits ``cross − norm`` + priors (+ ``bias`` ``(B, K)`` where given)
        ``(B, T, K, W)``, norms ``(B, K, W)`` and orientation prior."""
        out = None if scores is None else scores(b * t * n_classes * width)
        class_term = coarse_offset if bias is None else (bias if coarse_offset is None else coarse_offset + bias)
        logits, norm = coarse_logits(batch, layout, ramps, settings.n_coarse, offset_prior, class_term, out)
        logits = logits.view(b, t, n_classes, width)
        prior = None if orientation_prior is None else orientation_prior[:, start : start + width]
        if prior is not None:
            logits.add_(prior[:, None, None, :])
        return start, width, logits, norm.view(b, n_classes, width), prior

    class_scale = None
    kept = None
    if settings.scale_sigma > 0:
        best = torch.full((b, n_classes), -math.inf, device=class_bias.device)
        cross_best, norm_best = torch.zeros_like(best), torch.ones_like(best)
        for start, width, layout in pieces():
            scored = score(start, width, layout, None)
            piece_best, piece_cross, piece_norm = _class_best(*scored[2:4], offset_prior, scored[4])
            better = piece_best > best
            best, cross_best, norm_best = torch.where(better, piece_best, best), torch.where(better, piece_cross, cross_best), torch.where(better, piece_norm, norm_best)
            # a single piece is not scored again
            kept = scored if width == n_scored else None
        class_scale = profiled_scale(cross_best, norm_best, settings.scale_sigma).clamp(min=1e-3)
    # without an intensity the class prior is added with the other priors
    sweep = iter([kept]) if kept is not None else (score(*piece, None if class_scale is not None else class_bias) for piece in pieces())
    top = order = log_normaliser = None
    for start, width, logits, norm, prior in sweep:
        if class_scale is not None:
            # a·(c − n) + (a − a²)·n − (a − 1)²/2σ² + priors, from logits = c − n + priors;
            # a > 0 keeps the unsearched orientations at −inf
            a = class_scale[:, None, :, None]
            logits.mul_(a).sub_((a - 1) * offset_prior[:, :, None, None])
            if prior is not None:
                logits.sub_((a - 1) * torch.where(torch.isfinite(prior), prior, 0)[:, None, None, :])
            logits.add_((a - a.square()) * norm[:, None] - (a - 1).square() / (2 * settings.scale_sigma**2))
            logits.add_(class_bias[:, None, :, None])
        # once the best samples so far are full, only the piece's samples above the last of
        # them can take its place
        floor = top[:, -1:] if top is not None and top.shape[1] == settings.max_significant else None
        piece_top, piece_order, piece_normaliser = _top_logits(logits.reshape(b, t, -1), settings.max_significant, floor)
        if width != n_scored:
            # positions among the piece's (T, K·W) samples → among the search's (T, K·U)
            shift, pair = piece_order // (n_classes * width), piece_order % (n_classes * width)
            piece_order = shift * (n_classes * n_scored) + pair // width * n_scored + start + pair % width
        if top is None or order is None or log_normaliser is None:
            top, order, log_normaliser = piece_top, piece_order, piece_normaliser
            continue
        top, at = torch.topk(torch.cat([top, piece_top], dim=1), min(settings.max_significant, top.shape[1] + piece_top.shape[1]), dim=-1)
        order = torch.cat([order, piece_order], dim=1).gather(1, at)
        log_normaliser = torch.logaddexp(log_normaliser, piece_normaliser)
    assert top is not None and order is not None and log_normaliser is not None
    return order, _significant(top, log_normaliser, settings.significance), class_scale


def _class_mask(forced_class: torch.Tensor | None, n: int, n_classes: int, device: torch.device) -> torch.Tensor:
    """``(B, K)`` classes each particle may belong to."""
    if forced_class is None:
        return torch.ones(n, n_classes, dtype=torch.bool, device=device)
    return torch.nn.functional.one_hot(forced_class, n_classes).bool()


# Rough CPU costs (seconds) of what the two ways of scoring a fine sub-batch do, from their
# times on the benchmark set (docs/benchmarks.md): a multiply-add in one large GEMM, one in
# the small products of each particle's own samples, a float gathered into their operands,
# and the element-wise work per score
_GEMM_MAC_S, _SMALL_MAC_S, _GATHERED_FLOAT_S, _SCORE_S = 1.3e-11, 7e-11, 5e-10, 3e-9


def _fine_pass(
    batch: PreparedBatch,
    fine_projections: FinePassCache,
    significant: SignificantSamples,
    log_class_prior: torch.Tensor,
    offset_sigma_angstrom: float,
    settings: EStepSettings,
    class_mask: torch.Tensor,
    class_scale: torch.Tensor | None,
) -> EStepResult:
    """Rescore the children (``fine_projections.grid``) of the significant coarse samples, in
    sub-batches.

    A sub-batch either scores its particles against the union of their significant samples
    (:func:`_fine_sub_batch`: one dense GEMM, wasteful where each particle holds a few
    samples of a wide union) or each particle against its own samples only
    (:func:`_own_samples_sub_batch`: gathered operands, wasteful where particles share
    most samples), whichever the cost estimates say is cheaper per particle, and grows
    while its work arrays fit ``settings.memory_budget_bytes``. The sub-batches' weighted
    slices are summed per fine orientation in ``fine_projections``; the result carries only
    the slices that its table handed back for insertion.
    """
    grid = fine_projections.grid
    results: list[EStepResult] = []
    sums: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    n_particles = significant.index.shape[0]
    n_sub_shift, n_children = grid.fine_shifts_px.shape[1], grid.n_children
    n_sub = n_sub_shift * n_children
    n_components = settings.frequencies.shape[0]
    start, window_size = 0, 16
    while start < n_particles:
        # union sizes (from first occurrences) and longest lists (running maxima) of every
        # prefix of the next particles, over a window that follows the size of the last sub-batch
        window = significant.select(slice(start, min(n_particles, start + window_size)))
        union_pairs, union_shifts = (growth.double() for growth in window.union_growth(grid.coarse_shifts_px.shape[0]))  # (w,), (w,)
        longest = window.valid.sum(-1).cummax(dim=0).values.double()
        count = torch.arange(1, union_pairs.shape[0] + 1, device=union_pairs.device, dtype=torch.float64)
        union_bytes = 4.0 * (count * union_shifts * (union_pairs * n_sub + 4 * n_components) + union_pairs * n_sub * 6 * n_components)
        own_bytes = 4.0 * count * longest * ((n_sub_shift + 2 * n_children) * 2 * n_components + 4 * n_sub + 40 * n_children)
        union_seconds = count * union_shifts * union_pairs * n_sub * (2 * n_components * _GEMM_MAC_S + _SCORE_S)
        own_seconds = count * longest * ((n_sub_shift + n_children) * 2 * n_components * _GATHERED_FLOAT_S + n_sub * (2 * n_components * _SMALL_MAC_S + _SCORE_S))
        union_size = max(1, int((union_bytes <= settings.memory_budget_bytes).sum()))
        own_size = max(1, int((own_bytes <= settings.memory_budget_bytes).sum()))
        own = float(own_seconds[own_size - 1]) / own_size < float(union_seconds[union_size - 1]) / union_size
        stop = start + (own_size if own else union_size)
        window_size = max(16, 4 * (stop - start))
        index = torch.arange(start, stop, device=union_pairs.device)
        result, slice_sums = (_own_samples_sub_batch if own else _fine_sub_batch)(
            batch.select(index),
            fine_projections,
            significant.select(slice(start, stop)),
            log_class_prior[start:stop],
            offset_sigma_angstrom,
            settings,
            class_mask[start:stop],
            None if class_scale is None else class_scale[start:stop],
        )
        results.append(result)
        sums.append(slice_sums)
        start = stop
    result = _concatenate(results)
    result.slices = [item for ids, data, weight in sums for item in fine_projections.add(ids, data, weight)]
    return result


def _fine_sub_batch(
    batch: PreparedBatch,
    fine_projections: FinePassCache,
    significant: SignificantSamples,
    log_class_prior: torch.Tensor,
    offset_sigma_angstrom: float,
    settings: EStepSettings,
    class_mask: torch.Tensor,
    class_scale: torch.Tensor | None,
) -> tuple[EStepResult, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Posteriors of one sub-batch, and its slice sums ``(ids, data, weight)`` per fine id;
    ``class_scale`` ``(b, K)`` is each particle's intensity per class (None: 1)."""
    device = batch.spectra.device
    grid = fine_projections.grid
    n_classes = class_mask.shape[1]
    box = settings.box_size
    frequencies = settings.frequencies
    n = frequencies.shape[0]
    b = significant.index.shape[0]
    n_sub_shift = grid.fine_shifts_px.shape[1]
    n_rot, n_sub_rot = grid.n_rotations, grid.n_children
    shift_used, pairs, allowed = significant.union()  # (Tu,), (Uc,), (b, Tu, Uc)
    pair_used = torch.stack(significant.class_and_rotation(pairs), dim=-1)  # (Uc, 2) (class, coarse rotation)
    fine_shifts = grid.fine_shifts_px[shift_used].reshape(-1, 2)  # (Tu·S, 2)
    fine_euler = grid.children_euler_deg(pair_used[:, 1]).reshape(-1, 3)  # (Uc·F, 3)
    fine_matrices = grid.children_matrices64(pair_used[:, 1]).reshape(-1, 3, 3)  # (Uc·F, 3, 3) float64
    fine_class = pair_used[:, 0].repeat_interleave(n_sub_rot)  # (Uc·F,)
    fine_id = ((pair_used[:, 0] * n_rot + pair_used[:, 1])[:, None] * n_sub_rot + torch.arange(n_sub_rot, device=device)).reshape(-1)
    projections = fine_projections.projections(pair_used[:, 0], pair_used[:, 1]).reshape(-1, n)  # (Uc·F, n)
    ramps = phase_ramps(fine_shifts, frequencies, box)
    scale = None if class_scale is None else class_scale[:, fine_class]
    scores, weighted = score_batch(batch, projections, ramps, n, scale, settings.scale_sigma)  # (b, Tu·S, Uc·F), (b, Tu·S, n)
    allowed = allowed[:, :, None, :, None].expand(b, -1, n_sub_shift, -1, n_sub_rot).reshape(b, fine_shifts.shape[0], -1)
    allowed = allowed & class_mask[:, fine_class][:, None, :]
    origins = batch.prior_origin_px[:, None, :] + fine_shifts[None]  # (b, Tf, 2)
    # priors added in place: the scores are the largest array of the fine pass
    logits = scores.add_(log_class_prior[:, fine_class][:, None, :])
    logits.add_(_offset_log_prior(origins, settings.pixel_size_angstrom, offset_sigma_angstrom)[:, :, None])
    if settings.local_sigma_deg is not None:
        angles = pairwise_matrix_angle_deg(euler_deg_to_matrix(batch.prior_euler_deg.double()), fine_matrices, grid.symmetry_matrices)
        logits.sub_((angles**2 / (2 * settings.local_sigma_deg**2))[:, None, :].to(logits.dtype))
    posterior, log_evidence = _posterior_in_place(logits, allowed)  # (b, Tf, Rf), (b,)

    best = posterior.reshape(b, -1).argmax(dim=-1)
    best_shift, best_rot = best // logits.shape[2], best % logits.shape[2]
    best_euler = fine_euler[best_rot]
    rotation_posterior = posterior.sum(1)  # (b, Rf)
    angles_to_best = pairwise_matrix_angle_deg(fine_matrices[best_rot], fine_matrices, grid.symmetry_matrices)  # (b, Rf)
    spread = torch.sqrt((rotation_posterior * angles_to_best.to(rotation_posterior.dtype) ** 2).sum(-1))
    class_posterior = torch.zeros(b, n_classes, dtype=posterior.dtype, device=device).index_add_(1, fine_class, rotation_posterior)

    # M-step sums: Σ_{i,t} w·L per fine orientation, Σ_i (Σ_t w)·2Q per fine orientation,
    # over the orientations carrying a visible share of some particle's posterior
    active = (rotation_posterior.amax(0) > 1e-4).nonzero()[:, 0]
    weights = posterior[:, :, active].permute(2, 0, 1).reshape(active.numel(), -1)  # (Ra, b·Tf)
    data = torch.complex(weights @ weighted.real.reshape(-1, n), weights @ weighted.imag.reshape(-1, n))
    weight = rotation_posterior[:, active].T @ batch.ctf_weight()  # (Ra, n)
    result = EStepResult(
        best_class=fine_class[best_rot],
        best_euler_deg=best_euler.double(),
        best_origin_px=batch.prior_origin_px + fine_shifts[best_shift],
        max_posterior=posterior.reshape(b, -1).max(dim=-1).values,
        n_significant=_significant_count(posterior.reshape(b, -1), settings.significance, settings.max_significant * n_sub_rot * n_sub_shift),
        log_likelihood=log_evidence - batch.image_norm(),
        class_posterior=class_posterior,
        angular_spread_deg=spread,
        best_projections=projections[best_rot],
        slices=[],
    )
    return result, (fine_id[active], data, weight)


def _own_samples_sub_batch(
    batch: PreparedBatch,
    fine_projections: FinePassCache,
    significant: SignificantSamples,
    log_class_prior: torch.Tensor,
    offset_sigma_angstrom: float,
    settings: EStepSettings,
    class_mask: torch.Tensor,
    class_scale: torch.Tensor | None,
) -> tuple[EStepResult, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`_fine_sub_batch` scoring each particle against the children of its own
    significant samples only, rather than of their union over the sub-batch.

    A particle's ``c`` significant (translation, class-orientation) samples, padded to the
    longest list of the sub-batch, each give an ``S × F`` block of scores (sub-translations ×
    children): ``b·c`` small products ``(S, 2n) @ (2n, F)``. Where each particle holds a few
    samples of a wide union this computes a small share of the union's scores.
    """
    device = batch.spectra.device
    grid = fine_projections.grid
    n_classes = class_mask.shape[1]
    frequencies = settings.frequencies
    n = frequencies.shape[0]
    b = significant.index.shape[0]
    n_sub_shift, n_sub_rot = grid.fine_shifts_px.shape[1], grid.n_children
    n_rot = grid.n_rotations
    # each particle's significant samples first (the best is always one), padded with its best
    width = int(significant.valid.sum(-1).max())
    first = torch.argsort((~significant.valid).to(torch.uint8), dim=1, stable=True)[:, :width]
    present = significant.valid.gather(1, first)  # (b, c)
    index = torch.where(present, significant.index.gather(1, first), significant.index[:, :1])
    shift, pair = index // significant.n_pairs, index % significant.n_pairs  # (b, c)
    pair_used, pair_at = torch.unique(pair, return_inverse=True)  # (Uc,), (b, c)
    shift_used, shift_at = torch.unique(shift, return_inverse=True)  # (Tu,), (b, c)
    classes, rotations = significant.class_and_rotation(pair_used)
    table = fine_projections.projections(classes, rotations)  # (Uc, F, n)
    fine_euler = grid.children_euler_deg(rotations)  # (Uc, F, 3)
    fine_shifts = grid.fine_shifts_px[shift_used]  # (Tu, S, 2)
    weighted, _, q = _score_operands(batch, phase_ramps(fine_shifts.reshape(-1, 2), frequencies, settings.box_size), n)
    # real and imaginary parts interleaved: Σ Re(conj(L)·P) is the dot product of the two
    n_shifts = shift_used.shape[0]
    each_shift = torch.arange(b, device=device)[:, None] * n_shifts + shift_at  # (b, c) rows of (b·Tu, S, 2n)
    rows = fine_projections.gathers.rows("rows", torch.view_as_real(weighted).view(b * n_shifts, n_sub_shift, 2 * n), each_shift)  # (b, c, S, 2n)
    columns = fine_projections.gathers.rows("columns", torch.view_as_real(table).view(-1, n_sub_rot, 2 * n), pair_at)  # (b, c, F, 2n)
    cross = torch.matmul(rows, columns.transpose(-1, -2))  # (b, c, S, F)
    norm = (q @ squared_magnitude(table).reshape(-1, n).T).view(b, -1, n_sub_rot)  # (b, Uc, F)
    norm = norm.gather(1, pair_at[:, :, None].expand(-1, -1, n_sub_rot))[:, :, None, :]  # (b, c, 1, F)
    entry_class = classes[pair_at]  # (b, c)
    if class_scale is None:
        logits = cross.sub_(norm)
    else:
        logits = scaled_score(cross, norm, class_scale.gather(1, entry_class)[:, :, None, None], settings.scale_sigma)
    origins = batch.prior_origin_px[:, None, None, :] + fine_shifts[shift_at]  # (b, c, S, 2)
    logits.add_(log_class_prior.gather(1, entry_class)[:, :, None, None])
    logits.add_(_offset_log_prior(origins, settings.pixel_size_angstrom, offset_sigma_angstrom)[..., None])
    entry_matrices = grid.children_matrices64(rotations)[pair_at]  # (b, c, F, 3, 3) float64
    if settings.local_sigma_deg is not None:
        angles = rowwise_matrix_angle_deg(euler_deg_to_matrix(batch.prior_euler_deg.double()), entry_matrices, grid.symmetry_matrices)
        logits.sub_((angles**2 / (2 * settings.local_sigma_deg**2))[:, :, None, :].to(logits.dtype))
    allowed = (present & class_mask.gather(1, entry_class))[:, :, None, None]  # (b, c, 1, 1)
    posterior, log_evidence = _posterior_in_place(logits, allowed)  # (b, c, S, F), (b,)

    best = posterior.view(b, -1).argmax(dim=-1)
    best_entry, best_sub_shift, best_child = best // (n_sub_shift * n_sub_rot), best // n_sub_rot % n_sub_shift, best % n_sub_rot
    particles = torch.arange(b, device=device)
    best_pair = pair_at[particles, best_entry]
    best_euler = fine_euler[best_pair, best_child]
    entry_posterior = posterior.sum(2)  # (b, c, F)
    angles_to_best = rowwise_matrix_angle_deg(entry_matrices[particles, best_entry, best_child], entry_matrices, grid.symmetry_matrices)
    spread = torch.sqrt((entry_posterior * angles_to_best.to(entry_posterior.dtype) ** 2).sum((1, 2)))
    class_posterior = torch.zeros(b, n_classes, dtype=posterior.dtype, device=device).scatter_add_(1, entry_class, entry_posterior.sum(-1))

    # M-step sums per fine orientation (class·R + coarse orientation)·F + child, over the
    # orientations where some particle holds a visible share of its posterior (summed over
    # the entries that reach it from several translations)
    entry_id = (((classes * n_rot + rotations) * n_sub_rot)[:, None] + torch.arange(n_sub_rot, device=device))[pair_at]  # (b, c, F)
    particle_id, held = torch.unique((particles[:, None, None] * (n_classes * n_rot * n_sub_rot) + entry_id).reshape(-1), return_inverse=True)
    mass = torch.zeros(particle_id.shape[0], dtype=posterior.dtype, device=device).index_add_(0, held, entry_posterior.reshape(-1))
    ids, id_of = torch.unique(particle_id % (n_classes * n_rot * n_sub_rot), return_inverse=True)
    largest = torch.zeros(ids.shape[0], dtype=posterior.dtype, device=device).scatter_reduce_(0, id_of, mass, "amax")
    active_ids = largest > 1e-4
    entry_active = active_ids[id_of[held]].view(b, -1, n_sub_rot).any(-1) & present  # (b, c): entries with an active child
    chosen = entry_active.nonzero()
    chosen_entry = chosen[:, 0] * width + chosen[:, 1]  # (E,) rows of (b·c, ...)
    chosen_weights = fine_projections.gathers.rows("chosen weights", posterior.view(b * width, n_sub_shift, n_sub_rot), chosen_entry).transpose(-1, -2)  # (E, F, S)
    sums = torch.matmul(chosen_weights, fine_projections.gathers.rows("chosen rows", rows.view(b * width, n_sub_shift, 2 * n), chosen_entry))  # (E, F, 2n)
    two_q = batch.ctf_weight()  # (b, n)
    chosen_ids = entry_id[chosen[:, 0], chosen[:, 1]].reshape(-1)  # (E·F,)
    keep = active_ids[torch.searchsorted(ids, chosen_ids)]
    out_ids, out_of = torch.unique(chosen_ids[keep], return_inverse=True)
    data = torch.zeros(out_ids.shape[0], 2 * n, dtype=sums.dtype, device=device).index_add_(0, out_of, sums.reshape(-1, 2 * n)[keep])
    weight = torch.zeros(out_ids.shape[0], n, dtype=sums.dtype, device=device).index_add_(
        0, out_of, (entry_posterior[chosen[:, 0], chosen[:, 1]].reshape(-1, 1) * two_q[chosen[:, 0]].repeat_interleave(n_sub_rot, 0))[keep]
    )
    result = EStepResult(
        best_class=classes[best_pair],
        best_euler_deg=best_euler.double(),
        best_origin_px=batch.prior_origin_px + fine_shifts[shift_at[particles, best_entry], best_sub_shift],
        max_posterior=posterior.view(b, -1).max(dim=-1).values,
        n_significant=_significant_count(posterior.view(b, -1), settings.significance, settings.max_significant * n_sub_rot * n_sub_shift),
        log_likelihood=log_evidence - batch.image_norm(),
        class_posterior=class_posterior,
        angular_spread_deg=spread,
        best_projections=table[best_pair, best_child],
        slices=[],
    )
    return result, (out_ids, torch.view_as_complex(data.view(-1, n, 2)), weight)


def _posterior_in_place(logits: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's softmax of ``logits`` ``(b, ...)`` (a contiguous array, overwritten: the logits
    are not needed again) over the samples ``allowed`` (broadcastable), the others exactly
    zero, and each row's log normaliser ``(b,)``."""
    b = logits.shape[0]
    logits.masked_fill_(~allowed, -math.inf)
    flat = logits.view(b, -1)
    peak = flat.amax(dim=-1, keepdim=True)
    # clamped as in _top_logits; the masked samples set back to exactly zero
    flat.sub_(peak).clamp_(min=_EXP_FLOOR).exp_()
    logits.masked_fill_(~allowed, 0.0)
    total = flat.sum(-1, keepdim=True)
    return flat.div_(total).view(logits.shape), (peak + total.log())[:, 0]


def _expectation_fixed_pose(
    batch: PreparedBatch,
    volumes_ft: torch.Tensor,
    log_class_prior: torch.Tensor,
    settings: EStepSettings,
    forced_class: torch.Tensor | None,
    class_offset: torch.Tensor | None,
) -> EStepResult:
    """Classification without alignment: one orientation and translation per particle;
    ``class_offset`` ``(b, K)`` is added to the cross terms (None: nothing)."""
    device = batch.spectra.device
    n_classes = volumes_ft.shape[0]
    frequencies = settings.frequencies
    b, n = batch.spectra.shape
    rotations = euler_deg_to_matrix(batch.prior_euler_deg).float()
    projections = extract_slices(volumes_ft, rotations, frequencies, settings.box_size, settings.memory_budget_bytes, settings.padded_size)  # (K, b, n)
    weighted = batch.spectra * batch.ctf_factor()  # L (b, n)
    two_q = batch.ctf_weight()
    q = 0.5 * two_q
    # diagonal of the same GEMMs: each particle against its own orientation only
    cross = torch.einsum("bn,kbn->bk", weighted.real, projections.real) + torch.einsum("bn,kbn->bk", weighted.imag, projections.imag)
    norm = torch.einsum("bn,kbn->bk", q, squared_magnitude(projections))
    if class_offset is not None:
        cross = cross + class_offset
    if settings.scale_sigma > 0:
        cross = scaled_score(cross, norm, profiled_scale(cross, norm, settings.scale_sigma), settings.scale_sigma)
    else:
        cross = cross.sub_(norm)
    logits = cross + log_class_prior
    logits = torch.where(_class_mask(forced_class, b, n_classes, device), logits, -math.inf)
    log_evidence = torch.logsumexp(logits, dim=-1)
    posterior = torch.exp(logits - log_evidence[:, None])  # (b, K)
    if settings.target_class_ess is not None and forced_class is None:
        posterior = torch.softmax(class_temperature(logits, settings.target_class_ess) * logits, dim=-1)
    best = posterior.argmax(dim=-1)
    if settings.hard_classification:
        posterior = torch.nn.functional.one_hot(best, n_classes).to(posterior.dtype)
    # classes holding a negligible share of a particle's posterior add nothing visible
    slices = [
        WeightedSlices(k, rotations[members], posterior[members, k, None] * weighted[members], posterior[members, k, None] * two_q[members])
        for k in range(n_classes)
        if (members := (posterior[:, k] > 1e-4).nonzero()[:, 0]).numel()
    ]
    return EStepResult(
        best_class=best,
        best_euler_deg=batch.prior_euler_deg,
        best_origin_px=batch.prior_origin_px,
        max_posterior=posterior.max(dim=-1).values,
        n_significant=_significant_count(posterior, settings.significance, n_classes),
        log_likelihood=log_evidence - batch.image_norm(),
        class_posterior=posterior,
        angular_spread_deg=torch.zeros(b, dtype=posterior.dtype, device=device),
        best_projections=projections.permute(1, 0, 2)[torch.arange(b, device=device), best],
        slices=slices,
    )


def class_ess(posterior: torch.Tensor) -> torch.Tensor:
    """``(B,)`` effective number of classes ``1/Σ_k p_k²`` of posteriors ``(B, K)``."""
    return 1.0 / (posterior.double() ** 2).sum(-1)


def class_temperature(logits: torch.Tensor, target_ess: float, steps: int = 40) -> float:
    """The largest ``τ ≤ 1`` at which ``softmax(τ·logits)`` has a mean class ESS ≥ ``target_ess``.

    The mean ESS falls as τ grows (from K at τ = 0), so τ is found by bisection on ``log τ``.
    """
    finite = torch.where(torch.isfinite(logits), logits, torch.finfo(logits.dtype).min).double()
    if float(class_ess(torch.softmax(finite, dim=-1)).mean()) >= target_ess:
        return 1.0
    low, high = -30.0, 0.0  # log τ: ESS(low) ≥ target > ESS(high)
    for _ in range(steps):
        middle = 0.5 * (low + high)
        if float(class_ess(torch.softmax(math.exp(middle) * finite, dim=-1)).mean()) >= target_ess:
            low = middle
        else:
            high = middle
    return math.exp(low)


def _concatenate(results: list[EStepResult]) -> EStepResult:
    """One result from the results of consecutive sub-batches."""
    if len(results) == 1:
        return results[0]
    fields = {name: torch.cat([getattr(r, name) for r in results]) for name in EStepResult.__dataclass_fields__ if name != "slices"}
    return EStepResult(**fields, slices=[s for r in results for s in r.slices])
