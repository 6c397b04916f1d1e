"""``+job=mask_create``: a soft solvent mask from a map (RELION's Mask creation).

The map is low-passed (``job.lowpass_A``), binarised at ``job.threshold``, the binary mask grown
by ``job.extend_px`` voxels and given a raised-cosine soft edge of ``job.soft_edge_px`` voxels
(:func:`~cryotorch.ops.filters.soft_edge_mask`); ``mask.mrc`` in the run folder has the map's
box and voxel size, for ``job.reference_mask`` of class3d or a masked FSC.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cryotorch.errors import InputError
from cryotorch.io import read_mrc, write_mrc
from cryotorch.jobs.context import RunContext
from cryotorch.monitor import log_central_slices, log_scalars
from cryotorch.ops.filters import lowpass_map, soft_edge_mask

log = logging.getLogger(__name__)

__all__ = ["MaskCreateJob"]


class MaskCreateJob:
    """Mask creation; parameters are the keys of ``configs/job/mask_create.yaml``."""

    def __init__(
        self,
        name: str,
        map: str | None,
        threshold: float | None,
        lowpass_A: float = 15.0,
        extend_px: float = 3.0,
        soft_edge_px: float = 3.0,
        invert: bool = False,
        pixel_size_angstrom: float | None = None,
        output_name: str = "mask.mrc",
    ) -> None:
        if map is None:
            raise InputError("mask_create needs a map: set job.map=run_class001.mrc")
        if threshold is None:
            raise InputError("mask_create needs a binarisation threshold: set job.threshold (e.g. the level at which the map looks right in ChimeraX)")
        if lowpass_A < 0 or soft_edge_px < 0:
            raise InputError(f"job.lowpass_A ({lowpass_A} Å; 0: none) and job.soft_edge_px ({soft_edge_px}) must be ≥ 0")
        if pixel_size_angstrom is not None and not pixel_size_angstrom > 0:
            raise InputError(f"job.pixel_size_angstrom={pixel_size_angstrom} must be positive, or null for the map header's")
        self.name = name
        self.map_path = str(map)
        self.threshold = float(threshold)
        self.lowpass_A = float(lowpass_A)
        self.extend_px = float(extend_px)
        self.soft_edge_px = float(soft_edge_px)
        self.invert = invert
        self.pixel_size_angstrom = pixel_size_angstrom
        self.output_name = output_name

    def run(self, context: RunContext) -> None:
        """Make the mask on rank 0 and write it."""
        if context.is_main:
            volume = read_mrc(self.map_path)
            shape = volume.data.shape
            if len(shape) != 3 or len(set(shape)) != 1:
                raise InputError(f"{self.map_path}: map of shape {tuple(shape)} is not a cube")
            pixel = self.pixel_size_angstrom or volume.voxel_size_angstrom[0]
            if not pixel > 0:
                raise InputError(f"{self.map_path}: its header holds no voxel size; set job.pixel_size_angstrom")
            values = torch.as_tensor(np.array(volume.data), dtype=torch.float32, device=context.device)
            if self.lowpass_A > 0:
                if self.lowpass_A < 2 * pixel:
                    raise InputError(f"job.lowpass_A={self.lowpass_A:g} Å is finer than the map's Nyquist ({2 * pixel:.4g} Å); give a coarser resolution, or 0 for none")
                values = lowpass_map(values, self.lowpass_A, pixel)
            low, high = float(values.min()), float(values.max())
            if not low < self.threshold <= high:
                raise InputError(
                    f"{self.map_path}: job.threshold={self.threshold:.4g} leaves no voxel on one side; the map's values span "
                    f"[{low:.4g}, {high:.4g}]{f' after the {self.lowpass_A:g} Å low-pass' if self.lowpass_A > 0 else ''}; give a threshold within"
                )
            mask = soft_edge_mask(values, self.threshold, self.extend_px, self.soft_edge_px)
            if self.invert:
                mask = 1 - mask
            out = context.output_dir / self.output_name
            out.parent.mkdir(parents=True, exist_ok=True)
            write_mrc(out, mask.cpu(), pixel)
            fraction = float(mask.mean())
            log_scalars(context.writer, {"mask_create/volume_fraction": fraction}, 0)
            log_central_slices(context.writer, "mask_create/central_sections", mask, 0)
            log.info("mask of %s (threshold %.4g, extended %g px, soft edge %g px) holds %.1f %% of the box: %s",
                     self.map_path, self.threshold, self.extend_px, self.soft_edge_px, 100 * fraction, out)
        context.fabric.barrier()
