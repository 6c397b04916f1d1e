"""``+job=reconstruct``: CTF-corrected, regularised reconstruction from particles with poses.

Like ``relion_reconstruct --ctf`` followed by RELION's FSC-regularised refinement step: the
particles are split into two half sets (their ``rlnRandomSubset``, else a seeded random split),
each half is back-projected with ``CTF · image`` and ``CTF²`` weights (streamed in batches,
the leaves of a summation tree shared out among the processes, so that 1, 2, 4 or 8 of them
give the same bits), a first Wiener estimate gives the half-map FSC,
whose SSNR sets the τ² prior of the final half maps and of the full map. Writes half maps,
the full map, the FSC table (``run_fsc.star``, RELION postprocess-like) and ``run_fsc.png``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cryotorch.conventions import fft_frequencies_2d, image_shift_from_origin, rfft2_centered, rfft3_centered
from cryotorch.data.particles import CommonGridReader, ParticleBatch, batch_size_for_budget, common_geometry, half_set_labels, iterate_batches, require_ctf
from cryotorch.errors import InputError
from cryotorch.io import ParticleTable, project_path, read_particles, validate_particle_images, write_mrc, write_star
from cryotorch.em.mstep import half_set_reconstruction
from cryotorch.em.sums import SumTree, TensorSums
from cryotorch.jobs.context import RunContext
from cryotorch.monitor import log_central_slices, log_curve, log_scalars, progress_bar
from cryotorch.monitor.plots import save_fsc_plot
from cryotorch.ops.backprojection import crop_size, insert_slices
from cryotorch.ops.ctf import compute_ctf
from cryotorch.ops.filters import soft_spherical_mask
from cryotorch.ops.fourier import translate_2d_ft
from cryotorch.ops.fsc import fourier_shell_correlation, resolution_at_threshold
from cryotorch.ops.projection import padded_box_size
from cryotorch.ops.symmetry import symmetry_matrices

log = logging.getLogger(__name__)

__all__ = ["ReconstructJob"]


@dataclass
class HalfSetSums(TensorSums):
    """Back-projected ``(2, Q, Q, Q // 2 + 1)`` complex data and real weights of the two half
    sets, on the centred crop of the padded grid that the resolution limit reaches (``Q = P``
    without one)."""

    data: torch.Tensor
    weight: torch.Tensor

    @classmethod
    def zeros(cls, grid_size: int, device: torch.device) -> HalfSetSums:
        """Empty sums on grids of ``grid_size``."""
        shape = (2, grid_size, grid_size, grid_size // 2 + 1)
        return cls(torch.zeros(shape, dtype=torch.complex64, device=device), torch.zeros(shape, dtype=torch.float32, device=device))


class ReconstructJob:
    """Reconstruct half maps and a full map; every parameter is a key of ``configs/job/reconstruct.yaml``."""

    def __init__(
        self,
        name: str,
        ctf: bool = True,
        max_resolution_angstrom: float | None = None,
        mask_diameter_angstrom: float | None = None,
        tau2_fudge: float = 1.0,
        wiener_constant: float = 1e-3,
        fsc_threshold: float = 0.143,
    ) -> None:
        if tau2_fudge <= 0:
            raise InputError(f"job.tau2_fudge must be positive, got {tau2_fudge}")
        for key, value in (("max_resolution_angstrom", max_resolution_angstrom), ("mask_diameter_angstrom", mask_diameter_angstrom)):
            if value is not None and not value > 0:
                raise InputError(f"job.{key}={value} must be positive (Å), or null for none")
        if not wiener_constant >= 0:
            raise InputError(f"job.wiener_constant={wiener_constant} must be ≥ 0")
        if not 0 < fsc_threshold < 1:
            raise InputError(f"job.fsc_threshold={fsc_threshold} must lie in (0, 1), e.g. 0.143")
        self.name = name
        self.ctf = ctf
        self.max_resolution_angstrom = max_resolution_angstrom
        self.mask_diameter_angstrom = mask_diameter_angstrom
        self.tau2_fudge = tau2_fudge
        self.wiener_constant = wiener_constant
        self.fsc_threshold = fsc_threshold

    def run(self, context: RunContext) -> None:
        """Back-project all particles, reconstruct, and write maps, FSC table and plot."""
        if context.particles is None:
            raise InputError("reconstruct needs particles: set data.particles=path/to/particles.star")
        table = read_particles(context.particles, context.project_dir)
        if not table.has_poses:
            raise InputError(f"{context.particles}: no rlnAngleRot/Tilt/Psi columns; reconstruct needs particles with poses")
        require_ctf(table, str(context.particles), self.ctf)
        validate_particle_images(table)
        box, pixel = common_geometry(table, str(context.particles))
        self.check_memory(context, len(table), box, pixel)
        halves = half_set_labels(table, context.seed)
        sums = context.tree_sum(self.back_project(context, table, halves, box, pixel), context.memory_budget_bytes / 8)
        if context.is_main:
            self.reconstruct_and_write(context, sums.data, sums.weight, box, pixel, padded_box_size(box, context.padding_factor))
        context.fabric.barrier()

    def radius_shells(self, box: int, pixel: float) -> float:
        """Fourier radius (shells of the ``box``-px box of ``pixel`` Å) that the sums hold:
        Nyquist, or ``max_resolution_angstrom``'s shell."""
        return box // 2 if self.max_resolution_angstrom is None else min(box // 2, box * pixel / self.max_resolution_angstrom)

    @staticmethod
    def grids_at_peak(sum_tree_leaves: int) -> float:
        """Crops of the padded grid (12 bytes a voxel) alive at the peak: about 9 while the
        maps are reconstructed (the half sets' sums, their Hermitian-symmetrised copies and
        the reconstructions' work arrays; measured from the peak resident memory at boxes of
        96 and 128), 10 counted; while the summation tree adds, two (the half sets) for each
        of its log2(L) + 1 levels."""
        return max(10.0, 2 * (math.log2(sum_tree_leaves) + 1))

    def check_memory(self, context: RunContext, n_images: int, box: int, pixel: float) -> None:
        """Before any image is read: the sums and maps (:meth:`grids_at_peak`) must fit in
        this process's :func:`~cryotorch.runtime.memory_share`, beside the arrays sized from
        the memory budget, else an error names the ``max_resolution_angstrom`` at which they do."""
        share = context.maps_memory_share(n_images, box)
        padded = padded_box_size(box, context.padding_factor)

        def needed(radius: float) -> float:
            size = crop_size(padded, box, radius)
            return self.grids_at_peak(context.sum_tree_leaves) * size * size * (size // 2 + 1) * 12.0

        radius = self.radius_shells(box, pixel)
        if needed(radius) <= share.available_bytes:
            return
        fitting = int(radius)
        while fitting > 3 and needed(fitting) > share.available_bytes:
            fitting -= 1
        remedy = (
            f"set job.max_resolution_angstrom={math.ceil(10 * box * pixel / fitting) / 10:g} or coarser (the maps then stop there)"
            if needed(fitting) <= share.available_bytes
            else "set a smaller compute.memory_budget_gb, or run it on a machine with more memory"
        )
        raise InputError(
            f"{context.particles}: reconstruct at a box of {box} px to {box * pixel / radius:.3g} Å needs about {needed(radius) / 1e9:.3g} GB for its "
            f"sums and maps, more than {share.describe()}; {remedy}"
        )

    def back_project(
        self, context: RunContext, table: ParticleTable, halves: np.ndarray, box: int, pixel: float
    ) -> HalfSetSums:
        """This rank's node of the half-set sums' tree (its leaves added in the tree's order)."""
        device = context.device
        padded = padded_box_size(box, context.padding_factor)
        frequencies = fft_frequencies_2d(box, device).reshape(-1, 2)
        limit = self.radius_shells(box, pixel)
        inside = frequencies.norm(dim=-1) <= limit
        grid_size = crop_size(padded, box, limit)
        frequencies = frequencies[inside]
        symmetry = symmetry_matrices(context.symmetry, device=device, dtype=torch.float32)  # (G, 3, 3)
        batch_size = batch_size_for_budget(box, context.memory_budget_bytes / max(1, symmetry.shape[0]))
        leaves = context.tree_leaves(np.arange(len(table)), batch_size)
        reader = CommonGridReader(table, box, pixel, preload=context.preload)
        tree: SumTree[HalfSetSums] = SumTree()
        bar = progress_bar(sum(len(batches) for _, batches in leaves), "back-project", enabled=context.is_main, unit="batch")
        spare: list[HalfSetSums] = []
        for leaf, batches in leaves:
            if not batches:
                continue  # an empty leaf adds nothing: the tree's sums are the same bits without it
            sums = spare.pop().zero_() if spare else HalfSetSums.zeros(grid_size, device)
            for rows in batches:
                (batch,) = iterate_batches(table, reader, rows, batch_size, device)
                self.insert_batch(sums, batch, halves, symmetry, frequencies, inside, box, pixel, context.memory_budget_bytes, padded)
                bar.update()
            spare.extend(tree.add_leaf(leaf, sums))
        bar.close()
        return tree.total() or HalfSetSums.zeros(grid_size, device)

    def insert_batch(
        self,
        sums: HalfSetSums,
        batch: ParticleBatch,
        halves: np.ndarray,
        symmetry: torch.Tensor,
        frequencies: torch.Tensor,
        inside: torch.Tensor,
        box: int,
        pixel: float,
        memory_budget_bytes: float,
        padded: int,
    ) -> None:
        """Back-project one batch into its particles' half sets (``frequencies`` ``(M, 2)``
        are the components ``inside`` the resolution limit, ``symmetry`` ``(G, 3, 3)``; the
        sums crop the ``padded`` grid)."""
        device = sums.data.device
        spectra = rfft2_centered(batch.images).reshape(len(batch.rows), -1)[:, inside]
        # undo the image's translation by -origin to centre the particle
        spectra = translate_2d_ft(spectra, -image_shift_from_origin(batch.origin_px), frequencies, box)
        if self.ctf:
            ctf = compute_ctf(batch.ctf, frequencies, box, pixel)
            spectra, slice_weights = spectra * ctf, ctf**2
        else:
            slice_weights = torch.ones(spectra.shape, device=device)
        half = torch.as_tensor(halves[batch.rows.cpu().numpy()], device=device)
        for h in (0, 1):
            members = (half == h + 1).nonzero()[:, 0]
            if members.numel() == 0:
                continue
            # every symmetry mate A·L of the pose sees the same image
            rotations = (batch.rotations[members][:, None] @ symmetry[None]).reshape(-1, 3, 3)
            n_mates = symmetry.shape[0]
            insert_slices(
                sums.data[h],
                sums.weight[h],
                spectra[members].repeat_interleave(n_mates, dim=0),
                slice_weights[members].repeat_interleave(n_mates, dim=0),
                rotations,
                frequencies,
                box,
                memory_budget_bytes,
                padded,
            )

    def reconstruct_and_write(self, context: RunContext, data: torch.Tensor, weight: torch.Tensor, box: int, pixel: float, padded: int) -> None:
        """FSC-regularised half and full maps, FSC table and plot, TensorBoard summaries, from
        sums on the centred crop ``data``, ``weight`` of the ``padded`` grid."""
        maps = half_set_reconstruction(data, weight, box, self.tau2_fudge, self.wiener_constant, padded_size=padded)
        halves_final, full = maps.halves, maps.full

        unmasked = fourier_shell_correlation(rfft3_centered(halves_final[0]), rfft3_centered(halves_final[1]))
        curves = {"unmasked": unmasked}
        if self.mask_diameter_angstrom:
            mask = soft_spherical_mask(box, self.mask_diameter_angstrom / (2 * pixel), 5.0, device=data.device)
            curves["masked"] = fourier_shell_correlation(rfft3_centered(halves_final[0] * mask), rfft3_centered(halves_final[1] * mask))
        final_curve = curves.get("masked", unmasked)
        resolution = resolution_at_threshold(final_curve, box, pixel, self.fsc_threshold)
        resolution_half = resolution_at_threshold(final_curve, box, pixel, 0.5)

        out = context.output_dir
        write_mrc(out / "run_half1_class001_unfil.mrc", halves_final[0].cpu(), pixel)
        write_mrc(out / "run_half2_class001_unfil.mrc", halves_final[1].cpu(), pixel)
        write_mrc(out / "run_class001.mrc", full.cpu(), pixel)
        shells = np.arange(box // 2 + 1)
        inverse_resolution = shells / (box * pixel)
        fsc_table = {
            "rlnSpectralIndex": shells,
            "rlnResolution": inverse_resolution,
            "rlnAngstromResolution": np.where(shells > 0, box * pixel / np.maximum(shells, 1), 999.0),
            "rlnFourierShellCorrelationUnmaskedMaps": unmasked.cpu().numpy(),
        }
        if "masked" in curves:
            fsc_table["rlnFourierShellCorrelationMaskedMaps"] = curves["masked"].cpu().numpy()
        write_star(
            out / "run_fsc.star",
            {
                "general": {
                    "rlnFinalResolution": resolution,
                    "rlnResolutionAtFsc05": resolution_half,
                    "rlnUnfilteredMapHalf1": project_path(out / "run_half1_class001_unfil.mrc"),
                    "rlnUnfilteredMapHalf2": project_path(out / "run_half2_class001_unfil.mrc"),
                    "rlnFscThreshold": self.fsc_threshold,
                },
                "fsc": pd.DataFrame(fsc_table),
            },
        )
        save_fsc_plot(out / "run_fsc.png", inverse_resolution, {k: v.cpu().numpy() for k, v in curves.items()}, resolution, self.fsc_threshold)
        log_scalars(context.writer, {"reconstruct/resolution_angstrom": resolution, "reconstruct/resolution_fsc05_angstrom": resolution_half}, 0)
        log_curve(context.writer, "reconstruct/fsc", torch.as_tensor(inverse_resolution), final_curve.cpu())
        log_central_slices(context.writer, "reconstruct/map_central_sections", full, 0)
        log.info("resolution %.2f Å at FSC %.3f (%.2f Å at 0.5); maps in %s", resolution, self.fsc_threshold, resolution_half, out)
