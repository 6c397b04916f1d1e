"""``+job=class3d``: RELION-style 3D classification by regularised likelihood optimisation.

Expectation–maximisation (Scheres 2012) with marginalisation over classes, orientations and
translations (or classes only, ``sampling.align=false``), as batched matrix products
(:mod:`cryotorch.em.estep`) and posterior-weighted back-projection
(:mod:`cryotorch.em.mstep`). Particles are sharded across processes and the M-step sums
all-reduced; every iteration writes RELION's ``run_itNNN_{data,model,optimiser,sampling}.star`` and
``run_itNNN_classNNN.mrc``, TensorBoard summaries and a checkpoint from which a killed run
resumes (``job.continue_from`` or automatically in the same output folder); a run also
continues from an earlier iteration's files (``job.continue_from=run_itNNN_optimiser.star``).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryotorch.conventions import (
    euler_deg_to_matrix,
    fft_frequencies_2d,
    image_shift_from_origin,
    irfft2_centered,
    rfft2_centered,
)
from cryotorch.data.particles import CommonGridReader, common_geometry, ctf_parameters, half_set_labels, require_ctf
from cryotorch.em.estep import CoarseProjections, EStepResult, EStepSettings, FinePassCache, PassOffsets, PreparedBatch, SliceTable, WeightedSlices, class_ess, expectation, global_search_batches
from cryotorch.em.mstep import TAU2_ESTIMATES, SufficientStatistics, map_signal_power, maximization
from cryotorch.em.sampling import (
    GridSamples,
    PoseGrid,
    build_pose_grid,
    coarse_radius_shells,
    grid_perturbation,
    local_search_size,
    mirror_translation_children,
    nearest_translation_px,
    perturb_pose_grid,
)
from cryotorch.em.sums import SumTree, TensorSums
from cryotorch.errors import InputError
from cryotorch.io import (
    ClassSummary,
    ModelSummary,
    OptimiserSummary,
    SamplingSummary,
    ParticleTable,
    atomic_output_path,
    read_model_star,
    read_mrc,
    read_particles,
    validate_particle_images,
    write_model_star,
    write_mrc,
    write_optimiser_star,
    write_sampling_star,
    write_particles,
)
from cryotorch.jobs.context import RunContext
from cryotorch.model.class_model import ClassModel
from cryotorch.monitor import PhaseTimer, log_central_slices, log_scalars, progress_bar
from cryotorch.ops.backprojection import crop_size, self_overlap_sum
from cryotorch.ops.ctf import compute_ctf
from cryotorch.ops.filters import lowpass_map, resample_to_grid, soft_disc_masks, soft_spherical_mask
from cryotorch.ops.fourier import coloured_noise_2d, fourier_resample, shell_index_2d, translate_2d_ft
from cryotorch.ops.healpix import ang2pix_nest, angular_step_deg, order_from_angular_step, rotation_angle_deg
from cryotorch.ops.projection import extract_slices, gridding_kernel_3d, padded_box_size, prepare_fourier_volumes, rotation_chunk_size
from cryotorch.ops.rotations import random_rotations
from cryotorch.ops.symmetry import symmetry_matrices

log = logging.getLogger(__name__)

__all__ = ["Class3DJob", "ParticleState"]

CHECKPOINT = "run_checkpoint.pt"
_BACKGROUND_NOISE_STREAM = 0x6E6F6973  # keeps the background noise's draws apart from the run's other random streams


@dataclass(frozen=True)
class PassSamples:
    """Where passes of an aligned E-step that score the same samples bring back a particle's
    own contribution to its last class map: at their orientation nearest to the particle's
    last one, at their translation nearest to its position, in each pass's components."""

    orientations: GridSamples  # the passes' orientations
    shift_px: torch.Tensor  # (2,) from the particle's position to their nearest translation
    component_counts: tuple[int, ...]  # each pass scores the iteration's first n components


#: the phases of an iteration, in the order train.log and TensorBoard list them
_PHASES = ("set-up", "self-fit", "images", "coarse pass", "fine pass", "E-step", "back-projection", "all-reduce", "M-step", "outputs")


@dataclass
class TreeSums(TensorSums):
    """A node of an iteration's summation tree: the M-step's sums, and the slice tables of
    the fine-pass caches whose tables go up the tree whole (:meth:`Class3DJob.carried_caches`),
    to be inserted once, at its root."""

    stats: SufficientStatistics
    tables: list[SliceTable]

    def tensors(self) -> list[torch.Tensor]:
        """Every sum, in a fixed order, for summation across processes (with
        :meth:`SliceTable.dense` tables)."""
        return self.stats.tensors() + [tensor for table in self.tables for tensor in table.tensors()]

    def add_(self, other: TreeSums) -> TreeSums:
        """Add ``other``'s sums in place (the tables row by row)."""
        self.stats.add_(other.stats)
        for table, addend in zip(self.tables, other.tables, strict=True):
            table.add_(addend)
        return self


@dataclass
class SelfFitOffsets:
    """The self-fit discounts of an iteration's particles, ``(N, K)`` per pass (rows of the
    particles this process does not score stay zero): one array without alignment, the
    coarse, fine and unrefined passes' with it."""

    passes: list[torch.Tensor]

    @classmethod
    def zeros(cls, n_particles: int, n_classes: int, aligned: bool, device: torch.device) -> SelfFitOffsets:
        """No discount yet."""
        return cls([torch.zeros(n_particles, n_classes, device=device) for _ in range(3 if aligned else 1)])

    def store(self, index: torch.Tensor, discount: torch.Tensor | PassOffsets) -> None:
        """Keep the discounts of the particles ``index`` ``(B,)``."""
        parts = [discount.coarse, discount.fine, discount.unrefined] if isinstance(discount, PassOffsets) else [discount]
        for held, part in zip(self.passes, parts):
            if part is not None:
                held[index] = part

    def select(self, index: torch.Tensor) -> torch.Tensor | PassOffsets:
        """The discounts of the particles ``index`` ``(B,)``, as the E-step takes them."""
        if len(self.passes) == 1:
            return self.passes[0][index]
        return PassOffsets(*(held[index] for held in self.passes))


@dataclass
class ParticleState:
    """Per-particle assignments kept between iterations (all particles, every rank)."""

    class_number: torch.Tensor  # (N,) int64, 1-based
    euler_deg: torch.Tensor  # (N, 3) float64
    origin_px: torch.Tensor  # (N, 2) float32
    max_posterior: torch.Tensor  # (N,) float32
    n_significant: torch.Tensor  # (N,) int64
    log_likelihood: torch.Tensor  # (N,) float64
    angular_spread_deg: torch.Tensor  # (N,) float32
    class_ess: torch.Tensor  # (N,) float32, 1/Σ_k p_k²
    class_probability: torch.Tensor  # (N,) float32, p(best class | X)
    norm_correction: torch.Tensor  # (N,) float32, each image's noise level over the mean (rlnNormCorrection)

    def store(self, index: torch.Tensor, result: EStepResult) -> None:
        """Record the E-step outcome of particles ``index``."""
        self.class_number[index] = result.best_class + 1
        self.euler_deg[index] = result.best_euler_deg.to(self.euler_deg.dtype)
        self.origin_px[index] = result.best_origin_px.float()
        self.max_posterior[index] = result.max_posterior.float()
        self.n_significant[index] = result.n_significant.long()
        self.log_likelihood[index] = result.log_likelihood.double()
        self.angular_spread_deg[index] = result.angular_spread_deg.float()
        self.class_ess[index] = class_ess(result.class_posterior).float()
        self.class_probability[index] = result.class_posterior.amax(-1).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).cpu() for name in self.__dataclass_fields__}


class Class3DJob:
    """3D classification; every parameter is a key of ``configs/job/class3d.yaml``."""

    # the config key of the class maps' mask, as messages name it
    map_mask_key = "job.reference_mask"

    def __init__(
        self,
        name: str,
        reference: str | list[str] | None,
        K: int,
        n_iterations: int = 25,
        tau2_fudge: float = 4.0,
        tau2_estimate: str = "map",
        mask_diameter_A: float | None = None,
        reference_mask: str | None = None,
        resize_reference: bool = False,
        zero_mask: bool = True,
        reference_absolute_greyscale: bool = False,
        ini_high_A: float = 60.0,
        ctf: bool = True,
        ignore_ctf_until_first_peak: bool = False,
        reference_ctf_corrected: bool = True,
        highres_limit_estep_A: float | None = None,
        highres_limit_estep_iterations: int | None = None,
        increment_shells: int = 5,
        fast_subsets: bool = False,
        scale_prior_sigma: float | None = None,
        update_references: bool = True,
        common_frame: bool | None = None,
        self_fit_discount: bool = True,
        norm_correction: bool = True,
        continue_from: str | None = None,
    ) -> None:
        if K < 1:
            raise InputError(f"job.K must be at least 1, got {K}")
        if n_iterations < 1:
            raise InputError(f"job.n_iterations must be at least 1, got {n_iterations}")
        if tau2_fudge <= 0:
            raise InputError(f"job.tau2_fudge must be positive, got {tau2_fudge}")
        if tau2_estimate not in TAU2_ESTIMATES:
            raise InputError(f"job.tau2_estimate must be one of {', '.join(TAU2_ESTIMATES)}, got {tau2_estimate!r}")
        if highres_limit_estep_A is not None and not highres_limit_estep_A > 0:
            raise InputError(f"job.highres_limit_estep_A={highres_limit_estep_A} must be a resolution in Å (e.g. 30), or null for no limit")
        if highres_limit_estep_iterations is not None and not (highres_limit_estep_A and 1 <= highres_limit_estep_iterations <= n_iterations):
            raise InputError(
                f"job.highres_limit_estep_iterations={highres_limit_estep_iterations} needs job.highres_limit_estep_A and must lie in "
                f"[1, job.n_iterations={n_iterations}] (null: the limit holds in every iteration)"
            )
        if scale_prior_sigma is not None and scale_prior_sigma < 0:
            raise InputError(f"job.scale_prior_sigma must be 0 (off), positive or null (automatic), got {scale_prior_sigma}")
        references = [] if reference is None else [reference] if isinstance(reference, str) else list(reference)
        if len(references) not in (0, 1, K):
            raise InputError(f"job.reference lists {len(references)} maps for job.K={K} classes: give one map, or one per class")
        self.name = name
        self.references = [str(path) for path in references]
        self.n_classes = K
        self.n_iterations = n_iterations
        self.tau2_fudge = tau2_fudge
        self.tau2_estimate = tau2_estimate
        self.mask_diameter_A = mask_diameter_A
        self.reference_mask = reference_mask
        self.resize_reference = resize_reference
        self.zero_mask = zero_mask
        self.reference_absolute_greyscale = reference_absolute_greyscale
        self.ini_high_A = ini_high_A
        self.ctf = ctf
        self.ignore_ctf_until_first_peak = ignore_ctf_until_first_peak
        self.reference_ctf_corrected = reference_ctf_corrected
        self.highres_limit_estep_A = highres_limit_estep_A
        self.highres_limit_estep_iterations = highres_limit_estep_iterations
        self.increment_shells = increment_shells
        self.fast_subsets = fast_subsets
        self.scale_prior_sigma = scale_prior_sigma
        self.update_references = update_references
        self.discount_self_fit = self_fit_discount
        self.norm_correction = norm_correction
        # automatic: classes grown from one reference share its frame; maps given one per
        # class keep the frames they were given
        self.common_frame = len(self.references) <= 1 if common_frame is None else common_frame
        self._pose_grids: dict[tuple[int, float, float], PoseGrid] = {}
        # set by jobs whose schedule can end before n_iterations (class3d runs them all)
        self.finished = False
        self.continue_from = continue_from

    # ------------------------------------------------------------------ set-up
    def run(self, context: RunContext) -> None:
        """Load the particles and references (or a checkpoint), iterate and write every iteration."""
        table = self.read_table(context)
        self.set_up(context, table)
        model = ClassModel(self.n_classes, self.box, self.padded, len(self.group_names), self.pixel).to(self.device)
        state, start = self.resume(context, model)
        if state is None:
            state = self.initial_state(table)
            self.initialise_model(context, model, state)
            start = 1
        for iteration in range(start, self.n_iterations + 1):
            if self.finished:
                break
            state = self.iterate(context, model, state, iteration)
        self.finish(context, state)

    def read_table(self, context: RunContext) -> ParticleTable:
        """The particles, checked for what the job needs (:meth:`check_table`), for CTF
        parameters where CTF correction is on, and for readable images."""
        if context.particles is None:
            raise InputError(f"{self.name} needs particles: set data.particles=path/to/particles.star")
        table = read_particles(context.particles, context.project_dir)
        self.check_table(context, table)
        require_ctf(table, str(context.particles), self.ctf)
        validate_particle_images(table)
        return table

    def check_table(self, context: RunContext, table: ParticleTable) -> None:
        """A reference is given; without alignment the particles have poses; with alignment the
        sampling steps are positive; the final local searches fit in the run and their
        translations are positive; the grid perturbation is a fraction of a step; the limit on
        oversampled particles is a count."""
        sampling = context.sampling
        if not self.references:
            raise InputError("class3d needs a reference map: set job.reference=ref.mrc")
        if not sampling["align"] and not table.has_poses:
            raise InputError(f"{context.particles}: sampling.align=false needs particles with poses (rlnAngleRot/Tilt/Psi)")
        final = int(sampling["final_local_iterations"])
        if not 0 <= final <= self.n_iterations:
            raise InputError(f"sampling.final_local_iterations={final} must lie in [0, job.n_iterations={self.n_iterations}] (0: no final local searches)")
        if final and not (float(sampling["final_angular_step_deg"]) > 0 and float(sampling["final_local_search_deg"]) > 0):
            raise InputError("sampling.final_angular_step_deg and sampling.final_local_search_deg must be positive (e.g. 3.75 and 10)")
        if sampling["align"]:
            for name in ("angular_step_deg", "offset_step_px"):
                if not float(sampling[name]) > 0:
                    raise InputError(f"sampling.{name}={sampling[name]} must be positive")
            if not float(sampling["offset_range_px"]) >= 0:
                raise InputError(f"sampling.offset_range_px={sampling['offset_range_px']} must be ≥ 0 (px; 0: no translations searched)")
            if not int(sampling["oversampling"]) >= 0:
                raise InputError(f"sampling.oversampling={sampling['oversampling']} must be ≥ 0 (orders of adaptive oversampling)")
            if not (0 < float(sampling["significance"]) <= 1 and int(sampling["max_significant"]) >= 1):
                raise InputError(f"sampling.significance={sampling['significance']} must lie in (0, 1] and sampling.max_significant={sampling['max_significant']} be ≥ 1")
        for name in ("final_offset_range_px", "final_offset_step_px"):
            value = sampling.get(name)
            if value is not None and not float(value) > 0:
                raise InputError(f"sampling.{name}={value} must be positive (px), or null to keep sampling.{name.removeprefix('final_')}")
        if not 0 <= float(sampling["perturb"]) <= 1:
            raise InputError(f"sampling.perturb={sampling['perturb']} is not a fraction of the coarse steps: give a value in [0, 1] (RELION's default 0.5, 0 for a fixed grid)")
        unrefined = sampling["max_significant_oversampled"]
        if unrefined is not None and not int(unrefined) >= 1:
            raise InputError(f"sampling.max_significant_oversampled={unrefined} must be a number of coarse samples ≥ 1 (e.g. 64), or null to oversample every particle")

    def set_up(self, context: RunContext, table: ParticleTable) -> None:
        """Geometry (the particles' box, or :meth:`working_box`), optics groups, the memory
        check (:meth:`fit_in_memory`, before any image is read), the image reader and the
        masks."""
        full_box, full_pixel = common_geometry(table, str(context.particles))
        self.table, self.full_box, self.full_pixel = table, full_box, full_pixel
        box_A = full_box * full_pixel
        if self.mask_diameter_A is not None and not 0 < self.mask_diameter_A <= box_A:
            raise InputError(
                f"{context.particles}: job.mask_diameter_A={self.mask_diameter_A} Å does not fit the particles' box of {full_box} px × "
                f"{full_pixel:.4g} Å = {box_A:.4g} Å; give the particle's diameter (at most {box_A:.4g} Å), or null for 0.9 × the box"
            )
        self.box = box = self.working_box(full_box, full_pixel, context)
        self.pixel = full_pixel * full_box / box
        self.seed = context.seed
        self.device = context.device
        self.diameter_A = self.mask_diameter_A or 0.9 * full_box * full_pixel
        if self.mask_diameter_A is None and not self.reference_mask:
            log.info(
                "images and class maps masked by a soft sphere of %.4g Å, 0.9 × the box (job.mask_diameter_A and %s not given); a "
                "mask of the particle's size (%s, e.g. from +job=mask_create, or the particle's diameter, RELION's 'Mask diameter') "
                "keeps solvent noise out of the class maps (docs/benchmarks.md, 'The particle's diameter')",
                self.diameter_A, self.map_mask_key, self.map_mask_key,
            )
        self.mask_radius_px = self.diameter_A / (2 * self.pixel)
        group_ids, self.groups = np.unique(np.asarray(table.optics_group), return_inverse=True)
        self.group_names = [f"opticsGroup{g}" for g in group_ids]
        self.padded = padded_box_size(box, context.padding_factor)
        self.fit_in_memory(context)
        self.reader = self.image_reader(table, context.preload)
        self.half_sets = half_set_labels(table, context.seed) if self.tau2_estimate == "fsc" else None
        self.symmetry = symmetry_matrices(context.symmetry, device=self.device, dtype=torch.float32)
        if self.reference_mask:
            self.mask = self.read_map(self.reference_mask, mask=True)
        else:
            self.mask = soft_spherical_mask(box, self.mask_radius_px, 5.0, device=self.device)
        self.self_kept, self.self_overlap = self.self_fit_geometry(self.padded)
        self.image_mask = soft_spherical_mask(box, self.mask_radius_px, 5.0, ndim=2, device=self.device)

    def working_box(self, box: int, pixel: float, context: RunContext) -> int:
        """Box the job works at, for particles of ``box`` pixels of ``pixel`` Å: their own."""
        return box

    def fit_in_memory(self, context: RunContext) -> None:
        """Before any image is read: the largest current image size whose maps and sums
        memory holds (:meth:`radius_in_memory`), a cap for :meth:`current_radius`."""
        self.memory_radius = self.radius_in_memory(context)

    def image_reader(self, table: ParticleTable, preload: bool) -> CommonGridReader:
        """Reader of the particle images at the working box (every optics group's on the
        particles' common grid, :func:`common_geometry`)."""
        return CommonGridReader(table, self.full_box, self.full_pixel, preload=preload)

    def finish(self, context: RunContext, state: ParticleState) -> None:
        """Work after the last iteration (none but a log line here)."""
        log.info("%s finished: %d iterations in %s", self.name, self.n_iterations, context.output_dir)

    def read_map(self, path: str, mask: bool = False) -> torch.Tensor:
        """A map at the working box: checked against the particles' box and pixel size (or
        resized to them, with ``job.resize_reference``), Fourier-cropped to the working box.
        A ``mask`` must hold values in [0, 1], not all zero, and is kept in [0, 1] after
        resampling."""
        volume = read_mrc(path)
        values = torch.as_tensor(np.array(volume.data), device=self.device)
        if mask and (float(values.min()) < -1e-3 or float(values.max()) > 1 + 1e-3):
            raise InputError(f"{path}: mask values span [{float(values.min()):.3g}, {float(values.max()):.3g}]; a mask must lie in [0, 1]")
        values = self.fit_to_particles(values, volume.voxel_size_angstrom[0], path)
        if self.box != self.full_box:
            values = fourier_resample(values, self.box)
        if not mask:
            return values
        values = values.clamp(0, 1)
        if not float(values.max()) > 0:
            raise InputError(f"{path}: the mask is zero everywhere; give a mask that is 1 over the particle (+job=mask_create makes one from a map)")
        return values

    def fit_to_particles(self, values: torch.Tensor, voxel: float, path: str) -> torch.Tensor:
        """``values`` of a map whose voxel size (Å; 0 where its header holds none) may differ
        from the particles': the map itself where its box and voxel size (to 1 %) are theirs,
        else, with ``job.resize_reference``, the map resampled and windowed to them
        (:func:`resample_to_grid`, RELION's ``--trust_ref_size``); otherwise an error."""
        box, pixel = self.full_box, self.full_pixel
        if values.ndim != 3 or len(set(values.shape)) != 1:
            raise InputError(f"{path}: map of shape {tuple(values.shape)} is not a cube; give a cubic map of the particles' box {box}")
        size = values.shape[-1]
        if size == box and (voxel <= 0 or abs(voxel - pixel) <= 0.01 * pixel):
            return values
        described = f"{size} px" + (f" × {voxel:.4g} Å" if voxel > 0 else "")
        if not self.resize_reference:
            raise InputError(
                f"{path}: map of {described} does not match the particles' {box} px × {pixel:.4g} Å; resample it "
                f"(relion_image_handler --rescale_angpix {pixel:.4g} --new_box {box}), or set job.resize_reference=true "
                "to have it resampled and windowed here (RELION's --trust_ref_size)"
            )
        if voxel <= 0:
            raise InputError(f"{path}: its header holds no voxel size, so it cannot be resized to {pixel:.4g} Å; set it (relion_image_handler --force_header_angpix)")
        resized, actual = resample_to_grid(values.float(), voxel, pixel, box)
        log.warning("%s: resized from %s to the particles' %d px × %.4g Å (voxel size %.5g Å)", path, described, box, pixel, actual)
        return resized

    def initial_state(self, table: ParticleTable) -> ParticleState:
        """Assignments before the first iteration: the table's poses, no class."""
        n = len(table)
        return ParticleState(
            class_number=torch.zeros(n, dtype=torch.long, device=self.device),
            euler_deg=torch.as_tensor(np.asarray(table.euler_deg, dtype=np.float64), device=self.device),
            origin_px=torch.as_tensor(np.asarray(table.origin_angstrom) / self.pixel, dtype=torch.float32, device=self.device),
            max_posterior=torch.zeros(n, device=self.device),
            n_significant=torch.zeros(n, dtype=torch.long, device=self.device),
            log_likelihood=torch.zeros(n, dtype=torch.float64, device=self.device),
            angular_spread_deg=torch.zeros(n, device=self.device),
            class_ess=torch.zeros(n, device=self.device),
            class_probability=torch.zeros(n, device=self.device),
            norm_correction=torch.ones(n, device=self.device),
        )

    def initialise_model(self, context: RunContext, model: ClassModel, state: ParticleState) -> None:
        """Reference (low-passed, grey-scale corrected), noise spectra and priors (``state``,
        the particles' initial state, is not needed here)."""
        pixel = self.pixel
        volumes = torch.stack([self.read_map(path) for path in self.references])
        unfiltered = volumes * self.mask
        if not bool((unfiltered != 0).any()):
            # an empty map may stand for a junk class beside others, but not alone
            raise InputError(
                f"job.reference: {', '.join(self.references)} {'is' if len(self.references) == 1 else 'are'} zero inside the particle mask; "
                "give a map that holds the particle (e.g. an initial model)"
            )
        if self.ini_high_A:
            volumes = lowpass_map(volumes, self.ini_high_A, pixel)
        volumes = volumes * self.mask
        power, counts, signal_var, noise_var = self.data_statistics(context)
        # an empty reference (e.g. a class for junk) must not dilute the grey-scale estimate
        nonzero = volumes.flatten(1).abs().amax(dim=1) > 0
        factor = 1.0 if self.reference_absolute_greyscale or not nonzero.any() else self.greyscale_factor(volumes[nonzero].mean(0), signal_var)
        model.volumes.copy_((volumes * factor).expand_as(model.volumes))
        # the prior's power comes from the unfiltered reference: the low-pass only sets where the
        # first iteration looks, it must not forbid the resolution from growing past it
        model.tau2.copy_(map_signal_power(unfiltered * factor, context.padding_factor).expand_as(model.tau2))
        # RELION starts from half the images' mean power spectrum (signal assumed small)
        model.sigma2_noise.copy_(0.5 * power / counts.clamp(min=1))
        # at least half a pixel, as the M-step keeps it (a range of 0 searches no translations)
        model.offset_sigma_angstrom.fill_(max(float(context.sampling["offset_range_px"]), 1.0) * pixel / 2)
        log.info("references %s: signal/noise variance of the data %.3g/%.3g", self.references, signal_var, noise_var)

    def data_statistics(self, context: RunContext, n_max: int = 2000) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """Mean power spectra per optics group and real-space signal/noise variances.

        Uses up to ``n_max`` particles spread over the data set, the same on every rank.
        """
        box = self.box
        n_shells = box // 2 + 1
        rows = np.unique(np.linspace(0, len(self.table) - 1, min(n_max, len(self.table))).astype(np.int64))
        shells = shell_index_2d(box, self.device).reshape(-1).clamp(max=n_shells)
        power = torch.zeros(len(self.group_names), n_shells + 1, dtype=torch.float64, device=self.device)
        counts = torch.zeros_like(power)
        inside = self.image_mask > 0.5
        signal, noise = [], []
        for start in range(0, len(rows), 256):
            chunk = rows[start : start + 256]
            images = torch.as_tensor(self.reader.read(chunk), device=self.device)
            spectra = rfft2_centered(images).reshape(len(chunk), -1)
            flat = torch.as_tensor(self.groups[chunk], device=self.device)[:, None] * (n_shells + 1) + shells[None]
            power.view(-1).index_add_(0, flat.reshape(-1), (spectra.abs().double() ** 2).reshape(-1))
            counts.view(-1).index_add_(0, flat.reshape(-1), torch.ones_like(flat, dtype=torch.float64).reshape(-1))
            # in float64: the signal variance is a small difference of two large ones, and the
            # grey scale of the reference follows it (float32 sums, whose order may vary from
            # run to run with the threads, changed it by 1e-5)
            variance_in, variance_out = images[:, inside].double().var(dim=1), images[:, ~inside].double().var(dim=1)
            signal.append(variance_in - variance_out)
            noise.append(variance_out)
        return power[:, :n_shells], counts[:, :n_shells], float(torch.cat(signal).mean().clamp(min=1e-12)), float(torch.cat(noise).mean())

    def greyscale_factor(self, volume: torch.Tensor, signal_variance: float) -> float:
        """Scale putting the reference on the data's grey scale: projection vs signal variance."""
        generator = torch.Generator().manual_seed(0)
        rows = np.random.default_rng(0).choice(len(self.table), size=min(64, len(self.table)), replace=False)
        rotations = random_rotations(len(rows), generator).float().to(self.device)
        frequencies = fft_frequencies_2d(self.box, self.device).reshape(-1, 2)
        projections = extract_slices(prepare_fourier_volumes(volume[None]), rotations, frequencies, self.box)[0]
        if self.ctf:
            projections = projections * compute_ctf(ctf_parameters(self.table, rows, self.device), frequencies, self.box, self.pixel)
        images = irfft2_centered(projections.reshape(len(rows), self.box, self.box // 2 + 1), self.box)
        inside = self.image_mask > 0.5
        projection_variance = float(images[:, inside].double().var(dim=1).mean())
        return math.sqrt(signal_variance / max(projection_variance, 1e-30))

    # ------------------------------------------------------------------ resume
    def resume(self, context: RunContext, model: ClassModel) -> tuple[ParticleState | None, int]:
        """Load a completed iteration, or return ``(None, 1)`` for a new run.

        ``continue_from`` (else this run's folder) is a run's folder or its checkpoint: the run
        goes on from the checkpoint's iteration, its last. Or, as RELION's ``--continue``
        takes it, one of its ``run_itNNN_*.star`` files: the run goes on from iteration NNN,
        from the checkpoint where that holds iteration NNN (bit for bit as the run went on),
        else rebuilt from the iteration's files (:meth:`rebuild`).
        """
        source = Path(self.continue_from) if self.continue_from else context.output_dir
        path = source / CHECKPOINT if source.is_dir() else source
        named = re.fullmatch(r"(.*)_it(\d+)_(?:optimiser|data|model|sampling)\.star", path.name)
        if named:
            if not path.is_file():
                raise InputError(f"{path}: not found; point job.continue_from at a run's folder or one of its run_itNNN_optimiser.star files")
            root, wanted, path = path.parent / named.group(1), int(named.group(2)), path.parent / CHECKPOINT
            if not path.is_file():
                return self.rebuild(context, model, root, wanted, None), wanted + 1
        if not path.is_file():
            if self.continue_from:
                raise InputError(f"{self.continue_from}: no {CHECKPOINT} to continue from; point job.continue_from at a class3d output folder")
            return None, 1
        fix = "start the run in a new folder, or remove the checkpoint to start this one again"
        try:
            checkpoint = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as error:
            raise InputError(f"{path}: not a readable class3d checkpoint ({error}); {fix}") from error
        missing = [key for key in ("iteration", "model", "particles") if not isinstance(checkpoint, dict) or key not in checkpoint]
        if missing:
            raise InputError(f"{path}: not a class3d checkpoint (no {', '.join(missing)}); {fix}")
        iteration = int(checkpoint["iteration"])
        if named and wanted != iteration:
            return self.rebuild(context, model, root, wanted, iteration), wanted + 1
        if tuple(checkpoint["model"]["volumes"].shape) != tuple(model.volumes.shape):
            raise InputError(f"{path}: checkpoint holds {tuple(checkpoint['model']['volumes'].shape)} volumes, this run needs {tuple(model.volumes.shape)}; use the same K and particles")
        fields = set(ParticleState.__dataclass_fields__)
        # checkpoints written before the normalisation correction: every image at its own level
        particles = checkpoint["particles"]
        if isinstance(particles, dict) and "norm_correction" not in particles and "class_number" in particles:
            particles["norm_correction"] = torch.ones(particles["class_number"].shape[0])
        try:
            model.load_state_dict(checkpoint["model"])
            if set(checkpoint["particles"]) != fields:
                raise KeyError(f"particle fields {sorted(set(checkpoint['particles']) ^ fields)}")
        except (KeyError, RuntimeError) as error:
            raise InputError(f"{path}: checkpoint written by another version of cryotorch ({error}); {fix}") from error
        state = ParticleState(**{k: v.to(self.device) for k, v in checkpoint["particles"].items()})
        self.load_extra_state({k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in checkpoint.get("extra", {}).items()})
        log.info("continuing from iteration %d (%s)", iteration, path)
        return state, iteration + 1

    def rebuild(self, context: RunContext, model: ClassModel, root: Path, iteration: int, held: int | None) -> ParticleState:
        """The state after ``iteration`` of the run whose files begin with ``root``
        (``<root>_itNNN_model.star``, the class maps it names and ``<root>_itNNN_data.star``),
        whose checkpoint holds another iteration (``held``) or is absent.

        The maps, noise spectra, τ², SSNR, class weights, group scales and offset prior come
        from the model STAR and its maps, and each particle's class, angles, origin,
        normalisation, max posterior, significant samples and log-likelihood from the data
        STAR, all as they were (floats are written to the bit). Not in these files: each
        class map's last reconstruction weights, which the self-fit discount needs, so the
        first iteration after goes without the discount, as a run's first does; and each
        particle's angular spread and class ESS, which its next E-step computes again.
        """
        folder, stem = root.parent, f"{root.name}_it{iteration:03d}"
        model_path, data_path = folder / f"{stem}_model.star", folder / f"{stem}_data.star"
        held_text = f"its checkpoint holds iteration {held}" if held is not None else f"it has no {CHECKPOINT}"
        for needed in (model_path, data_path):
            if not needed.is_file():
                raise InputError(f"{needed}: not found; continuing from iteration {iteration} of {folder} ({held_text}) needs its model and data STAR files and class maps")
        summary = read_model_star(model_path)
        if summary.box_size != self.box or abs(summary.pixel_size_angstrom - self.pixel) > 1e-6 * self.pixel:
            raise InputError(
                f"{model_path}: written for maps of {summary.box_size} px × {summary.pixel_size_angstrom:.6g} Å, this run's particles are "
                f"{self.box} px × {self.pixel:.6g} Å; continue with the particles that run classified"
            )
        if len(summary.classes) != self.n_classes:
            raise InputError(f"{model_path}: holds {len(summary.classes)} classes; set job.K={len(summary.classes)} to continue that run")
        if summary.group_names != self.group_names:
            raise InputError(
                f"{model_path}: holds the groups {summary.group_names}, where this run's particles form {self.group_names}; continue a class3d run "
                "of these particles (a run of another program groups its particles its own way)"
            )
        volumes = []
        for k, entry in enumerate(summary.classes):
            map_path = folder / Path(entry.map_name).name
            if not map_path.is_file():
                raise InputError(f"{map_path}: not found; {model_path} names it as the map of class {k + 1}")
            volume = torch.as_tensor(np.array(read_mrc(map_path).data), dtype=torch.float32, device=self.device)
            if tuple(volume.shape) != (self.box,) * 3:
                raise InputError(f"{map_path}: a map of shape {tuple(volume.shape)}, where {model_path} is of {self.box}³; give the files of one run")
            volumes.append(volume)
        as_float64 = dict(dtype=torch.float64, device=self.device)
        model.volumes.copy_(torch.stack(volumes))
        model.class_weights.copy_(torch.tensor([entry.distribution for entry in summary.classes], **as_float64))
        model.tau2.copy_(torch.tensor(np.stack([entry.tau2 for entry in summary.classes]), **as_float64))
        model.ssnr.copy_(torch.tensor(np.stack([entry.ssnr for entry in summary.classes]), **as_float64))
        model.sigma2_noise.copy_(torch.tensor(summary.group_sigma2_noise, **as_float64))
        model.group_scale.copy_(torch.tensor(summary.group_scales, **as_float64))
        model.offset_sigma_angstrom.fill_(summary.sigma_offsets_angstrom)
        table = read_particles(data_path, context.project_dir)
        # the same stacks, maybe named by other paths (one pair per stack to resolve)
        same = len(table) == len(self.table) and bool(np.array_equal(table.stack_indices, self.table.stack_indices)) and all(
            Path(ours).resolve() == Path(theirs).resolve() for ours, theirs in set(zip(table.stack_paths, self.table.stack_paths))
        )
        if not same:
            raise InputError(f"{data_path}: holds other particles than {context.particles} ({len(table)} against {len(self.table)} rows); continue with the particles that run classified")

        def column(label: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(table.metadata(label), device=self.device).to(dtype)

        # the iteration's angles and origins as a new run takes them from its table; the
        # angular spread and class ESS stay zero until the next E-step
        state = replace(
            self.initial_state(table),
            class_number=torch.tensor(table.class_number, device=self.device),
            max_posterior=column("rlnMaxValueProbDistribution", torch.float32),
            n_significant=column("rlnNrOfSignificantSamples", torch.int64),
            log_likelihood=column("rlnLogLikeliContribution", torch.float64),
            norm_correction=column("rlnNormCorrection", torch.float32),
        )
        log.info(
            "continuing from iteration %d, rebuilt from %s, %s and its class maps (%s): its first iteration goes without the self-fit discount",
            iteration, data_path, model_path, held_text,
        )
        return state

    def save_checkpoint(self, context: RunContext, model: ClassModel, state: ParticleState, iteration: int) -> None:
        """Atomically replace the run's checkpoint with this iteration's state."""
        with atomic_output_path(context.output_dir / CHECKPOINT) as temp_path:
            torch.save({"iteration": iteration, "model": model.state_dict(), "particles": state.state_dict(), "extra": self.extra_state()}, temp_path)

    def extra_state(self) -> dict[str, Any]:
        """Run state beyond the model and the particles that a resumed run needs (none here)."""
        return {}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    # ------------------------------------------------------------------ one iteration
    def components(self, radius: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fourier components inside ``radius`` (shells), sorted by radius: ``(M, 2)``
        frequencies, ``(M,)`` positions in the flattened centred rfft, ``(M,)`` shell indices."""
        frequencies = fft_frequencies_2d(self.box, self.device).reshape(-1, 2)
        radii = frequencies.norm(dim=-1)
        order = torch.argsort(radii, stable=True)
        order = order[(radii[order] > 0) & (radii[order] <= radius)]
        return frequencies[order], order, torch.round(radii[order]).long()

    def estep_limit_A(self, iteration: int) -> float | None:
        """The E-step resolution limit (Å) in this iteration: ``highres_limit_estep_A`` in
        the first ``highres_limit_estep_iterations`` (in all of them when that is null), else none."""
        if self.highres_limit_estep_iterations is not None and iteration > self.highres_limit_estep_iterations:
            return None
        return self.highres_limit_estep_A

    def current_radius(self, model: ClassModel, iteration: int) -> int:
        """Fourier radius (shells) used this iteration: RELION's rule, the best class
        resolution (``ini_high_A`` in the first iteration) plus ``increment_shells``, capped by
        the iteration's E-step limit and by the memory (:meth:`radius_in_memory`, with a
        warning where that cap binds)."""
        shell = self.box * self.pixel / self.ini_high_A if (iteration == 1 and self.ini_high_A) else float(model.resolution_shells().max())
        radius = int(min(self.box // 2, math.ceil(shell) + self.increment_shells))
        limit = self.estep_limit_A(iteration)
        if limit:
            radius = min(radius, int(self.box * self.pixel / limit))
        if radius > self.memory_radius:
            log.warning(
                "iteration %d: images of %d px instead of %d: memory holds the sums of %d classes up to %.3g Å (the warning at the start names what lifts it)",
                iteration, 2 * self.memory_radius, 2 * radius, self.n_classes, self.box * self.pixel / self.memory_radius,
            )
            radius = self.memory_radius
        return max(radius, 3)

    def grids_at_peak(self, sum_tree_leaves: int) -> float:
        """Grids of the iteration's crop (12 bytes a voxel: a complex sum and a weight) alive
        at the peak of an iteration: per class, its projector, the leaf's sums and a pending
        sum for each level of the summation tree of ``sum_tree_leaves`` leaves; for all
        classes together, the M-step's work on one class. Peak resident memory, with the
        crop at Nyquist, grew by 2.2–3.0 grids a class with 1 leaf and 4.7–5.3 with 8 (boxes
        of 96 and 128, K = 2 and 6, with and without alignment, τ² from the maps and from the
        FSC), and held about 6 grids beside them; this is 0.5 grid a class above them."""
        return 6 + self.n_classes * (3.5 + math.log2(sum_tree_leaves))

    def sums_bytes(self, grid_size: int, sum_tree_leaves: int) -> float:
        """Bytes of :meth:`grids_at_peak` on a ``(Q, Q, Q // 2 + 1)`` grid of ``grid_size`` Q."""
        return self.grids_at_peak(sum_tree_leaves) * grid_size * grid_size * (grid_size // 2 + 1) * 12.0

    def radius_in_memory(self, context: RunContext) -> int:
        """The largest Fourier radius (shells, at most Nyquist) whose crop of the padded grid
        holds :meth:`sums_bytes` in this process's :func:`~cryotorch.runtime.memory_share`,
        beside the arrays sized from the memory budget. Where it is short of Nyquist, a
        warning names the resolution it allows and what lifts the cap; where not even 3
        shells fit, an error asks for fewer classes."""
        share = context.maps_memory_share(len(self.table), self.full_box)
        leaves = context.sum_tree_leaves

        def needed(radius: int) -> float:
            return self.sums_bytes(crop_size(self.padded, self.box, radius), leaves)

        nyquist = radius = self.box // 2
        while radius > 3 and needed(radius) > share.available_bytes:
            radius -= 1
        if needed(radius) > share.available_bytes:
            raise InputError(
                f"{self.name} with job.K={self.n_classes} needs about {needed(radius) / 1e9:.3g} GB for its class maps and sums even at 3 shells, "
                f"more than {share.describe()}; use fewer classes or a smaller compute.memory_budget_gb"
            )
        if radius < nyquist:
            log.warning(
                "%s: the class maps and sums of %d classes at Nyquist (%.3g Å) take about %.3g GB, more than %s: images and maps stop at %.3g Å "
                "(%d px). For more, use fewer classes, a smaller compute.memory_budget_gb, compute.sum_tree_leaves=1 (%.3g GB at Nyquist; the same bits "
                "then only on one process), or a device with more memory",
                self.name, self.n_classes, 2 * self.pixel, needed(nyquist) / 1e9, share.describe(), self.box * self.pixel / radius, 2 * radius,
                self.sums_bytes(self.padded, 1) / 1e9,
            )
        return radius

    def active_rows(self, context: RunContext, iteration: int) -> np.ndarray:
        """Every rank's particles this iteration (RELION's fast subsets in the first iterations)."""
        n = len(self.table)
        fractions = {1: 0.1, 2: 0.3, 3: 0.6}
        if not self.fast_subsets or iteration not in fractions or n < 1000:
            return np.arange(n)
        size = max(1000, int(fractions[iteration] * n))
        return np.sort(np.random.default_rng([context.seed, iteration]).permutation(n)[:size])

    def iterate(self, context: RunContext, model: ClassModel, state: ParticleState, iteration: int) -> ParticleState:
        """One E-step over this rank's leaves of the iteration's batches, their sums added
        across ranks in the summation tree's order, M-step, outputs; the seconds of each phase
        are logged and written to TensorBoard."""
        sampling = self.sampling_at(context, iteration)
        device, box, pixel = self.device, self.box, self.pixel
        timer = PhaseTimer(device, _PHASES)
        radius = self.current_radius(model, iteration)
        frequencies, component_index, shells = self.components(radius)
        # the crop of the padded grid that this iteration's components reach: the projector and
        # the sums hold only it
        grid_size = crop_size(self.padded, box, radius)
        # the maps were masked once (reference, M-step), as RELION's projector holds them
        volumes_ft = prepare_fourier_volumes(model.volumes, context.padding_factor, grid_size)
        budget = context.memory_budget_bytes
        grid = None
        coarse = None
        fine = None
        unrefined = None
        oversampled_limit = sampling["max_significant_oversampled"]
        n_coarse = frequencies.shape[0]
        if sampling["align"]:
            grid = self.pose_grid(context, iteration)
            coarse_shell = min(radius, coarse_radius_shells(box, pixel, self.diameter_A, grid.coarse_step_deg))
            n_coarse = max(1, int((frequencies.norm(dim=-1) <= max(coarse_shell, 3)).sum()))
            coarse = CoarseProjections(volumes_ft, grid, frequencies[:n_coarse], box, budget, self.padded)
            fine = FinePassCache(volumes_ft, grid, frequencies, box, budget / 4, self.padded)
            if oversampled_limit is not None:
                unrefined = FinePassCache(volumes_ft, grid.without_oversampling(), frequencies, box, budget / 8, self.padded)
        piece_rotations = None
        if grid is None:
            batch_size = int(max(1, min(512, budget / 4 / (self.n_classes * 16 + frequencies.shape[0] * 64))))
        elif sampling["local_search_deg"] is None:
            assert coarse is not None
            batch_size, piece_rotations = global_search_batches(
                grid.coarse_shifts_px.shape[0], self.n_classes, grid.n_rotations, frequencies.shape[0], n_coarse, budget / 4, coarse.holds_all
            )
        else:
            # a local search scores its batch against the union of the particles'
            # neighbourhoods, up to B·S orientations for S each, so that its score matrix
            # (B, T, K·B·S) grows as B², while larger batches share their fixed costs; on a
            # CPU the matrix is kept to about 2^18 values (1 MiB), the fastest on the
            # benchmark set at 7.5° and at 3.75° coarse steps (16 and 7 particles)
            values = 2**18 if device.type == "cpu" else budget / 64
            n_local = local_search_size(grid, float(sampling["local_search_deg"]) / 3)
            batch_size = int(max(1, min(512, math.sqrt(values / (grid.coarse_shifts_px.shape[0] * self.n_classes * n_local)))))
        settings = EStepSettings(
            frequencies=frequencies,
            n_coarse=n_coarse,
            box_size=box,
            pixel_size_angstrom=pixel,
            align=bool(sampling["align"]),
            significance=float(sampling["significance"]),
            max_significant=int(sampling["max_significant"]),
            max_significant_oversampled=None if oversampled_limit is None else int(oversampled_limit),
            local_sigma_deg=None if sampling["local_search_deg"] is None else float(sampling["local_search_deg"]) / 3,
            scale_sigma=self.scale_sigma(bool(sampling["align"])),
            # dense fine-pass score matrices: on a CPU small enough to stay in cache
            memory_budget_bytes=min(budget / 4, 2**26) if device.type == "cpu" else budget / 4,
            coarse_piece_rotations=piece_rotations,
            padded_size=self.padded,
        )
        forced = self.forced_classes(context, iteration)
        passes = self.pass_samples(iteration, grid, unrefined, n_coarse, frequencies.shape[0])
        rows = self.active_rows(context, iteration)
        if sampling["align"] and sampling["local_search_deg"] is not None:
            rows = self.by_orientation(state, rows)
        # with the FSC-based τ² each half set is summed on its own; each set's batches are
        # the leaves of a summation tree, whose order the processes keep between them
        row_sets = [rows] if self.half_sets is None else [rows[self.half_sets[rows] == h] for h in (1, 2)]
        plans = [context.tree_leaves(part, batch_size) for part in row_sets]
        steps = [(number, leaf, batches) for number, plan in enumerate(plans) for leaf, batches in plan]
        own_rows = np.concatenate([batch for _, _, batches in steps for batch in batches] or [rows[:0]])
        new_state = ParticleState(**{k: v.clone() for k, v in vars(state).items()})
        log_prior = torch.log(model.class_weights.clamp(min=1e-30)).float()
        # as RELION: a reference that is not CTF-corrected is compared without CTFs in the first iteration
        use_ctf = self.ctf and (iteration > 1 or self.reference_ctf_corrected)
        offsets = SelfFitOffsets.zeros(state.class_number.shape[0], self.n_classes, passes is not None, device) if self.self_fit_applies(model, state, rows) else None
        carried = self.carried_caches([fine, unrefined], context.sum_tree_leaves, budget, len(row_sets))
        drained = [cache for cache in (fine, unrefined) if cache is not None and cache not in carried]
        trees: list[SumTree[TreeSums]] = [SumTree() for _ in row_sets]
        bar = progress_bar(sum(len(batches) for _, _, batches in steps), f"iteration {iteration}", enabled=context.is_main, unit="batch")
        timer.lap("set-up")
        for number, leaf, batches in steps:
            stats = self.empty_sums(self.n_classes, grid_size)
            if offsets is not None and batches:
                self.self_fit_offsets(offsets, model, state, np.concatenate(batches), frequencies, shells, passes, use_ctf, budget / 4)
            timer.lap("self-fit")
            for chunk in batches:
                bar.update()
                index = torch.as_tensor(chunk, device=device)
                batch = self.prepare(model, state, chunk, component_index, shells, frequencies, use_ctf)
                groups = torch.as_tensor(self.groups[chunk], device=device)
                forced_chunk = None if forced is None else forced[index]
                class_offset = None if offsets is None else offsets.select(index)
                timer.lap("images")
                result = expectation(batch, volumes_ft, coarse, grid, fine, log_prior, float(model.offset_sigma_angstrom), settings, forced_chunk, class_offset, unrefined, timer)
                self.expand_symmetry(result.slices)
                new_state.store(index, result)
                timer.lap("E-step")
                noise_ratio = stats.accumulate(result, batch, groups, shells, frequencies, box, pixel, budget / 4, self.padded)
                if self.norm_correction:
                    new_state.norm_correction[index] = state.norm_correction[index] * noise_ratio.sqrt().float()
                timer.lap("back-projection")
            # the slice sums held by the caches belong to this leaf
            for cache in drained:
                stats.insert(self.expand_symmetry(cache.drain()), frequencies, box, budget / 4, self.padded)
            trees[number].add_leaf(leaf, TreeSums(stats, [cache.take_table() for cache in carried]))
            timer.lap("back-projection")
        bar.close()
        sets = []
        for tree in trees:
            node = tree.total() or TreeSums(self.empty_sums(self.n_classes, grid_size), [cache.empty_table() for cache in carried])
            if context.fabric.world_size > 1:
                # processes add their nodes' tables in the same layout: a row for every id
                node = TreeSums(node.stats, [table.dense(cache.n_ids) for cache, table in zip(carried, node.tables)])
            sums = context.tree_sum(node, budget / 8)
            timer.lap("all-reduce")
            for cache, table in zip(carried, sums.tables):
                sums.stats.insert(self.expand_symmetry(cache.table_slices(table)), frequencies, box, budget / 4, self.padded)
            sets.append(sums.stats)
            timer.lap("back-projection")
        stats = sets[0] if len(sets) == 1 else sets[0].add_(sets[1])
        new_state = self.gather_state(context, new_state, own_rows)
        if self.norm_correction:
            # relative to the mean of the particles seen (RELION's normcorr / avg_norm_correction)
            seen = new_state.class_number > 0
            new_state.norm_correction[seen] /= new_state.norm_correction[seen].mean()
        timer.lap("all-reduce")
        references = model.volumes.clone()
        empty = maximization(model, stats, self.tau2_fudge, radius, self.mask, self.common_frame, self.symmetry, self.tau2_estimate, sets[-1] if len(sets) > 1 else None, self.padded)
        if not self.update_references:
            # classification against fixed maps: only noise, scales and class weights are learnt;
            # the maps hold none of the particles' data, so nothing is discounted as self-fit
            model.volumes.copy_(references)
            model.inserted_radius.zero_()
        timer.lap("M-step")
        self.report(context, model, state, new_state, iteration, radius, empty, n_coarse)
        timer.lap("outputs")
        log.info("iteration %d took %.1f s: %s", iteration, sum(timer.seconds.values()), timer.summary())
        log_scalars(context.writer, {f"class3d/seconds/{name}": seconds for name, seconds in timer.seconds.items()}, iteration)
        return new_state

    @staticmethod
    def by_orientation(state: ParticleState, rows: np.ndarray) -> np.ndarray:
        """``rows`` ordered by their current orientation (viewing direction on a HEALPix order-4
        grid in nested order, then psi), so that the particles of a batch lie close together
        and a local search scores only their neighbourhood's orientations."""
        n_psi_bins = 48  # 7.5° each
        euler = torch.deg2rad(state.euler_deg[torch.as_tensor(rows, device=state.euler_deg.device)].double())
        pixel = ang2pix_nest(4, euler[:, 1], euler[:, 0])
        psi_bin = torch.floor(torch.remainder(euler[:, 2], 2 * math.pi) * (n_psi_bins / (2 * math.pi))).long().clamp(max=n_psi_bins - 1)
        return rows[np.argsort((pixel * n_psi_bins + psi_bin).cpu().numpy(), kind="stable")]

    def scale_sigma(self, align: bool) -> float:
        """Width of the intensity-scale prior: the setting, or 0.2 without alignment and 0 with.

        With alignment the benchmark classes separate worse with the scale (profiled per class
        at its best coarse sample) than with the plain likelihood (``docs/benchmarks.md``).
        """
        if self.scale_prior_sigma is not None:
            return self.scale_prior_sigma
        return 0.0 if align else 0.2

    def sampling_at(self, context: RunContext, iteration: int) -> dict[str, Any]:
        """The sampling settings of ``iteration``: those of the config, except in the last
        ``sampling.final_local_iterations``, which search locally (``final_local_search_deg``)
        at the finer ``final_angular_step_deg``, and translations over ``final_offset_range_px``
        at ``final_offset_step_px`` where these are set."""
        sampling = dict(context.sampling)
        if sampling["align"] and iteration > self.n_iterations - int(sampling["final_local_iterations"]):
            sampling["angular_step_deg"] = float(sampling["final_angular_step_deg"])
            sampling["local_search_deg"] = float(sampling["final_local_search_deg"])
            for name in ("offset_range_px", "offset_step_px"):
                if sampling.get(f"final_{name}") is not None:
                    sampling[name] = float(sampling[f"final_{name}"])
        return sampling

    def pose_grid(self, context: RunContext, iteration: int) -> PoseGrid:
        """The coarse/fine pose grid of the iteration's sampling settings (each built once per
        run), moved by this iteration's random perturbation (``sampling.perturb``, RELION's
        ``--perturb``), with its translations' children on the side of this iteration
        (:func:`~cryotorch.em.sampling.mirror_translation_children`)."""
        sampling = self.sampling_at(context, iteration)
        order, coarse_step = self.coarse_sampling(sampling)
        key = order, float(sampling["offset_range_px"]), coarse_step
        if key not in self._pose_grids:
            self._pose_grids[key] = build_pose_grid(order, key[1], coarse_step, context.symmetry, int(sampling["oversampling"]), self.device)
        grid = self._pose_grids[key]
        # the translations' children along +x and +y in odd iterations, along −x and −y in even ones
        grid = grid if iteration % 2 else mirror_translation_children(grid)
        perturbation = grid_perturbation(context.seed, iteration, float(sampling["perturb"]))
        return perturb_pose_grid(grid, perturbation, coarse_step)

    @staticmethod
    def coarse_sampling(sampling: dict[str, Any]) -> tuple[int, float]:
        """HEALPix order and translation step (px) of the coarse pass of ``sampling``.

        The settings are the final, oversampled steps (RELION's GUI); the coarse pass runs at
        an order lower and a translation step 2^oversampling larger (relion_refine's).
        """
        oversampling = int(sampling["oversampling"])
        order = max(0, order_from_angular_step(sampling["angular_step_deg"]) - oversampling)
        return order, float(sampling["offset_step_px"]) * 2**oversampling

    @staticmethod
    def pass_samples(
        iteration: int, grid: PoseGrid | None, unrefined: FinePassCache | None, n_coarse: int, n_components: int
    ) -> tuple[PassSamples, PassSamples] | None:
        """The samples of this iteration's passes that a particle's last pose can be nearest
        to: the coarse samples, scored by the coarse pass (its first ``n_coarse`` components)
        and by the unrefined fine pass (every component; only with ``unrefined``), and the fine
        samples (the grid's children, every component). Each with the
        shift from the particle's position to their nearest translation
        (:func:`~cryotorch.em.sampling.nearest_translation_px`); None without alignment or in
        the first iteration."""
        if grid is None or iteration == 1:
            return None
        coarse_counts = (n_coarse,) if unrefined is None else (n_coarse, n_components)
        return (
            PassSamples(GridSamples(grid.without_oversampling()), nearest_translation_px(grid.without_oversampling()).float(), coarse_counts),
            PassSamples(GridSamples(grid), nearest_translation_px(grid).float(), (n_components,)),
        )

    def forced_classes(self, context: RunContext, iteration: int) -> torch.Tensor | None:
        """RELION's random class split of identical initial references (first iteration only)."""
        if iteration != 1 or self.n_classes == 1 or len(self.references) > 1:
            return None
        labels = np.random.default_rng(context.seed).integers(self.n_classes, size=len(self.table))
        return torch.as_tensor(labels, device=self.device)

    def empty_sums(self, n_classes: int, grid_size: int | None = None) -> SufficientStatistics:
        """Zero sums of ``n_classes`` maps at this job's box, optics groups and shells, on
        grids of ``grid_size`` (None: the whole padded grid)."""
        return SufficientStatistics.zeros(n_classes, self.padded if grid_size is None else grid_size, len(self.group_names), self.box // 2 + 1, self.device)

    @staticmethod
    def carried_caches(caches: list[FinePassCache | None], n_leaves: int, memory_budget_bytes: float, n_trees: int = 1) -> list[FinePassCache]:
        """The fine-pass caches whose slice sums go up the summation tree as whole tables and
        are inserted once per iteration, rather than once per leaf: those whose sum table
        holds every fine id, while the tables the trees may hold at once (one per level below
        the root and the last leaf's, log2(L) + 1, and the roots of the ``n_trees`` − 1
        trees summed before: the FSC's half sets) fit a quarter of ``memory_budget_bytes``,
        the smaller tables first. Where posteriors are broad, nearly every orientation is in
        every leaf, and inserting the leaves' sums one by one multiplies the insertions by
        up to L (``docs/benchmarks.md``). The choice depends on sizes only, so every process
        count makes it alike."""
        copies = round(math.log2(n_leaves)) + n_trees
        carried: list[FinePassCache] = []
        held = 0
        for cache in sorted((c for c in caches if c is not None and c.holds_every_sum), key=lambda c: c.slice_table_bytes):
            if held + copies * cache.slice_table_bytes <= memory_budget_bytes / 4:
                carried.append(cache)
                held += copies * cache.slice_table_bytes
        return carried

    def self_fit_applies(self, model: ClassModel, state: ParticleState, rows: np.ndarray) -> bool:
        """Whether an iteration over ``rows`` (every rank's) discounts self-fits: not before
        the particles have classes and the maps hold their data."""
        return self.discount_self_fit and int(state.class_number[torch.as_tensor(rows, device=self.device)].max()) > 0 and float(model.inserted_radius) > 0

    def self_fit_offsets(
        self,
        offsets: SelfFitOffsets,
        model: ClassModel,
        state: ParticleState,
        rows: np.ndarray,
        frequencies: torch.Tensor,
        shells: torch.Tensor,
        passes: tuple[PassSamples, PassSamples] | None,
        use_ctf: bool,
        work_bytes: float,
    ) -> None:
        """:meth:`self_fit_discount` of the particles ``rows`` (a leaf of the iteration's
        batches), stored in ``offsets``; computed before their E-step in chunks of particles
        whose work arrays fit ``work_bytes`` (it needs only their CTFs and last poses), so that
        small batches do not each pay its fixed costs."""
        # about 256 bytes of work arrays per component of a particle (on a CPU, chunks of at
        # most CPU_CHUNK_BYTES, as extractions)
        size = rotation_chunk_size(frequencies.shape[0], 256, work_bytes, self.device)
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            index = torch.as_tensor(chunk, device=self.device)
            groups = torch.as_tensor(self.groups[chunk], device=self.device)
            scale = model.group_scale[groups].float()
            offsets.store(index, self.self_fit_discount(model, scale, self.ctf_of(chunk, frequencies, use_ctf), state, index, frequencies, shells, groups, passes))

    def self_fit_discount(
        self,
        model: ClassModel,
        scale: torch.Tensor,
        ctf: torch.Tensor,
        state: ParticleState,
        index: torch.Tensor,
        frequencies: torch.Tensor,
        shells: torch.Tensor,
        groups: torch.Tensor,
        passes: tuple[PassSamples, PassSamples] | None = None,
    ) -> torch.Tensor | PassOffsets:
        """``(B, K)`` cross-term each particle gains from its own share of its last class map;
        with alignment one for each pass of the E-step.

        ``scale`` ``(B,)`` and ``ctf`` ``(B, M)`` are the particles' intensity scales and
        CTFs, ``frequencies`` ``(M, 2)`` and ``shells`` ``(M,)`` the iteration's components and
        their shells, ``groups`` ``(B,)`` the particles' optics groups, ``passes`` the
        coarse and the fine samples of this iteration (:meth:`pass_samples`).

        A particle that helped to make map k fits it better by its own noise. Its inserted
        ``L' = s·CTF·X/σ'²`` (weight ``2Q'``, with the noise variances ``σ'²`` of the last
        E-step) returns in the projection at the same pose as ``L' · share``, with
        ``share = kept · Σ_v c_v/(weight_v + 1/τ²)`` from the last reconstruction
        (:func:`~cryotorch.ops.backprojection.self_overlap_sum`; ``kept`` and the neighbour
        overlap account for the crop to the unpadded box, the gridding correction and the
        solvent mask). Scored with ``L = s·CTF·X/σ²``, that raises the score by
        ``Re(L̄·L')·share``, whose noise part is ``2σ²·s²CTF²/(σ²σ'²) = 4Q'`` per component,
        times the weight ``p(k | X)`` with which the particle went into that map, and only in
        the components the last iteration inserted (its radius). Removing this expected
        self-fit — a leave-one-out estimate at the particle's last pose — stops the initial
        random class split from holding particles in place; after a random split of identical
        particles, half of them change class (``tests/test_class3d.py``). The E-step adds it
        to the cross term, so that a profiled intensity scales it as it scales the self-fit.

        With alignment the particle's own contribution returns in each pass at the pass's
        sample nearest to its last pose (:class:`PassSamples`): the share is taken between the
        last orientation and the pass's nearest orientation (on a perturbed grid none lies at
        the last pose, and the coarse pass's lie up to half its step away), each component's
        self-fit turns by the phase of the shift Δs to the pass's nearest translation (none:
        both passes score the particle's position, but on a perturbed grid),
        ``cos(2π f·Δs / N)``, and only the pass's components count. The coarse pass scores a
        few low-resolution components, so its self-fit is a small part of the fine pass's; a
        coarse pass discounted by the fine pass's would drop the last class's samples before
        the fine pass sees them (80 % instead of half changed class after the split at 15°
        with 200 particles). That self-fit ``s`` raises one pose's score, so the class's
        evidence rises by ``log(1 − q + q·e^s)`` with ``q`` the pose's share of the class's
        posterior in the last iteration (``max_posterior / class_probability``).
        """
        inserted = frequencies.norm(dim=-1) <= float(model.inserted_radius)
        # 4Q' = 2·(s·CTF)²/σ'², with the noise variances the sums were weighted with
        four_q = 2.0 * (scale[:, None] * ctf) ** 2 / model.inserted_sigma2[groups][:, shells].float().clamp(min=1e-30)
        rotations = euler_deg_to_matrix(state.euler_deg[index]).float()
        if passes is None:
            return self.self_fit(model, state, index, rotations, frequencies[inserted], four_q[:, inserted])[0]
        coarse_samples, fine_samples = passes
        coarse = self.self_fit(model, state, index, rotations, frequencies[inserted], four_q[:, inserted], coarse_samples)
        (fine,) = self.self_fit(model, state, index, rotations, frequencies[inserted], four_q[:, inserted], fine_samples)
        return PassOffsets(coarse[0], fine, coarse[1] if len(coarse) > 1 else None)

    def self_fit(
        self,
        model: ClassModel,
        state: ParticleState,
        index: torch.Tensor,
        rotations: torch.Tensor,
        frequencies: torch.Tensor,
        four_q: torch.Tensor,
        samples: PassSamples | None = None,
    ) -> list[torch.Tensor]:
        """``(B, K)`` minus the self-fit of :meth:`self_fit_discount` in the inserted
        components ``frequencies`` ``(m, 2)`` (sorted by radius; ``four_q`` ``(B, m)`` their
        4Q'), for particles at their last orientations ``rotations`` ``(B, 3, 3)``, returning
        at the nearest of ``samples`` (None: at the last pose itself, without alignment): one
        for each pass of ``samples``, over the inserted components among its first ones
        (without alignment one, over all)."""
        previous = state.class_number[index]
        counts = [frequencies.shape[0]]
        extracted = None
        if samples is not None:
            counts = [min(n, frequencies.shape[0]) for n in samples.component_counts]
            # the components beyond the passes' own are not scored: no self-fit there
            frequencies, four_q = frequencies[: max(counts)], four_q[:, : max(counts)]
            extracted = samples.orientations.nearest(rotations)
            four_q = four_q * torch.cos(2 * math.pi / self.box * (frequencies @ samples.shift_px))
        discounts = [torch.zeros(previous.shape[0], self.n_classes, device=four_q.device) for _ in counts]
        members = (previous > 0).nonzero()[:, 0]
        if members.numel():
            # each particle over the map of its last class, all classes in one sum
            classes = previous[members] - 1
            share = self_overlap_sum(
                model.inverse_denominator, rotations[members], frequencies, self.box, self.self_overlap, None if extracted is None else extracted[members], classes, self.padded,
            )
            weight = state.class_probability[index[members]]  # its share of the class's sums
            terms = four_q[members] * share
            # with alignment the self-fit raises one pose's score: the class's evidence rises
            # by log(1 − q + q·e^s), q that pose's share of the class's posterior
            pose_share = None if samples is None else (state.max_posterior[index[members]] / weight.clamp(min=1e-30)).clamp(1e-6, 1)
            for discount, count in zip(discounts, counts):
                self_fit = self.self_kept * weight * terms[:, :count].sum(-1)
                if pose_share is not None:
                    self_fit = torch.logaddexp(torch.log1p(-pose_share.clamp(max=1 - 1e-6)), torch.log(pose_share) + self_fit)
                discount[members, classes] = -self_fit
        return discounts

    def self_fit_geometry(self, padded: int) -> tuple[float, float]:
        """Fraction of a single padded-grid voxel change kept by crop, gridding and mask, and
        the fraction its axis neighbours receive (the overlap of :func:`self_overlap_sum`)."""
        weighting = self.mask / gridding_kernel_3d(self.box, padded, self.device) ** 2
        coordinate = torch.arange(self.box, device=self.device, dtype=torch.float32) - self.box // 2
        wave = torch.cos(2 * math.pi * coordinate / padded)
        overlap = sum(float((weighting * wave.reshape(shape)).sum()) for shape in ((-1, 1, 1), (1, -1, 1), (1, 1, -1))) / (3 * float(weighting.sum()))
        kept = float(weighting.mean()) * (self.box / padded) ** 3
        return kept, overlap

    def expand_symmetry(self, slices: list[WeightedSlices]) -> list[WeightedSlices]:
        """Every symmetry mate A·L of a slice's orientation receives the same data (in place)."""
        n_mates = self.symmetry.shape[0]
        if n_mates > 1:
            for item in slices:
                item.rotations = (item.rotations[:, None] @ self.symmetry[None]).reshape(-1, 3, 3)
                item.data = item.data.repeat_interleave(n_mates, dim=0)
                item.weight = item.weight.repeat_interleave(n_mates, dim=0)
        return slices

    def prepare(
        self,
        model: ClassModel,
        state: ParticleState,
        rows: np.ndarray,
        component_index: torch.Tensor,
        shells: torch.Tensor,
        frequencies: torch.Tensor,
        use_ctf: bool,
    ) -> PreparedBatch:
        """Images of ``rows`` as masked, prior-centred Fourier components with CTF (ones when
        ``use_ctf`` is False) and 1/σ²."""
        device, box = self.device, self.box
        images = torch.as_tensor(self.reader.read(rows), device=device)
        index = torch.as_tensor(rows, device=device)
        if self.norm_correction:
            images = images / state.norm_correction[index][:, None, None]
        origin = state.origin_px[index]
        shift = image_shift_from_origin(origin)
        # the mask follows each particle's current centre, as RELION masks the image once
        # centred by its prior offset
        masks = soft_disc_masks(box, self.mask_radius_px, 5.0, shift)
        if self.zero_mask:
            images = images * masks
        else:
            images = images * masks + (1 - masks) * self.background_noise(model, rows)
        spectra = rfft2_centered(images).reshape(len(rows), -1)[:, component_index]
        spectra = translate_2d_ft(spectra, -shift, frequencies, box)
        groups = torch.as_tensor(self.groups[rows], device=device)
        sigma2 = model.sigma2_noise[groups][:, shells].float()
        return PreparedBatch(
            spectra=spectra,
            ctf=self.ctf_of(rows, frequencies, use_ctf),
            inv_sigma2=1.0 / sigma2.clamp(min=1e-30),
            scale=model.group_scale[groups].float(),
            prior_origin_px=origin,
            prior_euler_deg=state.euler_deg[index],
        )

    def ctf_of(self, rows: np.ndarray, frequencies: torch.Tensor, use_ctf: bool) -> torch.Tensor:
        """``(B, M)`` CTFs of the particles ``rows`` at ``frequencies`` (ones when ``use_ctf``
        is False)."""
        if not use_ctf:
            return torch.ones(len(rows), frequencies.shape[0], device=self.device)
        ctf = compute_ctf(ctf_parameters(self.table, rows, self.device), frequencies, self.box, self.pixel)
        return self.flatten_before_first_peak(ctf, frequencies, rows) if self.ignore_ctf_until_first_peak else ctf

    def background_noise(self, model: ClassModel, rows: np.ndarray) -> torch.Tensor:
        """``(B, N, N)`` noise for the particles ``rows`` outside the mask, as RELION fills the
        solvent area without ``--zero_mask``: each particle's own white Gaussian draw, seeded
        by the run's seed and its row (the same in every iteration, batch and process),
        coloured by its optics group's current noise spectrum σ²."""
        white = np.stack([np.random.default_rng([self.seed, _BACKGROUND_NOISE_STREAM, int(row)]).standard_normal((self.box, self.box), dtype=np.float32) for row in rows])
        groups = torch.as_tensor(self.groups[rows], device=self.device)
        return coloured_noise_2d(torch.as_tensor(white, device=self.device), model.sigma2_noise[groups])

    def flatten_before_first_peak(self, ctf: torch.Tensor, frequencies: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Set |CTF| to 1 below each particle's first CTF maximum (RELION's option)."""
        profile_frequencies = torch.stack([torch.linspace(0, self.box / 2, 400, device=ctf.device), torch.zeros(400, device=ctf.device)], dim=-1)
        params = ctf_parameters(self.table, rows, ctf.device)
        params.defocus_angle_deg = torch.zeros_like(params.defocus_angle_deg)
        params.defocus_u_angstrom = params.defocus_v_angstrom = 0.5 * (params.defocus_u_angstrom + params.defocus_v_angstrom)
        profile = compute_ctf(params, profile_frequencies, self.box, self.pixel).abs()  # (B, 400)
        rising = torch.cat([profile[:, 1:] >= profile[:, :-1], torch.zeros_like(profile[:, :1], dtype=torch.bool)], dim=1)
        peak_index = (~rising).float().argmax(dim=1)
        peak_radius = profile_frequencies[peak_index, 0]  # (B,)
        return torch.where(frequencies.norm(dim=-1)[None] <= peak_radius[:, None], torch.ones_like(ctf), ctf)

    def gather_state(self, context: RunContext, state: ParticleState, rows: np.ndarray) -> ParticleState:
        """Every rank's updates of its own rows, on every rank."""
        if context.fabric.world_size == 1:
            return state
        index = torch.as_tensor(rows, device=self.device)
        n = len(self.table)
        gathered = {}
        for name in ParticleState.__dataclass_fields__:
            values = getattr(state, name)
            updated = context.gather_rows(index, values[index], n)
            touched = context.gather_rows(index, torch.ones(len(rows), dtype=torch.bool, device=self.device), n)
            gathered[name] = torch.where(touched.reshape(-1, *([1] * (values.dim() - 1))), updated, values)
        return ParticleState(**gathered)

    # ------------------------------------------------------------------ outputs
    def report(
        self,
        context: RunContext,
        model: ClassModel,
        previous: ParticleState,
        state: ParticleState,
        iteration: int,
        radius: int,
        empty: list[int],
        n_coarse: int,
    ) -> None:
        """Changes, RELION-style files, TensorBoard and the checkpoint (rank 0 writes)."""
        pixel = self.pixel
        assigned = previous.class_number > 0
        changes_classes = float((previous.class_number[assigned] != state.class_number[assigned]).float().mean()) if assigned.any() else 1.0
        changes_orientations = float(rotation_angle_deg(previous.euler_deg, state.euler_deg, self.symmetry).mean())
        changes_offsets = float((previous.origin_px - state.origin_px).norm(dim=-1).mean()) * pixel
        # particles no iteration has processed yet (RELION's fast subsets) hold class 0
        counts = torch.bincount(state.class_number[state.class_number > 0] - 1, minlength=self.n_classes).double()
        distribution = model.class_weights.cpu().numpy()
        collapsing = [k for k in range(self.n_classes) if distribution[k] < 0.5 / (10 * self.n_classes)]
        for k in sorted(set(empty) | set(collapsing)):
            log.warning("iteration %d: class %d is %s (%.2f %% of particles); it is kept but holds no reliable structure",
                        iteration, k + 1, "empty" if k in empty else "collapsing", 100 * distribution[k])
        accuracy = torch.zeros(self.n_classes, dtype=torch.float64)
        for k in range(self.n_classes):
            members = state.class_number == k + 1
            if members.any():
                accuracy[k] = float(state.angular_spread_deg[members].mean())
        resolution = model.resolution_angstrom().cpu()
        if context.is_main:
            self.write_outputs(context, model, state, iteration, radius, accuracy, resolution, distribution, n_coarse,
                               (changes_orientations, changes_offsets, changes_classes))
        writer = context.writer
        seen = state.class_number > 0
        any_seen = bool(seen.any())
        scalars = {
            "class3d/changes_classes": changes_classes,
            "class3d/changes_orientations_deg": changes_orientations,
            "class3d/changes_offsets_angstrom": changes_offsets,
            "class3d/log_likelihood": float(state.log_likelihood.sum()),
            "class3d/average_pmax": float(state.max_posterior.mean()),
            # effective number of classes per particle, 1/Σ_k p_k² (1: sure of its class, K: none)
            "class3d/mean_class_ess": float(state.class_ess[seen].mean()) if any_seen else 0.0,
            "class3d/mean_significant_samples": float(state.n_significant[seen].double().mean()) if any_seen else 0.0,
            "class3d/current_resolution_angstrom": self.box * pixel / radius,
        }
        for k in range(self.n_classes):
            scalars[f"class3d/resolution_angstrom/class{k + 1:03d}"] = float(resolution[k])
            scalars[f"class3d/class_distribution/class{k + 1:03d}"] = float(distribution[k])
            scalars[f"class3d/class_particles/class{k + 1:03d}"] = float(counts[k])
        log_scalars(writer, scalars, iteration)
        if writer is not None:
            writer.add_histogram("class3d/max_posterior", state.max_posterior.cpu(), iteration)
            if any_seen:
                writer.add_histogram("class3d/class_ess", state.class_ess[seen].cpu(), iteration)
            for k in range(self.n_classes):
                log_central_slices(writer, f"class3d/class{k + 1:03d}", model.volumes[k], iteration)
        log.info(
            "iteration %d: resolution %s Å, classes %s, changes: classes %.3f, orientations %.2f°, offsets %.2f Å",
            iteration, [round(float(r), 1) for r in resolution], [int(c) for c in counts], changes_classes, changes_orientations, changes_offsets,
        )
        if context.is_main:
            self.save_checkpoint(context, model, state, iteration)
        context.fabric.barrier()

    def write_outputs(
        self,
        context: RunContext,
        model: ClassModel,
        state: ParticleState,
        iteration: int,
        radius: int,
        accuracy: torch.Tensor,
        resolution: torch.Tensor,
        distribution: np.ndarray,
        n_coarse: int,
        changes: tuple[float, float, float],
    ) -> None:
        """``run_itNNN_{data,model,optimiser,sampling}.star`` and ``run_itNNN_classNNN.mrc``."""
        out = context.output_dir
        root = f"run_it{iteration:03d}"
        pixel = self.pixel
        class_paths = []
        for k in range(self.n_classes):
            path = out / f"{root}_class{k + 1:03d}.mrc"
            write_mrc(path, model.volumes[k].cpu(), pixel)
            class_paths.append(str(path))
        table = self.table.select(np.arange(len(self.table)))
        table.euler_deg = state.euler_deg.cpu().numpy()
        table.origin_angstrom = state.origin_px.double().cpu().numpy() * pixel
        table.has_poses = True
        write_particles(
            out / f"{root}_data.star",
            table,
            {
                "rlnClassNumber": state.class_number.cpu().numpy(),
                "rlnMaxValueProbDistribution": state.max_posterior.cpu().numpy(),
                "rlnNrOfSignificantSamples": state.n_significant.cpu().numpy(),
                "rlnLogLikeliContribution": state.log_likelihood.cpu().numpy(),
                "rlnNormCorrection": state.norm_correction.double().cpu().numpy(),
            },
        )
        sigma2 = model.sigma2_noise.cpu().numpy()
        offsets_accuracy = float(model.offset_sigma_angstrom)
        write_model_star(
            out / f"{root}_model.star",
            ModelSummary(
                box_size=self.box,
                pixel_size_angstrom=pixel,
                current_resolution_angstrom=float(model.resolution_angstrom().min()),
                current_image_size=2 * radius,
                padding_factor=context.padding_factor,
                tau2_fudge=self.tau2_fudge,
                sigma_offsets_angstrom=float(model.offset_sigma_angstrom),
                log_likelihood=float(state.log_likelihood.sum()),
                average_pmax=float(state.max_posterior.mean()),
                classes=[
                    ClassSummary(
                        map_name=class_paths[k],
                        distribution=float(distribution[k]),
                        accuracy_rotations_deg=float(accuracy[k]),
                        accuracy_translations_angstrom=offsets_accuracy,
                        resolution_angstrom=float(resolution[k]),
                        ssnr=model.ssnr[k].cpu().numpy(),
                        tau2=model.tau2[k].cpu().numpy(),
                        # 1/(p³·mean weight) = T·τ²/SSNR, the noise left in the reconstruction
                        sigma2=torch.where(model.ssnr[k] > 0, self.tau2_fudge * model.tau2[k] / model.ssnr[k].clamp(min=1e-30), 0.0).cpu().numpy(),
                    )
                    for k in range(self.n_classes)
                ],
                group_names=self.group_names,
                group_particle_counts=np.bincount(self.groups, minlength=len(self.group_names)),
                group_scales=model.group_scale.cpu().numpy(),
                group_sigma2_noise=sigma2,
            ),
        )
        sampling = self.sampling_at(context, iteration)
        order, coarse_step_px = self.coarse_sampling(sampling)
        write_sampling_star(
            out / f"{root}_sampling.star",
            SamplingSummary(
                healpix_order=order,
                symmetry=context.symmetry,
                psi_step_deg=angular_step_deg(order),
                offset_range_angstrom=float(sampling["offset_range_px"]) * pixel,
                offset_step_angstrom=coarse_step_px * pixel,
                perturbation=grid_perturbation(context.seed, iteration, float(sampling["perturb"])),
                perturbation_factor=float(sampling["perturb"]),
            ),
        )
        write_optimiser_star(
            out / f"{root}_optimiser.star",
            OptimiserSummary(
                output_root=str(out / "run"),
                model_star=str(out / f"{root}_model.star"),
                data_star=str(out / f"{root}_data.star"),
                sampling_star=str(out / f"{root}_sampling.star"),
                iteration=iteration,
                n_iterations=self.n_iterations,
                oversampling_order=int(sampling["oversampling"]),
                oversampling_fraction=float(sampling["significance"]),
                random_seed=context.seed,
                particle_diameter_angstrom=self.diameter_A,
                zero_mask=self.zero_mask,
                solvent_flattening=True,
                solvent_mask=self.reference_mask or "None",
                highres_limit_estep_angstrom=self.estep_limit_A(iteration) or -1.0,
                increment_shells=self.increment_shells,
                fast_subsets=self.fast_subsets,
                skip_align=not sampling["align"],
                correct_ctf=self.ctf,
                ignore_ctf_until_first_peak=self.ignore_ctf_until_first_peak,
                references_ctf_corrected=self.reference_ctf_corrected,
                changes_orientations_deg=changes[0],
                changes_offsets_angstrom=changes[1],
                changes_classes=changes[2],
                overall_accuracy_rotations_deg=float(accuracy.mean()),
                overall_accuracy_translations_angstrom=offsets_accuracy,
            ),
        )
