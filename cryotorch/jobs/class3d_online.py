"""``+job=class3d_online``: CryoSPARC-style 3D classification of posed particles by online EM.

Particles keep the poses of a consensus refinement; only classes are inferred, with the
E-step (:func:`cryotorch.em.estep.expectation`, no alignment), M-step sums
(:class:`cryotorch.em.mstep.SufficientStatistics`), outputs, checkpoints, TensorBoard and
process sharding of :class:`~cryotorch.jobs.class3d.Class3DJob`, of which this job is a
subclass. What differs is the schedule and the map update:

1. a consensus map V̄ from all particles; per-particle intensity scales against it;
2. initial classes from the given maps, or reconstructions of random subsets
   (``init_mode=simple``), or K seeds from PCA and k-means of many small random-subset
   reconstructions (``init_mode=pca``);
3. online EM: epochs over shuffled minibatches; the running statistics decay by the learning
   rate ``η`` and take in the minibatch (scaled to the data set), ``S ← (1−η)·S + η·(N/B)·S_B``;
4. full-batch EM until few particles switch class and the class maps stop changing.

Each class map used in the E-step is ``S·(F·V_k + (1−F)·V̄)`` (solvent mask S, focus mask F),
and each is filtered by its own half-set FSC, recomputed from the (decayed) statistics at
every update. Posteriors are flattened early on to a target class ESS (class similarity β,
annealed to 0). Images and maps are Fourier-cropped to the target resolution.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryotorch.conventions import euler_deg_to_matrix
from cryotorch.data.particles import CommonGridReader, half_set_labels
from cryotorch.em.estep import EStepSettings, PreparedBatch, WeightedSlices, expectation
from cryotorch.em.mstep import SufficientStatistics, half_set_reconstruction, update_noise_and_weights
from cryotorch.em.sums import SumTree, TensorSums
from cryotorch.errors import InputError
from cryotorch.io import ParticleTable, write_particles
from cryotorch.jobs.class3d import Class3DJob, ParticleState
from cryotorch.jobs.context import RunContext
from cryotorch.model.class_model import ClassModel
from cryotorch.monitor import progress
from cryotorch.monitor.plots import save_class_sizes_plot, save_histogram_plot
from cryotorch.ops.fourier import fourier_resample, squared_magnitude
from cryotorch.ops.projection import extract_slices, padded_box_size, prepare_fourier_volumes

log = logging.getLogger(__name__)

__all__ = ["OnlineClass3DJob", "FourierCroppedReader"]


class FourierCroppedReader:
    """A :class:`~cryotorch.data.particles.CommonGridReader` whose images are Fourier-cropped to ``box_size``."""

    def __init__(self, reader: CommonGridReader, box_size: int) -> None:
        self.reader, self.box_size = reader, box_size

    def read(self, rows: np.ndarray) -> np.ndarray:
        """``(B, n, n)`` cropped images of table ``rows``."""
        images = self.reader.read(rows)
        if images.shape[-1] == self.box_size:
            return images
        return fourier_resample(torch.as_tensor(images), self.box_size, ndim=2).numpy()


@dataclass
class HalfSetStatistics(TensorSums):
    """The :class:`~cryotorch.em.mstep.SufficientStatistics` of the two half sets, a node of
    a summation tree."""

    halves: list[SufficientStatistics]

    def tensors(self) -> list[torch.Tensor]:
        """Every sum, in a fixed order, for summation across processes."""
        return [tensor for stats in self.halves for tensor in stats.tensors()]


class OnlineClass3DJob(Class3DJob):
    """Online-EM classification without alignment; every parameter is a key of
    ``configs/job/class3d_online.yaml``."""

    map_mask_key = "job.solvent_mask"

    def __init__(
        self,
        name: str,
        K: int,
        reference: str | list[str] | None = None,
        solvent_mask: str | None = None,
        focus_mask: str | None = None,
        resize_reference: bool = False,
        target_resolution_A: float | None = None,
        init_mode: str = "simple",
        init_particles_per_class: int = 500,
        pca_n_reconstructions: int = 40,
        n_online_epochs: int = 2,
        batch_size_per_class: int = 100,
        learning_rate: float = 0.5,
        learning_rate_half_life: float = 20.0,
        max_full_iterations: int = 20,
        switch_threshold: float | None = 0.02,
        rms_change_threshold: float | None = 0.01,
        class_similarity: float = 0.5,
        class_similarity_anneal_fraction: float = 0.5,
        per_particle_scale: str = "consensus",
        scale_range: tuple[float, float] = (0.5, 2.0),
        force_hard: bool = False,
        tau2_fudge: float = 1.0,
        mask_diameter_A: float | None = None,
        zero_mask: bool = True,
        ctf: bool = True,
        continue_from: str | None = None,
    ) -> None:
        if n_online_epochs < 0 or max_full_iterations < 0 or n_online_epochs + max_full_iterations < 1:
            raise InputError(f"job.n_online_epochs ({n_online_epochs}) and job.max_full_iterations ({max_full_iterations}) must be ≥ 0, one of them > 0")
        super().__init__(
            name=name, reference=reference, K=K, n_iterations=n_online_epochs + max_full_iterations, tau2_fudge=tau2_fudge,
            mask_diameter_A=mask_diameter_A, reference_mask=solvent_mask, resize_reference=resize_reference, zero_mask=zero_mask, ini_high_A=0.0, ctf=ctf,
            scale_prior_sigma=0.0, continue_from=continue_from,
        )
        if self.references and len(self.references) != K:
            raise InputError(f"job.reference lists {len(self.references)} maps; class3d_online needs one map per class (job.K={K}) or none")
        if init_mode not in ("simple", "pca"):
            raise InputError(f"job.init_mode must be 'simple' or 'pca', got {init_mode!r}")
        if per_particle_scale not in ("consensus", "input", "none"):
            raise InputError(f"job.per_particle_scale must be 'consensus', 'input' or 'none', got {per_particle_scale!r}")
        if not 0 < learning_rate <= 1 or learning_rate_half_life <= 0:
            raise InputError(f"job.learning_rate must lie in (0, 1] and job.learning_rate_half_life be positive, got {learning_rate}, {learning_rate_half_life}")
        if not 0 <= class_similarity <= 1 or not 0 < class_similarity_anneal_fraction <= 1:
            raise InputError(f"job.class_similarity must lie in [0, 1] and job.class_similarity_anneal_fraction in (0, 1], got {class_similarity}, {class_similarity_anneal_fraction}")
        if batch_size_per_class < 1 or init_particles_per_class < 2 or pca_n_reconstructions < K:
            raise InputError("job.batch_size_per_class must be ≥ 1, job.init_particles_per_class ≥ 2 and job.pca_n_reconstructions ≥ job.K")
        self.focus_mask_path = focus_mask
        self.target_resolution_A = target_resolution_A
        self.init_mode = init_mode
        self.init_particles_per_class = init_particles_per_class
        self.pca_n_reconstructions = pca_n_reconstructions
        self.n_online_epochs = n_online_epochs
        self.batch_size_per_class = batch_size_per_class
        self.learning_rate = learning_rate
        self.learning_rate_half_life = learning_rate_half_life
        self.switch_threshold = switch_threshold
        self.rms_change_threshold = rms_change_threshold
        self.class_similarity = class_similarity
        self.class_similarity_anneal_fraction = class_similarity_anneal_fraction
        self.per_particle_scale = per_particle_scale
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        if not 0 < self.scale_range[0] <= 1 <= self.scale_range[1]:
            raise InputError(f"job.scale_range must be [low, high] with 0 < low ≤ 1 ≤ high, got {list(scale_range)}")
        self.force_hard = force_hard
        # run state that a resumed run restores (extra_state)
        self.step = 0
        self.finished = False
        self.consensus: torch.Tensor | None = None
        self.particle_scale: torch.Tensor | None = None
        self.running: list[SufficientStatistics] | None = None
        # leaf sums of earlier minibatches, zeroed for reuse: on a CPU fresh pages of a few
        # hundred MB cost several times their zeroing (at most log2(L) + 1 sets are kept)
        self.spare_sums: list[HalfSetStatistics] = []

    # ------------------------------------------------------------------ set-up
    def check_table(self, context: RunContext, table: ParticleTable) -> None:
        """The particles have poses (and scales, for ``per_particle_scale=input``); no
        reference is needed."""
        if context.sampling["align"]:
            raise InputError("class3d_online classifies at the particles' poses and does not align: set sampling.align=false (or use +job=class3d)")
        if not table.has_poses:
            raise InputError(f"{context.particles}: no poses (rlnAngleRot/Tilt/Psi or alignments3D/pose); class3d_online classifies the particles of a consensus refinement")
        if self.per_particle_scale == "input" and table.intensity_scale is None:
            raise InputError(f"{context.particles}: no per-particle scale (cryoSPARC alignments3D/alpha) for job.per_particle_scale=input; use consensus or none")

    def set_up(self, context: RunContext, table: ParticleTable) -> None:
        """The set-up of class3d at the cropped box, the focus mask and half sets."""
        super().set_up(context, table)
        self.focus = self.read_map(self.focus_mask_path, mask=True) if self.focus_mask_path else None
        self.halves = torch.as_tensor(half_set_labels(table, context.seed), device=self.device)
        self.memory_budget = context.memory_budget_bytes
        # every shell inside Nyquist but the last, whose trilinear corners leave the padded grid
        self.radius = self.box // 2 - 1
        log.info("class3d_online: %d particles, box %d → %d (%.3g Å/px), %d classes", len(table), self.full_box, self.box, self.pixel, self.n_classes)

    def working_box(self, box: int, pixel: float, context: RunContext) -> int:
        """Box after the Fourier crop to the target resolution (its Nyquist), even, ≤ ``box``."""
        working = box
        if self.target_resolution_A:
            if self.target_resolution_A < 2 * pixel:
                raise InputError(f"job.target_resolution_A={self.target_resolution_A} is finer than the data's Nyquist ({2 * pixel:.3g} Å)")
            working = min(box - box % 2, 2 * math.ceil(box * pixel / self.target_resolution_A))
        return working

    def fit_in_memory(self, context: RunContext) -> None:
        """Before any image is read: the sums at the working box, which does not grow, must
        fit (:meth:`check_sums_fit`)."""
        self.check_sums_fit(self.box, self.full_box * self.full_pixel, context)

    def grids_at_peak(self, sum_tree_leaves: int) -> float:
        """Whole padded grids of sums (12 bytes a voxel) held at the peak: per class, the
        running, total and minibatch half-set sums, and a pair of half sets for each level of
        the summation tree of ``sum_tree_leaves`` leaves (measured at a box of 64 from the peak
        resident memory for K = 6 and 2: 13.5 a class with 8 leaves, 6.7 with 1)."""
        return self.n_classes * (7.5 + 2 * math.log2(sum_tree_leaves))

    def check_sums_fit(self, box: int, extent_A: float, context: RunContext) -> None:
        """The sums of every class on the whole padded grid (:meth:`grids_at_peak`) must fit
        in this process's :func:`~cryotorch.runtime.memory_share`, beside the arrays sized
        from the memory budget; otherwise a clear error names a target resolution at which
        they fit, before any image or map is read. ``extent_A`` is the box's size in Å."""
        def sums_bytes(working: int) -> float:
            return self.sums_bytes(padded_box_size(working, context.padding_factor), context.sum_tree_leaves)

        share = context.maps_memory_share(len(self.table), self.full_box)
        needed = sums_bytes(box)
        log.info("class3d_online: the class sums take about %.1f GB at a box of %d", needed / 1e9, box)
        if needed <= share.available_bytes:
            return
        fitting = box - box % 2
        while fitting > 8 and sums_bytes(fitting) > share.available_bytes:
            fitting -= 2
        remedy = (
            f"set job.target_resolution_A={math.ceil(20 * extent_A / fitting) / 10:g} or coarser (images and maps Fourier-cropped to it), fewer classes "
            "or a smaller compute.memory_budget_gb"
            if sums_bytes(fitting) <= share.available_bytes
            else "use fewer classes or a smaller compute.memory_budget_gb"
        )
        raise InputError(f"class3d_online with job.K={self.n_classes} at a box of {box} keeps about {needed / 1e9:.3g} GB of sums, more than {share.describe()}; {remedy}")

    def image_reader(self, table: ParticleTable, preload: bool) -> FourierCroppedReader:
        """Reader of the images, Fourier-cropped to the working box."""
        return FourierCroppedReader(super().image_reader(table, preload), self.box)

    def finish(self, context: RunContext, state: ParticleState) -> None:
        """One particle STAR file per class."""
        if context.is_main:
            self.write_class_particles(context, state)
        context.fabric.barrier()
        log.info("class3d_online finished in %s", context.output_dir)

    def initialise_model(self, context: RunContext, model: ClassModel, state: ParticleState) -> None:
        """Noise spectra, consensus map, per-particle scales and the initial class maps."""
        power, counts, _, _ = self.data_statistics(context)
        model.sigma2_noise.copy_(0.5 * power / counts.clamp(min=1))
        everyone = np.zeros(len(self.table), dtype=np.int64)
        self.consensus = self.subset_maps(context, model, state, everyone, 1)[0] * self.mask
        if self.per_particle_scale == "consensus":
            self.particle_scale = self.consensus_scales(context, model, state)
        elif self.per_particle_scale == "input":
            assert self.table.intensity_scale is not None
            self.particle_scale = torch.as_tensor(self.table.intensity_scale, dtype=torch.float32, device=self.device)
        else:
            self.particle_scale = torch.ones(len(self.table), device=self.device)
        if self.references:
            volumes = torch.stack([self.given_map(path) for path in self.references])
        elif self.init_mode == "simple":
            volumes = self.subset_maps(context, model, state, self.random_subsets(context.seed, self.n_classes), self.n_classes)
        else:
            volumes = self.pca_seeds(context, model, state)
        model.volumes.copy_(volumes * self.mask)
        log.info("initial classes from %s", "the given maps" if self.references else f"random subsets ({self.init_mode})")

    def given_map(self, path: str) -> torch.Tensor:
        """A given class map, read at the working box and put on the consensus map's grey scale."""
        volume = self.read_map(path)
        assert self.consensus is not None
        inside = self.mask > 0.5
        return volume * float(self.consensus[inside].std() / volume[inside].std().clamp(min=1e-30))

    def random_subsets(self, seed: int, n_subsets: int) -> np.ndarray:
        """``(N,)`` subset index of each particle (−1: none): disjoint random subsets of
        ``init_particles_per_class`` particles (fewer when the data set is small)."""
        n = len(self.table)
        size = min(self.init_particles_per_class, n // n_subsets)
        if size < 2:
            raise InputError(f"{n} particles cannot seed {n_subsets} random-subset reconstructions; lower job.K or job.pca_n_reconstructions")
        order = np.random.default_rng([seed, n_subsets]).permutation(n)
        labels = np.full(n, -1, dtype=np.int64)
        labels[order[: size * n_subsets]] = np.repeat(np.arange(n_subsets), size)
        return labels

    def pca_seeds(self, context: RunContext, model: ClassModel, state: ParticleState) -> torch.Tensor:
        """K seeds: many random-subset maps, their principal components inside the focus (or
        solvent) mask, k-means into K clusters, and each cluster's mean map."""
        n_maps = self.pca_n_reconstructions
        labels = self.random_subsets(context.seed, n_maps)
        maps = torch.cat([
            self.subset_maps(context, model, state, np.where((labels >= start) & (labels < start + self.n_classes), labels - start, -1), min(self.n_classes, n_maps - start))
            for start in range(0, n_maps, self.n_classes)
        ])  # (n_maps, n, n, n)
        region = (self.focus if self.focus is not None else self.mask) > 0.5
        features = maps[:, region].double()
        features = features - features.mean(0)
        _, _, basis = torch.linalg.svd(features, full_matrices=False)
        scores = features @ basis[: max(1, self.n_classes - 1)].T  # (n_maps, K−1)
        assignment = kmeans(scores, self.n_classes, np.random.default_rng(context.seed))
        return torch.stack([maps[assignment == k].mean(0) for k in range(self.n_classes)])

    def subset_maps(self, context: RunContext, model: ClassModel, state: ParticleState, labels: np.ndarray, n_subsets: int) -> torch.Tensor:
        """``(n_subsets, n, n, n)`` FSC-filtered maps of the particles with each subset label."""
        frequencies, component_index, shells = self.components(self.radius)
        tree: SumTree[HalfSetStatistics] = SumTree()
        for leaf, batches in self.leaves(context, np.nonzero(labels >= 0)[0], self.batch_size(frequencies.shape[0], 1)):
            sums = HalfSetStatistics([self.empty_sums(n_subsets) for _ in (1, 2)])
            for chunk in batches:
                self.insert_subsets(sums, model, state, chunk, labels, n_subsets, frequencies, component_index, shells)
            tree.add_leaf(leaf, sums)
        halves = self.tree_total(context, tree, n_subsets).halves
        return torch.stack([self.filtered_map(halves, g)[0] for g in range(n_subsets)])

    def insert_subsets(
        self, sums: HalfSetStatistics, model: ClassModel, state: ParticleState, chunk: np.ndarray, labels: np.ndarray, n_subsets: int,
        frequencies: torch.Tensor, component_index: torch.Tensor, shells: torch.Tensor,
    ) -> None:
        """Back-project the particles ``chunk`` at their poses into the maps of their subsets
        ``labels[chunk]`` and their half sets."""
        batch = self.prepare(model, state, chunk, component_index, shells, frequencies, self.ctf)
        rotations = self.rotations(chunk)
        two_q = batch.ctf_weight()
        weighted = batch.spectra * batch.ctf_factor()
        subset = torch.as_tensor(labels[chunk], device=self.device)
        half = self.halves[torch.as_tensor(chunk, device=self.device)]
        for h in (1, 2):
            slices = [
                WeightedSlices(g, rotations[members], weighted[members], two_q[members])
                for g in range(n_subsets)
                if (members := ((subset == g) & (half == h)).nonzero()[:, 0]).numel()
            ]
            sums.halves[h - 1].insert(self.expand_symmetry(slices), frequencies, self.box, self.memory_budget / 4)

    def consensus_scales(self, context: RunContext, model: ClassModel, state: ParticleState) -> torch.Tensor:
        """``(N,)`` per-particle intensity scale ``a = Σ Re(X̄·CTF·P)/σ² / Σ CTF²|P|²/σ²``
        against the consensus map's projection at the particle's pose, normalised to mean 1
        and limited to ``scale_range``.

        The limits keep the scale to what contrast (ice thickness) can explain: a particle
        that does not resemble the consensus (junk, a ≈ 0) keeps the lower bound, so that
        classes of different strength still score it differently and junk can gather in a
        class of its own.
        """
        assert self.consensus is not None
        volume_ft = prepare_fourier_volumes(self.consensus[None], context.padding_factor)
        frequencies, component_index, shells = self.components(self.radius)
        scales = torch.zeros(len(self.table), device=self.device)
        own = [chunk for _, batches in self.leaves(context, np.arange(len(self.table)), self.batch_size(frequencies.shape[0], 1)) for chunk in batches]
        for chunk in own:
            batch = self.prepare(model, state, chunk, component_index, shells, frequencies, self.ctf)
            model_image = batch.ctf * extract_slices(volume_ft, self.rotations(chunk), frequencies, self.box)[0]
            cross = ((batch.spectra.conj() * model_image).real * batch.inv_sigma2).sum(-1)
            power = (squared_magnitude(model_image) * batch.inv_sigma2).sum(-1)
            scales[torch.as_tensor(chunk, device=self.device)] = cross / power.clamp(min=1e-30)
        rows = torch.as_tensor(np.concatenate(own or [np.zeros(0, dtype=np.int64)]), device=self.device)
        scales = context.gather_rows(rows, scales[rows], len(self.table))
        # normalised over the particles that resemble the consensus (the median half-way)
        return (scales / scales.median().clamp(min=1e-30)).clamp(*self.scale_range)

    # ------------------------------------------------------------------ iterations
    def iterate(self, context: RunContext, model: ClassModel, state: ParticleState, iteration: int) -> ParticleState:
        """One online epoch (minibatch updates) or one full-batch EM iteration, then outputs."""
        n = len(self.table)
        online = iteration <= self.n_online_epochs
        if online:
            order = np.random.default_rng([context.seed, iteration]).permutation(n)
            size = self.batch_size_per_class * self.n_classes
            minibatches = [np.sort(order[start : start + size]) for start in range(0, n, size)]
        else:
            minibatches = [np.arange(n)]
        previous_volumes = model.volumes.clone()
        new_state = ParticleState(**{k: v.clone() for k, v in vars(state).items()})
        touched = []
        for rows in progress(minibatches, len(minibatches), f"iteration {iteration}", enabled=context.is_main and online, unit="minibatch"):
            rate = self.current_rate() if online else 1.0
            similarity = self.current_similarity(len(minibatches)) if online else 0.0
            touched.append(self.update(context, model, state, new_state, rows, rate, similarity))
            if online:
                self.step += 1
        new_state = self.gather_state(context, new_state, np.concatenate(touched))
        empty = [k for k in range(self.n_classes) if float(self.running[0].weight[k].sum() + self.running[1].weight[k].sum()) <= 0]
        switched = float((new_state.class_number != state.class_number).float().mean()) if int(state.class_number.min()) > 0 else 1.0
        sizes = model.class_weights.to(model.volumes.dtype)
        change = float(torch.sqrt((sizes[:, None] * (model.volumes - previous_volumes).flatten(1) ** 2).sum() / (sizes[:, None] * previous_volumes.flatten(1) ** 2).sum().clamp(min=1e-30)))
        if not online:
            criteria = [value < threshold for value, threshold in ((switched, self.switch_threshold), (change, self.rms_change_threshold)) if threshold is not None]
            self.finished = bool(criteria) and all(criteria)
        log.info("iteration %d (%s): %.1f %% of particles switched class, size-weighted RMS change of the maps %.4f%s",
                 iteration, "online" if online else "full batch", 100 * switched, change, "; converged" if self.finished else "")
        self.report(context, model, state, new_state, iteration, self.radius, empty, 0)
        self.report_online(context, new_state, iteration, change)
        return new_state

    def current_rate(self) -> float:
        """Learning rate of this minibatch: 1 for the first, then ``η·2^(−step/half-life)``."""
        return 1.0 if self.step == 0 else self.learning_rate * 0.5 ** (self.step / self.learning_rate_half_life)

    def current_similarity(self, n_per_epoch: int) -> float:
        """Class similarity β of this minibatch, annealed linearly to 0 over the first
        ``class_similarity_anneal_fraction`` of the online minibatches."""
        total = max(1.0, self.class_similarity_anneal_fraction * self.n_online_epochs * n_per_epoch)
        return self.class_similarity * max(0.0, 1.0 - self.step / total)

    def update(
        self, context: RunContext, model: ClassModel, state: ParticleState, new_state: ParticleState,
        rows: np.ndarray, rate: float, similarity: float,
    ) -> np.ndarray:
        """E-step over this rank's leaves of the minibatch ``rows`` (every rank's);
        ``S ← (1−η)·S + η·(N/B)·S_B`` with the minibatch's sums ``S_B`` added in the
        summation tree's order; M-step. Returns the rows scored here."""
        box = self.box
        frequencies, component_index, shells = self.components(self.radius)
        volumes_ft = prepare_fourier_volumes(self.effective_volumes(model), context.padding_factor)
        settings = EStepSettings(
            frequencies=frequencies, n_coarse=frequencies.shape[0], box_size=box, pixel_size_angstrom=self.pixel, align=False,
            memory_budget_bytes=context.memory_budget_bytes / 4, hard_classification=self.force_hard,
            target_class_ess=1.0 + similarity * (self.n_classes - 1) if similarity > 0 else None,
        )
        log_prior = torch.log(model.class_weights.clamp(min=1e-30)).float()
        tree: SumTree[HalfSetStatistics] = SumTree()
        own = []
        for leaf, batches in self.leaves(context, rows, self.batch_size(frequencies.shape[0], self.n_classes)):
            sums = self.spare_sums.pop().zero_() if self.spare_sums else HalfSetStatistics([self.empty_sums(self.n_classes) for _ in (1, 2)])
            for chunk in batches:
                self.expect(sums, model, state, new_state, chunk, volumes_ft, log_prior, settings, frequencies, component_index, shells)
                own.append(chunk)
            self.spare_sums += tree.add_leaf(leaf, sums)
        gain = rate * len(self.table) / len(rows)
        if self.running is None:
            self.running = [self.empty_sums(self.n_classes) for _ in (1, 2)]
        total = self.tree_total(context, tree, self.n_classes)
        for stats, minibatch in zip(self.running, total.halves):
            stats.mul_(1 - rate).add_(minibatch.mul_(gain))
        self.spare_sums.append(total)
        self.maximize(model)
        return np.concatenate(own or [rows[:0]])

    def expect(
        self, sums: HalfSetStatistics, model: ClassModel, state: ParticleState, new_state: ParticleState, chunk: np.ndarray,
        volumes_ft: torch.Tensor, log_prior: torch.Tensor, settings: EStepSettings,
        frequencies: torch.Tensor, component_index: torch.Tensor, shells: torch.Tensor,
    ) -> None:
        """E-step of the particles ``chunk``, each half set's added to its sums; their
        outcome stored in ``new_state``."""
        device = self.device
        index = torch.as_tensor(chunk, device=device)
        batch = self.prepare(model, state, chunk, component_index, shells, frequencies, self.ctf)
        groups = torch.as_tensor(self.groups[chunk], device=device)
        half = self.halves[index]
        for h in (1, 2):
            members = (half == h).nonzero()[:, 0]
            if members.numel() == 0:
                continue
            result = expectation(batch.select(members), volumes_ft, None, None, None, log_prior, float(model.offset_sigma_angstrom), settings)
            self.expand_symmetry(result.slices)
            sums.halves[h - 1].accumulate(result, batch.select(members), groups[members], shells, frequencies, self.box, self.pixel, self.memory_budget / 4)
            new_state.store(index[members], result)

    def leaves(self, context: RunContext, rows: np.ndarray, batch_size: int) -> list[tuple[int, list[np.ndarray]]]:
        """This rank's leaves of the summation tree over ``rows`` (every rank's): batches of at
        most ``batch_size``, and small enough that a minibatch fills every leaf, so that it is
        shared by up to ``compute.sum_tree_leaves`` processes
        (:func:`~cryotorch.data.particles.tree_leaves`)."""
        size = max(1, min(batch_size, -(-len(rows) // context.sum_tree_leaves)))
        return context.tree_leaves(rows, size)

    def tree_total(self, context: RunContext, tree: SumTree[HalfSetStatistics], n_classes: int) -> HalfSetStatistics:
        """The half sets' sums of every rank's leaves of ``tree``, added in the tree's order."""
        return context.tree_sum(tree.total() or HalfSetStatistics([self.empty_sums(n_classes) for _ in (1, 2)]), self.memory_budget / 8)

    def maximize(self, model: ClassModel) -> None:
        """Class maps from the running half-set statistics, each filtered by its own FSC;
        noise spectra and class weights from their sum."""
        assert self.running is not None
        for k in range(self.n_classes):
            if float(self.running[0].weight[k].sum()) > 0 and float(self.running[1].weight[k].sum()) > 0:
                volume, fsc = self.filtered_map(self.running, k)
                model.volumes[k] = volume * self.mask
                clamped = fsc.clamp(0, 0.999)
                model.ssnr[k] = 2 * clamped / (1 - clamped)
        total = SufficientStatistics(*[a + b for a, b in zip(self.running[0].tensors(), self.running[1].tensors())])
        update_noise_and_weights(model, total, self.radius)

    def filtered_map(self, halves: list[SufficientStatistics], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Map of class ``k`` from both half sets, filtered by their FSC; and that FSC."""
        maps = half_set_reconstruction(
            torch.stack([halves[0].data[k], halves[1].data[k]]), torch.stack([halves[0].weight[k], halves[1].weight[k]]), self.box, self.tau2_fudge,
            mask=self.mask, final_halves=False,
        )
        return maps.full, maps.fsc

    def effective_volumes(self, model: ClassModel) -> torch.Tensor:
        """``S·(F·V_k + (1−F)·V̄)``: the consensus replaces each class outside the focus mask."""
        if self.focus is None or self.consensus is None:
            return model.volumes * self.mask
        return self.mask * (self.focus * model.volumes + (1 - self.focus) * self.consensus)

    # ------------------------------------------------------------------ helpers
    def batch_size(self, n_components: int, n_classes: int) -> int:
        """Particles per E-step batch within a quarter of the memory budget (K projections each)."""
        return int(max(1, min(4096, self.memory_budget / 4 / max(1, (n_classes + 4) * n_components * 16))))

    def rotations(self, rows: np.ndarray) -> torch.Tensor:
        """``(B, 3, 3)`` rotation matrices of the particles' poses."""
        return euler_deg_to_matrix(torch.as_tensor(np.asarray(self.table.euler_deg)[rows], device=self.device)).float()

    def prepare(self, model: ClassModel, state: ParticleState, rows: np.ndarray, component_index: torch.Tensor, shells: torch.Tensor, frequencies: torch.Tensor, use_ctf: bool) -> PreparedBatch:
        """Class3D's prepared batch, with the per-particle intensity scale."""
        batch = super().prepare(model, state, rows, component_index, shells, frequencies, use_ctf)
        if self.particle_scale is not None:
            batch.scale = batch.scale * self.particle_scale[torch.as_tensor(rows, device=self.device)]
        return batch

    # ------------------------------------------------------------------ outputs and state
    def report_online(self, context: RunContext, state: ParticleState, iteration: int, change: float) -> None:
        """Class ESS histogram and class sizes as PNG beside the STAR files; the maps' change
        and the learning rate in TensorBoard (class3d's :meth:`report` logs the class ESS)."""
        counts = torch.bincount(state.class_number - 1, minlength=self.n_classes).cpu().numpy()
        ess = state.class_ess.cpu().numpy()
        writer = context.writer
        if writer is not None:
            writer.add_scalar("class3d_online/map_rms_change", change, iteration)
            writer.add_scalar("class3d_online/learning_rate", self.current_rate(), iteration)
        if context.is_main:
            out = context.output_dir
            save_histogram_plot(out / f"run_it{iteration:03d}_class_ess.png", ess, np.linspace(1, self.n_classes, min(50, 10 * self.n_classes) + 1),
                                "class ESS (1/Σp²)", f"iteration {iteration}: mean class ESS {ess.mean():.2f}")
            save_class_sizes_plot(out / f"run_it{iteration:03d}_class_sizes.png", counts, f"iteration {iteration}: particles per class")

    def write_class_particles(self, context: RunContext, state: ParticleState) -> None:
        """``run_class{k}_particles.star``: each class's particles with their poses."""
        classes = state.class_number.cpu().numpy()
        for k in range(1, self.n_classes + 1):
            rows = np.nonzero(classes == k)[0]
            subset: ParticleTable = self.table.select(rows)
            write_particles(context.output_dir / f"run_class{k:03d}_particles.star", subset, {"rlnClassNumber": classes[rows]})

    def rebuild(self, context: RunContext, model: ClassModel, root: Path, iteration: int, held: int | None) -> ParticleState:
        """Refused: an online run's state holds its running sums and optimiser step, which its
        iteration files do not, so it continues from its checkpoint only."""
        fix = f"set job.continue_from={root.parent} to go on from its iteration {held}" if held is not None else f"{root.parent} holds no checkpoint: start the run again"
        raise InputError(
            f"{self.continue_from}: class3d_online continues from its checkpoint only, as its running sums are not in the iteration's files; {fix}"
        )

    def extra_state(self) -> dict[str, Any]:
        assert self.running is not None and self.consensus is not None and self.particle_scale is not None
        return {
            "step": self.step, "finished": self.finished, "stopping": self.stopping_criteria(), "consensus": self.consensus.cpu(), "particle_scale": self.particle_scale.cpu(),
            "running": [[tensor.cpu() for tensor in stats.tensors()] for stats in self.running],
        }

    def stopping_criteria(self) -> list[float | None]:
        """The thresholds that end the full-batch iterations (``job.switch_threshold``, ``job.rms_change_threshold``)."""
        return [self.switch_threshold, self.rms_change_threshold]

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        # a run that converged goes on when it is continued with other stopping criteria
        self.step, self.finished = int(extra["step"]), bool(extra["finished"]) and extra.get("stopping") == self.stopping_criteria()
        self.consensus, self.particle_scale = extra["consensus"].to(self.device), extra["particle_scale"].to(self.device)
        self.running = [SufficientStatistics(*[tensor.to(self.device) for tensor in stats]) for stats in extra["running"]]


def kmeans(points: torch.Tensor, k: int, rng: np.random.Generator, n_iterations: int = 50) -> torch.Tensor:
    """``(P,)`` cluster of each of ``points`` ``(P, D)``: k-means with k-means++ seeding.

    A cluster that empties is re-seeded at the point farthest from its centre.
    """
    n = points.shape[0]
    centres = [points[int(rng.integers(n))]]
    for _ in range(1, k):
        distance = torch.cdist(points, torch.stack(centres)).amin(1) ** 2
        probabilities = (distance / distance.sum().clamp(min=1e-30)).cpu().numpy()
        centres.append(points[int(rng.choice(n, p=probabilities / probabilities.sum()))])
    centre = torch.stack(centres)
    assignment = torch.zeros(n, dtype=torch.long, device=points.device)
    for _ in range(n_iterations):
        distance = torch.cdist(points, centre)
        new = distance.argmin(1)
        for cluster in range(k):
            members = new == cluster
            if members.any():
                centre[cluster] = points[members].mean(0)
            else:
                far = int(distance.amin(1).argmax())
                centre[cluster], new[far] = points[far], cluster
        if torch.equal(new, assignment):
            break
        assignment = new
    return assignment
