"""RELION ``run_itNNN_{model,optimiser,sampling}.star`` writers for classifications, and the
model STAR's reader.

The job hands over typed summaries; this module alone knows RELION's block and column names
(as written by RELION 3.1–5 for Class3D).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cryotorch.errors import InputError
from cryotorch.io._paths import project_path
from cryotorch.io._star import read_star, write_star
from cryotorch.io._table import finite_floats

__all__ = [
    "ClassSummary", "ModelSummary", "OptimiserSummary", "SamplingSummary",
    "read_model_star", "write_model_star", "write_optimiser_star", "write_sampling_star",
]


@dataclass
class ClassSummary:
    """One class of a model: its map file and per-shell spectra (``n_shells`` values each)."""

    map_name: str  # the map's path (written as RELION names it, :func:`~cryotorch.io._paths.project_path`)
    distribution: float
    accuracy_rotations_deg: float
    accuracy_translations_angstrom: float
    resolution_angstrom: float
    ssnr: np.ndarray
    tau2: np.ndarray
    sigma2: np.ndarray  # noise power per component of the reconstruction (RELION's rlnReferenceSigma2)


@dataclass
class ModelSummary:
    """What ``run_itNNN_model.star`` records about a classification model."""

    box_size: int
    pixel_size_angstrom: float
    current_resolution_angstrom: float  # the best class resolution (SSNR ≥ 1), as RELION records it
    current_image_size: int
    padding_factor: float
    tau2_fudge: float
    sigma_offsets_angstrom: float
    log_likelihood: float
    average_pmax: float
    classes: list[ClassSummary]
    group_names: list[str]
    group_particle_counts: np.ndarray
    group_scales: np.ndarray
    group_sigma2_noise: np.ndarray  # (G, n_shells)


@dataclass
class OptimiserSummary:
    """What ``run_itNNN_optimiser.star`` records about the run's settings and progress."""

    # paths of the run's root and files (written as RELION names them, :func:`~cryotorch.io._paths.project_path`)
    output_root: str
    model_star: str
    data_star: str
    sampling_star: str
    iteration: int
    n_iterations: int
    oversampling_order: int
    oversampling_fraction: float
    random_seed: int
    particle_diameter_angstrom: float
    zero_mask: bool
    solvent_flattening: bool
    solvent_mask: str
    highres_limit_estep_angstrom: float
    increment_shells: int
    fast_subsets: bool
    skip_align: bool
    correct_ctf: bool
    ignore_ctf_until_first_peak: bool
    references_ctf_corrected: bool
    changes_orientations_deg: float
    changes_offsets_angstrom: float
    changes_classes: float
    overall_accuracy_rotations_deg: float
    overall_accuracy_translations_angstrom: float


@dataclass
class SamplingSummary:
    """What ``run_itNNN_sampling.star`` records about an iteration's coarse pose grid.

    Attributes
    ----------
    healpix_order
        HEALPix order of the coarse orientations.
    symmetry
        Point group (e.g. ``C1``, ``D7``).
    psi_step_deg
        In-plane step of the coarse grid (°).
    offset_range_angstrom, offset_step_angstrom
        Range and coarse step of the translation search (Å).
    perturbation
        This iteration's random shift of the grid, in units of the coarse steps.
    perturbation_factor
        Largest perturbation (RELION ``--perturb``).
    """

    healpix_order: int
    symmetry: str
    psi_step_deg: float
    offset_range_angstrom: float
    offset_step_angstrom: float
    perturbation: float
    perturbation_factor: float


def _spectral_columns(box_size: int, pixel_size_angstrom: float, n_shells: int) -> dict[str, np.ndarray]:
    shells = np.arange(n_shells)
    return {
        "rlnSpectralIndex": shells,
        "rlnResolution": shells / (box_size * pixel_size_angstrom),
        "rlnAngstromResolution": np.where(shells > 0, box_size * pixel_size_angstrom / np.maximum(shells, 1), 999.0),
    }


def write_model_star(path: str | os.PathLike[str], model: ModelSummary) -> None:
    """Write a RELION Class3D-style model STAR file (atomically)."""
    n_classes = len(model.classes)
    n_shells = model.box_size // 2 + 1
    blocks: dict[str, pd.DataFrame | dict[str, object]] = {
        "model_general": {
            "rlnReferenceDimensionality": 3,
            "rlnDataDimensionality": 2,
            "rlnOriginalImageSize": model.box_size,
            # in Å, as relion_refine writes it (its label text says 1/Å)
            "rlnCurrentResolution": model.current_resolution_angstrom,
            "rlnCurrentImageSize": model.current_image_size,
            "rlnPaddingFactor": model.padding_factor,
            "rlnIsHelix": 0,
            "rlnFourierSpaceInterpolator": 1,
            "rlnMinRadiusNnInterpolation": 10,
            "rlnPixelSize": model.pixel_size_angstrom,
            "rlnNrClasses": n_classes,
            "rlnNrBodies": 1,
            "rlnNrGroups": len(model.group_names),
            "rlnNrOpticsGroups": len(model.group_sigma2_noise),
            "rlnTau2FudgeFactor": model.tau2_fudge,
            "rlnNormCorrectionAverage": 1.0,
            "rlnSigmaOffsetsAngst": model.sigma_offsets_angstrom,
            "rlnOrientationalPriorMode": 0,
            "rlnSigmaPriorRotAngle": 0.0,
            "rlnSigmaPriorTiltAngle": 0.0,
            "rlnSigmaPriorPsiAngle": 0.0,
            "rlnLogLikelihood": model.log_likelihood,
            "rlnAveragePmax": model.average_pmax,
        },
        "model_classes": pd.DataFrame(
            {
                "rlnReferenceImage": [project_path(c.map_name) for c in model.classes],
                "rlnClassDistribution": [c.distribution for c in model.classes],
                "rlnAccuracyRotations": [c.accuracy_rotations_deg for c in model.classes],
                "rlnAccuracyTranslationsAngst": [c.accuracy_translations_angstrom for c in model.classes],
                "rlnEstimatedResolution": [c.resolution_angstrom for c in model.classes],
            }
        ),
    }
    for index, summary in enumerate(model.classes, start=1):
        columns = _spectral_columns(model.box_size, model.pixel_size_angstrom, n_shells)
        columns |= {
            "rlnSsnrMap": summary.ssnr,
            "rlnGoldStandardFsc": np.zeros(n_shells),
            "rlnReferenceSigma2": summary.sigma2,
            "rlnReferenceTau2": summary.tau2,
        }
        blocks[f"model_class_{index}"] = pd.DataFrame(columns)
    blocks["model_groups"] = pd.DataFrame(
        {
            "rlnGroupNumber": np.arange(1, len(model.group_names) + 1),
            "rlnGroupName": model.group_names,
            "rlnGroupNrParticles": model.group_particle_counts,
            "rlnGroupScaleCorrection": model.group_scales,
        }
    )
    for index, sigma2 in enumerate(model.group_sigma2_noise, start=1):
        columns = _spectral_columns(model.box_size, model.pixel_size_angstrom, n_shells)
        blocks[f"model_optics_group_{index}"] = pd.DataFrame(columns | {"rlnSigma2Noise": sigma2})
    write_star(path, blocks)


def read_model_star(path: str | os.PathLike[str]) -> ModelSummary:
    """Read a model STAR file in the layout :func:`write_model_star` writes (RELION 3.1–5
    Class3D: ``model_general``, ``model_classes``, ``model_class_N``, ``model_groups``,
    ``model_optics_group_N``). Floats are read back to the bit.

    Raises
    ------
    InputError
        If the file is missing or malformed, or a block, key or column is missing, holds a
        value that is not a finite number, or a spectrum has other than ``box // 2 + 1`` shells;
        the message names the file and the block.
    """
    path = Path(path)
    blocks = read_star(path)

    def block(name: str, loop: bool) -> pd.DataFrame | dict[str, object]:
        found = blocks.get(name)
        if found is None or isinstance(found, pd.DataFrame) != loop:
            raise InputError(f"{path}: no {'loop' if loop else 'key-value'} block data_{name}; give the run_itNNN_model.star a classification wrote")
        return found

    def number(name: str) -> float:
        general = block("model_general", loop=False)
        assert isinstance(general, dict)
        if name not in general:
            raise InputError(f"{path}: data_model_general holds no _{name}; give the run_itNNN_model.star a classification wrote")
        return float(finite_floats(pd.Series([general[name]]), f"{path}: data_model_general _{name}", "value")[0])

    def values(name: str, label: str) -> pd.Series:
        frame = block(name, loop=True)
        assert isinstance(frame, pd.DataFrame)
        if label not in frame:
            raise InputError(f"{path}: data_{name} has no column {label}; it holds {', '.join(frame.columns)}")
        return frame[label]

    def column(name: str, label: str, rows: int | None = None) -> np.ndarray:
        series = values(name, label)
        if rows is not None and len(series) != rows:
            raise InputError(f"{path}: data_{name} has {len(series)} rows, its box of {box_size} px needs {rows} (box // 2 + 1 shells)")
        return finite_floats(series, f"{path}: column {label} of data_{name}")

    box_size = int(number("rlnOriginalImageSize"))
    n_shells = box_size // 2 + 1
    per_class = {label: column("model_classes", label) for label in
                 ("rlnClassDistribution", "rlnAccuracyRotations", "rlnAccuracyTranslationsAngst", "rlnEstimatedResolution")}
    classes = [
        ClassSummary(
            map_name=str(name),
            distribution=float(per_class["rlnClassDistribution"][index]),
            accuracy_rotations_deg=float(per_class["rlnAccuracyRotations"][index]),
            accuracy_translations_angstrom=float(per_class["rlnAccuracyTranslationsAngst"][index]),
            resolution_angstrom=float(per_class["rlnEstimatedResolution"][index]),
            ssnr=column(f"model_class_{index + 1}", "rlnSsnrMap", n_shells),
            tau2=column(f"model_class_{index + 1}", "rlnReferenceTau2", n_shells),
            sigma2=column(f"model_class_{index + 1}", "rlnReferenceSigma2", n_shells),
        )
        for index, name in enumerate(values("model_classes", "rlnReferenceImage"))
    ]
    n_optics = int(number("rlnNrOpticsGroups"))
    return ModelSummary(
        box_size=box_size,
        pixel_size_angstrom=number("rlnPixelSize"),
        current_resolution_angstrom=number("rlnCurrentResolution"),
        current_image_size=int(number("rlnCurrentImageSize")),
        padding_factor=number("rlnPaddingFactor"),
        tau2_fudge=number("rlnTau2FudgeFactor"),
        sigma_offsets_angstrom=number("rlnSigmaOffsetsAngst"),
        log_likelihood=number("rlnLogLikelihood"),
        average_pmax=number("rlnAveragePmax"),
        classes=classes,
        group_names=[str(name) for name in values("model_groups", "rlnGroupName")],
        group_particle_counts=column("model_groups", "rlnGroupNrParticles").astype(np.int64),
        group_scales=column("model_groups", "rlnGroupScaleCorrection"),
        group_sigma2_noise=np.stack([column(f"model_optics_group_{index}", "rlnSigma2Noise", n_shells) for index in range(1, n_optics + 1)])
        if n_optics
        else np.zeros((0, n_shells)),
    )


def write_optimiser_star(path: str | os.PathLike[str], optimiser: OptimiserSummary) -> None:
    """Write a RELION-style optimiser STAR file (atomically)."""
    o = optimiser
    write_star(
        path,
        {
            "optimiser_general": {
                "rlnOutputRootName": project_path(o.output_root),
                "rlnModelStarFile": project_path(o.model_star),
                "rlnExperimentalDataStarFile": project_path(o.data_star),
                "rlnOrientSamplingStarFile": project_path(o.sampling_star),
                "rlnCurrentIteration": o.iteration,
                "rlnNumberOfIterations": o.n_iterations,
                "rlnDoSplitRandomHalves": 0,
                "rlnAdaptiveOversampleOrder": o.oversampling_order,
                "rlnAdaptiveOversampleFraction": o.oversampling_fraction,
                "rlnRandomSeed": o.random_seed,
                "rlnParticleDiameter": o.particle_diameter_angstrom,
                "rlnDoZeroMask": int(o.zero_mask),
                "rlnDoSolventFlattening": int(o.solvent_flattening),
                "rlnSolventMaskName": o.solvent_mask,
                "rlnHighresLimitExpectation": o.highres_limit_estep_angstrom,
                "rlnIncrementImageSize": o.increment_shells,  # RELION's --incr_size, in Fourier shells
                "rlnDoFastSubsetOptimisation": int(o.fast_subsets),
                "rlnDoAutoRefine": 0,
                "rlnDoSkipAlign": int(o.skip_align),
                "rlnOverallAccuracyRotations": o.overall_accuracy_rotations_deg,
                "rlnOverallAccuracyTranslationsAngst": o.overall_accuracy_translations_angstrom,
                "rlnChangesOptimalOrientations": o.changes_orientations_deg,
                "rlnChangesOptimalOffsets": o.changes_offsets_angstrom,
                "rlnChangesOptimalClasses": o.changes_classes,
                "rlnHasConverged": 0,
                "rlnDoCorrectCtf": int(o.correct_ctf),
                "rlnDoIgnoreCtfUntilFirstPeak": int(o.ignore_ctf_until_first_peak),
                "rlnRefsAreCtfCorrected": int(o.references_ctf_corrected),
            }
        },
    )


def write_sampling_star(path: str | os.PathLike[str], sampling: SamplingSummary) -> None:
    """Write a RELION-style sampling STAR file (``data_sampling_general``, atomically)."""
    s = sampling
    write_star(
        path,
        {
            "sampling_general": {
                "rlnHealpixOrder": s.healpix_order,
                "rlnSymmetryGroup": s.symmetry,
                "rlnPsiStep": s.psi_step_deg,
                "rlnOffsetRange": s.offset_range_angstrom,
                "rlnOffsetStep": s.offset_step_angstrom,
                "rlnSamplingPerturbInstance": s.perturbation,
                "rlnSamplingPerturbFactor": s.perturbation_factor,
            }
        },
    )
