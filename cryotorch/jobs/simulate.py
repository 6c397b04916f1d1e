"""``+job=simulate``: particle images from one or more maps with known ground truth.

One class per map (with given fractions), an optional fraction of noise-only junk, random
(uniform) or given poses, CTF from a template STAR or from ranges, white or coloured noise at a
chosen SNR. Writes ``particles.star`` + ``particles.mrcs`` (RELION 3.1 layout, with poses,
CTF and a random half-set split, as a consensus refinement would give them) and
``truth.star`` (the same particles with the true class, angles and origins).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cryotorch.conventions import (
    euler_deg_to_matrix,
    fft_frequencies_2d,
    image_shift_from_origin,
    irfft2_centered,
    matrix_to_euler_deg,
    rfft2_centered,
)
from cryotorch.data.particles import batch_size_for_budget, ctf_parameters
from cryotorch.data.phantom import blob_phantom
from cryotorch.errors import InputError
from cryotorch.io import MrcStackWriter, ParticleTable, read_mrc, read_particles, write_mrc, write_particles
from cryotorch.jobs.context import RunContext
from cryotorch.monitor import log_scalars, progress
from cryotorch.ops.ctf import compute_ctf
from cryotorch.ops.filters import crop_or_pad
from cryotorch.ops.fourier import radius_grid_2d, translate_2d_ft
from cryotorch.ops.projection import extract_slices, prepare_fourier_volumes
from cryotorch.ops.rotations import random_rotations

log = logging.getLogger(__name__)

__all__ = ["SimulateJob", "coloured_noise_psd"]


def coloured_noise_psd(box_size: int, pixel_size_angstrom: float, device: torch.device | None = None) -> torch.Tensor:
    """``(N, N // 2 + 1)`` noise power spectrum of mean 1 falling with frequency.

    ``PSD(s) ∝ 0.3 + 1 / (1 + (s · 30 Å)²)``: a low-frequency excess over a white floor, the
    usual shape of ice and detector noise after dose weighting.
    """
    s = radius_grid_2d(box_size, device) / (box_size * pixel_size_angstrom)
    psd = 0.3 + 1.0 / (1.0 + (s * 30.0) ** 2)
    return psd / psd.mean()


class SimulateJob:
    """Simulate a particle data set; every parameter is a key of ``configs/job/simulate.yaml``."""

    def __init__(
        self,
        name: str,
        maps: list[str],
        n_particles: int,
        class_fractions: list[float] | None = None,
        junk_fraction: float = 0.0,
        pixel_size_angstrom: float | None = None,
        box_size: int | None = None,
        phantom_box_size: int = 64,
        snr: float | None = 0.1,
        noise: str = "white",
        poses_from: str | None = None,
        origin_sigma_angstrom: float = 0.0,
        ctf: bool = True,
        ctf_from: str | None = None,
        defocus_min_angstrom: float = 8000.0,
        defocus_max_angstrom: float = 25000.0,
        astigmatism_max_angstrom: float = 500.0,
        voltage_kv: float = 300.0,
        spherical_aberration_mm: float = 2.7,
        amplitude_contrast: float = 0.1,
        write_poses: bool = True,
    ) -> None:
        if n_particles < 1:
            raise InputError(f"job.n_particles must be at least 1, got {n_particles}")
        if not 0 <= junk_fraction < 1:
            raise InputError(f"job.junk_fraction must be in [0, 1), got {junk_fraction}")
        if noise not in ("white", "coloured"):
            raise InputError(f"job.noise must be 'white' or 'coloured', got {noise!r}")
        if snr is not None and snr <= 0:
            raise InputError(f"job.snr must be positive (or null for noise-free images), got {snr}")
        if defocus_min_angstrom > defocus_max_angstrom:
            raise InputError("job.defocus_min_angstrom is larger than job.defocus_max_angstrom: swap them")
        self.name = name
        self.maps = [str(path) for path in maps]
        self.n_particles = n_particles
        self.class_fractions = class_fractions
        self.junk_fraction = junk_fraction
        self.pixel_size_angstrom = pixel_size_angstrom
        self.box_size = box_size
        self.phantom_box_size = phantom_box_size
        self.snr = snr
        self.noise = noise
        self.poses_from = poses_from
        self.origin_sigma_angstrom = origin_sigma_angstrom
        self.ctf = ctf
        self.ctf_from = ctf_from
        self.defocus_range_angstrom = (defocus_min_angstrom, defocus_max_angstrom)
        self.astigmatism_max_angstrom = astigmatism_max_angstrom
        self.voltage_kv = voltage_kv
        self.spherical_aberration_mm = spherical_aberration_mm
        self.amplitude_contrast = amplitude_contrast
        self.write_poses = write_poses

    def load_volumes(self, context: RunContext) -> tuple[torch.Tensor, float]:
        """The class maps as ``(K, N, N, N)`` and their voxel size in Å (a phantom without maps)."""
        if not self.maps:
            pixel = self.pixel_size_angstrom or 3.0
            volume = blob_phantom(self.phantom_box_size, pixel, seed=context.seed)
            if context.is_main:
                write_mrc(context.output_dir / "phantom.mrc", volume, pixel)
            return volume[None], pixel
        volumes, pixels = [], []
        for path in self.maps:
            mrc = read_mrc(path)
            if len(set(mrc.data.shape)) != 1:
                raise InputError(f"{path}: map of shape {mrc.data.shape} is not a cube; simulate needs cubic maps")
            volumes.append(torch.as_tensor(mrc.data))
            pixels.append(mrc.voxel_size_angstrom[0])
        if len({v.shape for v in volumes}) != 1:
            raise InputError(f"job.maps have different box sizes {[tuple(v.shape) for v in volumes]}: resample them to one box")
        pixel = self.pixel_size_angstrom
        if pixel is None:
            if min(pixels) <= 0:
                raise InputError(f"{self.maps[int(np.argmin(pixels))]}: the header's voxel size is 0; set job.pixel_size_angstrom")
            if max(pixels) - min(pixels) > 1e-3 * max(pixels):
                raise InputError(f"job.maps have different voxel sizes {pixels} Å: resample them to one")
            pixel = pixels[0]
        stacked = torch.stack(volumes)
        if self.box_size is not None:
            stacked = crop_or_pad(stacked, self.box_size)
        return stacked.float(), float(pixel)

    def draw_classes(self, rng: np.random.Generator, n_classes: int) -> np.ndarray:
        """``(n,)`` true class per particle: 1..K for the maps, K+1 for junk."""
        fractions = np.asarray(self.class_fractions if self.class_fractions else [1.0] * n_classes, dtype=np.float64)
        if len(fractions) != n_classes or (fractions < 0).any() or fractions.sum() <= 0:
            raise InputError(f"job.class_fractions {fractions.tolist()} must list one non-negative fraction per map ({n_classes})")
        probabilities = np.append(fractions / fractions.sum() * (1 - self.junk_fraction), self.junk_fraction)
        return rng.choice(n_classes + 1, size=self.n_particles, p=probabilities) + 1

    def draw_poses(self, rng: np.random.Generator, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Euler angles ``(n, 3)`` in degrees and origins ``(n, 2)`` in Å."""
        if self.poses_from:
            source = read_particles(self.poses_from)
            pick = np.arange(self.n_particles) % len(source)
            return source.euler_deg[pick].copy(), source.origin_angstrom[pick].copy()
        euler = matrix_to_euler_deg(random_rotations(self.n_particles, generator)).numpy()
        origins = rng.normal(0.0, self.origin_sigma_angstrom, size=(self.n_particles, 2)) if self.origin_sigma_angstrom > 0 else np.zeros((self.n_particles, 2))
        return euler, origins

    def draw_ctf(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Per-particle CTF columns, from ``ctf_from`` rows or from the configured ranges."""
        n = self.n_particles
        if self.ctf_from:
            source = read_particles(self.ctf_from)
            if not source.has_ctf:
                raise InputError(f"{self.ctf_from}: job.ctf_from needs a STAR with defocus columns (rlnDefocusU/V)")
            pick = rng.integers(0, len(source), size=n)
            names = ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg", "voltage_kv", "spherical_aberration_mm", "amplitude_contrast", "phase_shift_deg")
            return {name: np.asarray(getattr(source, name))[pick] for name in names}
        mean = rng.uniform(*self.defocus_range_angstrom, size=n)
        astigmatism = rng.uniform(0, self.astigmatism_max_angstrom, size=n)
        return {
            "defocus_u_angstrom": mean + astigmatism / 2,
            "defocus_v_angstrom": mean - astigmatism / 2,
            "defocus_angle_deg": rng.uniform(0, 180, size=n),
            "voltage_kv": np.full(n, self.voltage_kv),
            "spherical_aberration_mm": np.full(n, self.spherical_aberration_mm),
            "amplitude_contrast": np.full(n, self.amplitude_contrast),
        }

    def run(self, context: RunContext) -> None:
        """Simulate on rank 0 (the output is one file set); other ranks wait."""
        if context.is_main:
            self.simulate(context)
        context.fabric.barrier()

    def simulate(self, context: RunContext) -> None:
        """Draw the ground truth, render the images chunk by chunk, write STAR and MRCS files."""
        rng = np.random.default_rng(context.seed)
        generator = torch.Generator().manual_seed(context.seed)
        volumes, pixel = self.load_volumes(context)
        n_classes, box = volumes.shape[0], volumes.shape[-1]
        classes = self.draw_classes(rng, n_classes)
        euler, origins = self.draw_poses(rng, generator)
        ctf_columns = self.draw_ctf(rng) if self.ctf else {}
        stack_path = context.output_dir / "particles.mrcs"
        table = ParticleTable.from_arrays(
            stack_paths=np.full(self.n_particles, str(stack_path), dtype=object),
            stack_indices=np.arange(self.n_particles),
            pixel_size_angstrom=pixel,
            box_size_px=box,
            euler_deg=euler,
            origin_angstrom=origins,
            random_subset=rng.permutation(np.arange(self.n_particles) % 2 + 1),
            **ctf_columns,
        )
        device = context.device
        volumes_ft = prepare_fourier_volumes(volumes.to(device), context.padding_factor)
        frequencies = fft_frequencies_2d(box, device).reshape(-1, 2)
        inside = frequencies.norm(dim=-1) <= box // 2
        psd = coloured_noise_psd(box, pixel, device) if self.noise == "coloured" else None
        batch_size = batch_size_for_budget(box, context.memory_budget_bytes)
        noise_sigma = None
        with MrcStackWriter(stack_path, self.n_particles, box, pixel) as writer:
            starts = range(0, self.n_particles, batch_size)
            for start in progress(starts, len(starts), "simulate", unit="batch"):
                rows = np.arange(start, min(start + batch_size, self.n_particles))
                clean = self.render(table, rows, classes, volumes_ft, frequencies, inside, device)
                if self.snr is not None:
                    signal = ~torch.as_tensor(classes[rows] == n_classes + 1, device=device)
                    if noise_sigma is None:
                        # fixed from the first chunk so every particle shares one noise level
                        reference = clean[signal] if signal.any() else clean
                        noise_sigma = float(reference.var(dim=(-2, -1)).mean().sqrt()) / np.sqrt(self.snr)
                    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64).float().to(device)
                    if psd is not None:
                        noise = irfft2_centered(rfft2_centered(noise) * psd.sqrt(), box)
                    clean = (clean + noise_sigma * noise) / noise_sigma  # unit noise, as RELION normalises
                writer.write(start, clean.cpu().numpy())
        write_particles(context.output_dir / "particles.star", table if self.write_poses else self.without_poses(table))
        write_particles(context.output_dir / "truth.star", table, {"rlnClassNumber": classes})
        counts = np.bincount(classes, minlength=n_classes + 2)[1:]
        log.info("wrote %d particles (%s per class, last = junk) to %s", self.n_particles, counts.tolist(), context.output_dir)
        log_scalars(context.writer, {"simulate/n_particles": self.n_particles, "simulate/noise_sigma": noise_sigma or 0.0}, 0)

    @staticmethod
    def without_poses(table: ParticleTable) -> ParticleTable:
        """The table with angles and origins removed (for data sets to be aligned from scratch)."""
        table = table.select(np.arange(len(table)))
        table.euler_deg = np.zeros_like(table.euler_deg)
        table.origin_angstrom = np.zeros_like(table.origin_angstrom)
        table.has_poses = False
        return table

    def render(
        self,
        table: ParticleTable,
        rows: np.ndarray,
        classes: np.ndarray,
        volumes_ft: torch.Tensor,
        frequencies: torch.Tensor,
        inside: torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        """Noise-free images ``(B, N, N)``: CTF-modulated projections translated by ``-origin``."""
        box = int(table.box_size_px[0])
        n_classes = volumes_ft.shape[0]
        rotations = euler_deg_to_matrix(torch.as_tensor(table.euler_deg[rows], device=device)).float()
        spectra = torch.zeros(len(rows), frequencies.shape[0], dtype=torch.complex64, device=device)
        for k in range(n_classes):
            members = np.nonzero(classes[rows] == k + 1)[0]
            if len(members):
                slices = extract_slices(volumes_ft[k : k + 1], rotations[members], frequencies[inside], box)[0]
                spectra[torch.as_tensor(members, device=device)[:, None], inside.nonzero()[:, 0]] = slices
        if self.ctf:
            ctf = compute_ctf(ctf_parameters(table, rows, device), frequencies, box, float(table.pixel_size_angstrom[0]))
            spectra = spectra * ctf
        origin_px = torch.as_tensor(table.origin_angstrom[rows] / table.pixel_size_angstrom[rows, None], dtype=torch.float32, device=device)
        spectra = translate_2d_ft(spectra, image_shift_from_origin(origin_px), frequencies, box)
        return irfft2_centered(spectra.reshape(len(rows), box, box // 2 + 1), box)
