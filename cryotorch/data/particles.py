"""Particle batches streamed from memory-mapped stacks, sharded across ranks."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cryotorch.conventions import euler_deg_to_matrix
from cryotorch.errors import InputError
from cryotorch.io import ParticleImageReader, ParticleTable
from cryotorch.ops.ctf import CtfParameters
from cryotorch.ops.filters import resample_to_grid
from cryotorch.runtime import memory_share

log = logging.getLogger(__name__)

__all__ = [
    "ParticleBatch",
    "ctf_parameters",
    "half_set_labels",
    "tree_leaves",
    "exact_tree_sum",
    "iterate_batches",
    "batch_size_for_budget",
    "common_geometry",
    "CommonGridReader",
    "preload_bytes",
    "require_ctf",
]


@dataclass
class ParticleBatch:
    """One chunk of particles as tensors on the compute device.

    Attributes
    ----------
    rows
        ``(B,)`` int64 row numbers in the particle table.
    images
        ``(B, N, N)`` float32 real-space images.
    rotations
        ``(B, 3, 3)`` float32 RELION matrices of the table's poses.
    origin_px
        ``(B, 2)`` float32 RELION origins (x, y) in pixels.
    ctf
        ``(B,)`` CTF parameters.
    """

    rows: torch.Tensor
    images: torch.Tensor
    rotations: torch.Tensor
    origin_px: torch.Tensor
    ctf: CtfParameters


def ctf_parameters(table: ParticleTable, rows: np.ndarray, device: torch.device | str = "cpu") -> CtfParameters:
    """CTF parameters of the given table rows as ``(B,)`` float64 tensors."""

    def column(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.float64)[rows], device=device)

    return CtfParameters(
        defocus_u_angstrom=column(table.defocus_u_angstrom),
        defocus_v_angstrom=column(table.defocus_v_angstrom),
        defocus_angle_deg=column(table.defocus_angle_deg),
        voltage_kv=column(table.voltage_kv),
        spherical_aberration_mm=column(table.spherical_aberration_mm),
        amplitude_contrast=column(table.amplitude_contrast),
        phase_shift_deg=column(table.phase_shift_deg),
        bfactor_angstrom2=column(table.ctf_bfactor_angstrom2),
        scale=column(table.ctf_scale),
    )


def _geometries(table: ParticleTable) -> tuple[list[tuple[int, float]], np.ndarray]:
    """The distinct (box px, pixel Å to 4 decimals) of the particles, and ``(N,)`` the index of
    each particle's."""
    pixels = np.round(np.asarray(table.pixel_size_angstrom, dtype=np.float64), 4)
    pairs, codes = np.unique(np.stack([np.asarray(table.box_size_px, dtype=np.float64), pixels], axis=1), axis=0, return_inverse=True)
    return [(int(box), float(pixel)) for box, pixel in pairs], codes.reshape(-1)


def common_geometry(table: ParticleTable, source: str) -> tuple[int, float]:
    """The box size (px) and pixel size (Å) all particles are processed at.

    Their own where they share one. Optics groups of different pixel or box sizes (other
    detectors, magnifications or extractions, merged as RELION 3.1 merges them) are brought
    by :class:`CommonGridReader` to the coarsest pixel size among them, so that every image is
    Fourier-cropped, none padded with frequencies it does not hold, and to the box that keeps
    the extent (Å) of the first optics group's.
    """
    geometries, _ = _geometries(table)
    if len(geometries) == 1:
        return geometries[0]
    unknown = (np.asarray(table.box_size_px) < 2) | ~(np.asarray(table.pixel_size_angstrom) > 0)
    if unknown.any():
        raise InputError(
            f"{source}: optics groups {np.unique(np.asarray(table.optics_group)[unknown]).tolist()} have no box size or pixel size, beside others "
            "that do; set rlnImageSize and rlnImagePixelSize in each optics group"
        )
    first = int(np.argmin(table.optics_group))
    extent = float(table.box_size_px[first]) * float(table.pixel_size_angstrom[first])
    pixel = max(pixel for _, pixel in geometries)
    box = max(2, 2 * round(extent / pixel / 2))
    log.info(
        "%s: images of %s are resampled on reading to %d px × %.4g Å (the coarsest pixel size, in the first optics group's extent)",
        source, ", ".join(f"{b} px × {p:.4g} Å" for b, p in geometries), box, pixel,
    )
    return box, pixel


def preload_bytes(n_images: int, box_size: int) -> float:
    """Bytes that ``data.preload=true`` holds in memory: ``n_images`` float32 images of
    ``box_size``² px (on the common grid). An error, before any image is read, where they
    would take more than this process's :func:`~cryotorch.runtime.memory_share` of the
    machine's memory."""
    needed = 4.0 * n_images * box_size * box_size
    share = memory_share(torch.device("cpu"))
    if needed > share.available_bytes:
        raise InputError(
            f"data.preload=true would hold {n_images} images of {box_size}² px, {needed / 1e9:.3g} GB, in memory: more than "
            f"{share.describe()}; set data.preload=false to read them from their memory-mapped stacks as they are needed"
        )
    return needed


class CommonGridReader:
    """Particle images on one grid: those of a :class:`~cryotorch.io.ParticleImageReader`,
    with the images of optics groups of another box or pixel size resampled on reading
    (:func:`~cryotorch.ops.filters.resample_to_grid`) to ``box_size`` px of
    ``pixel_size_angstrom`` (:func:`common_geometry`).

    Parameters
    ----------
    table
        Particles to read.
    box_size, pixel_size_angstrom
        The grid of the images returned (px, Å).
    preload
        Read (and resample) every image into memory now; an error, before any is read,
        where they would take more than this process's
        :func:`~cryotorch.runtime.memory_share` of the machine's memory.
    """

    def __init__(self, table: ParticleTable, box_size: int, pixel_size_angstrom: float, preload: bool = False) -> None:
        if preload:
            preload_bytes(len(table), box_size)
        self.box_size, self.pixel_size_angstrom = box_size, pixel_size_angstrom
        self._geometries, self._codes = _geometries(table)
        self._native = [box == box_size and abs(pixel - pixel_size_angstrom) <= 1e-4 * pixel_size_angstrom for box, pixel in self._geometries]
        self.reader = ParticleImageReader(table, preload=preload and all(self._native))
        self._images: np.ndarray | None = None
        if preload and not all(self._native):
            # resampled in chunks of about 2^24 pixels, so that the transforms' work arrays stay small
            images = np.empty((len(table), box_size, box_size), dtype=np.float32)
            chunk = max(1, 2**24 // box_size**2)
            for start in range(0, len(table), chunk):
                images[start : start + chunk] = self.read(np.arange(start, min(start + chunk, len(table))))
            self._images = images
            self.reader.close()

    def read(self, rows: np.ndarray) -> np.ndarray:
        """``(B, n, n)`` float32 images of table ``rows`` on the common grid."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self._images is not None:
            return self._images[rows]
        if all(self._native):
            return self.reader.read(rows)
        images = np.empty((rows.size, self.box_size, self.box_size), dtype=np.float32)
        codes = self._codes[rows]
        for code in np.unique(codes):
            positions = np.flatnonzero(codes == code)
            group = self.reader.read(rows[positions])
            if not self._native[code]:
                _, pixel = self._geometries[code]
                group = resample_to_grid(torch.from_numpy(group), pixel, self.pixel_size_angstrom, self.box_size, ndim=2)[0].numpy()
            images[positions] = group
        return images

    def close(self) -> None:
        """Close the open stacks (reopened on demand)."""
        self.reader.close()


def require_ctf(table: ParticleTable, source: str, ctf: bool) -> None:
    """With CTF correction on (``ctf``), the particles must carry their CTF parameters."""
    if ctf and not table.has_ctf:
        raise InputError(
            f"{source}: the particles have no CTF parameters (rlnDefocusU/V, or ctf/df1_A in a .cs file); set job.ctf=false for images without a CTF, "
            "or estimate the CTFs first (CtfFind, or cryoSPARC's Patch CTF)"
        )


def half_set_labels(table: ParticleTable, seed: int) -> np.ndarray:
    """``(N,)`` half-set (1 or 2) per particle: the table's rlnRandomSubset, else a seeded split.

    A random split assigns exactly ``ceil(N/2)`` particles to half 1, independent of sharding.
    """
    labels = np.asarray(table.random_subset, dtype=np.int64)
    if len(labels) and np.isin(labels, (1, 2)).all():
        return labels
    order = np.random.default_rng(seed).permutation(len(table))
    labels = np.empty(len(table), dtype=np.int64)
    labels[order] = np.where(np.arange(len(table)) < (len(table) + 1) // 2, 1, 2)
    return labels


def tree_leaves(rows: np.ndarray, batch_size: int, n_leaves: int, rank: int, world_size: int) -> list[tuple[int, list[np.ndarray]]]:
    """This rank's leaves of a summation tree over the batches of ``rows``.

    ``rows`` (every rank's, in the order they are processed) are cut into batches of
    ``batch_size``, the ``n`` batches into ``n_leaves`` consecutive leaves (leaf s holds
    batches ⌊s·n/S⌋ to ⌊(s+1)·n/S⌋ − 1), and the leaves into ``world_size`` consecutive
    runs, one per rank (with more ranks than leaves, one leaf per rank). Neither the batches
    nor the leaves depend on the number of processes, so neither does a particle's E-step nor,
    where that number is a power of two dividing ``n_leaves`` (a power of two,
    ``compute.sum_tree_leaves``), the order in which the leaves' sums are added
    (:class:`~cryotorch.em.sums.SumTree`): with 8 leaves, 1, 2, 4 or 8 processes give the
    same bits.

    Returns
    -------
    list of (int, list of numpy.ndarray)
        ``(leaf index, its batches of rows)`` for this rank's leaves, in order; a leaf may
        hold no batch.
    """
    n_leaves = max(n_leaves, world_size)
    n_batches = -(-len(rows) // batch_size)
    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    first, last = rank * n_leaves // world_size, (rank + 1) * n_leaves // world_size
    return [(leaf, batches[leaf * n_batches // n_leaves : (leaf + 1) * n_batches // n_leaves]) for leaf in range(first, last)]


def exact_tree_sum(n_leaves: int, world_size: int) -> bool:
    """Whether every rank's leaves of :func:`tree_leaves` form one subtree, so that adding
    the ranks' sums pairwise keeps the tree's order (a power of two dividing ``n_leaves``)."""
    return world_size <= n_leaves and n_leaves % world_size == 0 and world_size & (world_size - 1) == 0


def batch_size_for_budget(box_size: int, memory_budget_bytes: float, bytes_per_pixel: int = 256, max_batch: int = 4096) -> int:
    """Particles per batch so that one batch's working arrays fit the memory budget."""
    return int(max(1, min(max_batch, memory_budget_bytes // (box_size * box_size * bytes_per_pixel))))


def iterate_batches(
    table: ParticleTable,
    reader: CommonGridReader,
    rows: np.ndarray,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> Iterator[ParticleBatch]:
    """Stream ``rows`` of ``table`` in batches of at most ``batch_size`` particles, on the
    reader's grid (origins in its pixels)."""
    for start in range(0, len(rows), batch_size):
        chunk = np.asarray(rows[start : start + batch_size])
        images = torch.as_tensor(reader.read(chunk), device=device)
        origin_px = torch.as_tensor(np.asarray(table.origin_angstrom)[chunk] / reader.pixel_size_angstrom, dtype=torch.float32, device=device)
        euler = torch.as_tensor(np.asarray(table.euler_deg, dtype=np.float64)[chunk], device=device)
        yield ParticleBatch(
            rows=torch.as_tensor(chunk, device=device),
            images=images,
            rotations=euler_deg_to_matrix(euler).float(),
            origin_px=origin_px,
            ctf=ctf_parameters(table, chunk, device),
        )
