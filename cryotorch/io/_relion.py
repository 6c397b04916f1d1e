"""RELION particle STAR files (3.0, 3.1/4 and 5) ↔ :class:`ParticleTable`.

Reading
    The particle table is block ``data_particles`` (RELION 3.1+) or else the one loop with
    an ``rlnImageName`` column (RELION 3.0 writes ``data_``, ``data_images`` ...). Each
    per-particle parameter is taken from the particle row when that column exists there, else
    from the row of ``data_optics`` whose ``rlnOpticsGroup`` matches the particle's (a
    particle-level value is the more specific one). Pixel size is ``rlnImagePixelSize``, or
    ``rlnDetectorPixelSize`` (µm) × 10⁴ / ``rlnMagnification`` in RELION 3.0 files. Origins are
    ``rlnOriginXAngst/YAngst`` (Å), or ``rlnOriginX/Y`` (pixels) times the pixel size. Without
    ``rlnImageSize`` the box size is read from the stack header (0 if the stack is missing).
    Absent CTF columns take RELION's defaults (200 kV, Cs 0, amplitude contrast 0, ...).
Image paths
    ``N@path`` is 1-based image ``N`` of ``path``. A relative path is looked up relative to the
    STAR file's folder first, then to ``project_dir`` where given, then to each folder above
    the STAR file's (RELION writes paths relative to the project folder, which holds job
    folders such as ``Refine3D/job012/``), then to the working directory. If it exists in
    none, ``project_dir`` (when given, else the STAR folder) is used so that validation names
    the path most likely meant.
Writing
    RELION 3.1/4 layout (``# version 30001``, ``data_optics`` + ``data_particles``), origins
    in Å, image paths as RELION names them: relative to the working directory (the project
    folder RELION's programs run in) where the stack lies inside it, else absolute.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cryotorch.errors import InputError
from cryotorch.io._mrc import read_mrc_header_summary
from cryotorch.io._paths import project_path, project_search_folders, resolve_stack_path
from cryotorch.io._star import read_star, write_star
from cryotorch.io._table import ParticleTable, finite_floats

__all__ = ["read_relion_particles", "write_particles"]

_IMAGE_NAME = "rlnImageName"
_OPTICS_GROUP = "rlnOpticsGroup"
_OPTICS_GROUP_NAME = "rlnOpticsGroupName"
_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
_ORIGINS_ANGSTROM = ("rlnOriginXAngst", "rlnOriginYAngst")
_ORIGINS_PIXELS = ("rlnOriginX", "rlnOriginY")
_IMAGE_PIXEL_SIZE = "rlnImagePixelSize"
_DETECTOR_PIXEL_SIZE = "rlnDetectorPixelSize"  # µm, RELION 3.0
_MAGNIFICATION = "rlnMagnification"
_IMAGE_SIZE = "rlnImageSize"
_IMAGE_DIMENSIONALITY = "rlnImageDimensionality"
_DEFOCUS_U, _DEFOCUS_V, _DEFOCUS_ANGLE = "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"
_VOLTAGE, _CS, _AMPLITUDE_CONTRAST = "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"
_PHASE_SHIFT, _BFACTOR, _SCALE = "rlnPhaseShift", "rlnCtfBfactor", "rlnCtfScalefactor"
_CLASS, _RANDOM_SUBSET = "rlnClassNumber", "rlnRandomSubset"

# Columns whose content the typed table owns: rewritten from it, never copied from the source.
_MANAGED_COLUMNS = frozenset(
    {
        _IMAGE_NAME, _OPTICS_GROUP, *_ANGLES, *_ORIGINS_ANGSTROM, *_ORIGINS_PIXELS, _IMAGE_PIXEL_SIZE,
        _DETECTOR_PIXEL_SIZE, _MAGNIFICATION, _IMAGE_SIZE, _DEFOCUS_U, _DEFOCUS_V, _DEFOCUS_ANGLE, _VOLTAGE,
        _CS, _AMPLITUDE_CONTRAST, _PHASE_SHIFT, _BFACTOR, _SCALE, _CLASS, _RANDOM_SUBSET,
    }
)  # fmt: skip

# RELION's own defaults for absent CTF columns (CTF::read): 200 kV, and 0 for Cs, amplitude
# contrast, B-factor and phase shift, scale 1, defocus V = U, so a file means what it means to RELION.
_RELION_DEFAULT_VOLTAGE_KV = 200.0


class _ParticleColumns:
    """Looks up per-particle values from the particle table, falling back to the optics table."""

    def __init__(self, path: Path, block_name: str, particles: pd.DataFrame, optics: pd.DataFrame | None) -> None:
        self.path = path
        self.block_name = block_name
        self.particles = particles
        self.optics = optics
        self.optics_group = self._optics_groups()
        self._optics_rows = self._optics_row_per_particle()

    def _optics_groups(self) -> np.ndarray:
        if _OPTICS_GROUP in self.particles:
            return self.integers(_OPTICS_GROUP)
        if self.optics is not None and len(self.optics) == 1 and _OPTICS_GROUP in self.optics:
            return np.full(len(self.particles), int(self.optics[_OPTICS_GROUP].iloc[0]), dtype=np.int64)
        if self.optics is not None and len(self.optics) > 1:
            raise InputError(
                f"{self.path}: data_{self.block_name} has no {_OPTICS_GROUP} column but data_optics defines "
                f"{len(self.optics)} groups; add {_OPTICS_GROUP} to every particle row"
            )
        return np.ones(len(self.particles), dtype=np.int64)

    def _optics_row_per_particle(self) -> np.ndarray | None:
        if self.optics is None or len(self.optics) == 0:
            return None
        if _OPTICS_GROUP not in self.optics:
            if len(self.optics) == 1:
                return np.zeros(len(self.particles), dtype=np.int64)
            raise InputError(f"{self.path}: data_optics has no {_OPTICS_GROUP} column; number its rows 1, 2, ...")
        optics_groups = pd.Index(self.optics[_OPTICS_GROUP])
        if optics_groups.has_duplicates:
            raise InputError(f"{self.path}: data_optics lists an {_OPTICS_GROUP} twice; give each group one row")
        rows = optics_groups.get_indexer(self.optics_group)
        unknown = np.flatnonzero(rows < 0)
        if unknown.size:
            row = int(unknown[0])
            raise InputError(
                f"{self.path}, particle row {row + 1}: {_OPTICS_GROUP} {self.optics_group[row]} is not defined in "
                f"data_optics (groups {', '.join(map(str, optics_groups))}); fix the group number or add the group"
            )
        return rows

    def has(self, column: str) -> bool:
        in_optics = self.optics is not None and self._optics_rows is not None and column in self.optics
        return column in self.particles or in_optics

    def floats(self, column: str, default: float | None = None) -> np.ndarray:
        """``(N,)`` float64 values of ``column``; ``default`` where absent, error if no default."""
        if column in self.particles:
            source, where, values = f"data_{self.block_name}", None, self.particles[column]
        elif self.has(column):
            assert self.optics is not None and self._optics_rows is not None
            source, where, values = "data_optics", self._optics_rows, self.optics[column]
        elif default is not None:
            return np.full(len(self.particles), default, dtype=np.float64)
        else:
            raise InputError(
                f"{self.path}: required column {column} is missing from data_{self.block_name}"
                f"{' and data_optics' if self.optics is not None else ''}; add it"
            )
        numeric = finite_floats(values, f"{self.path}: column {column} of {source}")
        return numeric if where is None else numeric[where]

    def integers(self, column: str, default: int | None = None) -> np.ndarray:
        """``(N,)`` int64 values of ``column``; error if some value is not a whole number."""
        values = self.floats(column, None if default is None else float(default))
        fractional = np.flatnonzero(values != np.round(values))
        if fractional.size:
            row = int(fractional[0])
            raise InputError(
                f"{self.path}, particle row {row + 1}: column {column} holds {values[row]}, which is not a whole "
                "number; fix the value"
            )
        return values.astype(np.int64)


def _find_particle_block(blocks: dict[str, pd.DataFrame | dict[str, object]], path: Path) -> str:
    """Name of the block that lists particles."""
    tables = [name for name, block in blocks.items() if isinstance(block, pd.DataFrame) and name != "optics"]
    if "particles" in tables:
        return "particles"
    with_images = [name for name in tables if _IMAGE_NAME in blocks[name]]  # type: ignore[operator]
    if len(with_images) == 1:
        return with_images[0]
    if len(tables) == 1:
        return tables[0]  # its missing rlnImageName is reported by the caller
    if not with_images:
        raise InputError(
            f"{path}: no particle table found — none of the blocks "
            f"({', '.join('data_' + name for name in blocks)}) has an {_IMAGE_NAME} column; "
            "pass a RELION particle STAR file"
        )
    raise InputError(
        f"{path}: several blocks ({', '.join('data_' + name for name in with_images)}) list images; "
        "name the particle block data_particles"
    )


def _parse_image_names(names: pd.Series, path: Path, block_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Split ``N@stack`` names into 0-based indices ``(N,)`` int64 and stack names ``(N,)``."""
    text = names.astype(str)
    index_text, separator, stack_text = (part for _, part in text.str.partition("@").items())
    has_index = separator == "@"
    # A name without "@" is a file holding a single image.
    stack_names = stack_text.where(has_index, index_text).to_numpy(dtype=object)
    numbers = pd.to_numeric(index_text.where(has_index, "1"), errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~(numbers >= 1) | (numbers != np.round(numbers)) | (stack_names == ""))
    if bad.size:
        row = int(bad[0])
        raise InputError(
            f"{path}, particle row {row + 1}: {_IMAGE_NAME} {names.iloc[row]!r} in data_{block_name} is not of the "
            "form N@stack.mrcs with N >= 1; fix the image name"
        )
    return numbers.astype(np.int64) - 1, stack_names


def read_relion_particles(path: str | os.PathLike[str], project_dir: str | os.PathLike[str] | None = None) -> ParticleTable:
    """Read a RELION 3.0, 3.1/4 or 5 particle STAR file (see the module docstring for the rules).

    Parameters
    ----------
    path
        Particle STAR file.
    project_dir
        RELION project folder that relative image paths may be relative to.

    Returns
    -------
    ParticleTable
        One row per particle row of the file, with ``source_particles``/``source_optics`` set.

    Raises
    ------
    InputError
        For a malformed file, a missing required column or an invalid value.
    """
    path = Path(path)
    blocks = read_star(path)
    block_name = _find_particle_block(blocks, path)
    particles = blocks[block_name]
    optics = blocks.get("optics")
    assert isinstance(particles, pd.DataFrame)
    optics = optics if isinstance(optics, pd.DataFrame) else None
    if _IMAGE_NAME not in particles:
        raise InputError(
            f"{path}: required column {_IMAGE_NAME} is missing from data_{block_name}; "
            "the particle table must name each particle's image as N@stack.mrcs"
        )
    if len(particles) == 0:
        # An empty selection is valid, whatever its optics table says.
        empty = ParticleTable.from_arrays(stack_paths=[], stack_indices=[], pixel_size_angstrom=[], box_size_px=[])
        return replace(empty, source_particles=particles, source_optics=optics, source_path=os.path.abspath(path))
    columns = _ParticleColumns(path, block_name, particles, optics)
    stack_indices, stack_names = _parse_image_names(particles[_IMAGE_NAME], path, block_name)
    stack_paths = _resolve_stack_paths(stack_names, path.parent, None if project_dir is None else Path(project_dir))

    if columns.has(_IMAGE_PIXEL_SIZE):
        pixel_size_angstrom = columns.floats(_IMAGE_PIXEL_SIZE)
    elif columns.has(_DETECTOR_PIXEL_SIZE) and columns.has(_MAGNIFICATION):
        pixel_size_angstrom = columns.floats(_DETECTOR_PIXEL_SIZE) * 1e4 / columns.floats(_MAGNIFICATION)
    else:
        raise InputError(
            f"{path}: no pixel size — add {_IMAGE_PIXEL_SIZE} (Å) to data_optics or, for RELION 3.0 files, "
            f"{_DETECTOR_PIXEL_SIZE} (µm) and {_MAGNIFICATION} to data_{block_name}"
        )
    not_positive = np.flatnonzero(pixel_size_angstrom <= 0)
    if not_positive.size:
        row = int(not_positive[0])
        raise InputError(f"{path}, particle row {row + 1}: pixel size {pixel_size_angstrom[row]} Å is not positive; fix it")

    if columns.has(_IMAGE_SIZE):
        box_size_px = columns.integers(_IMAGE_SIZE)
    else:
        box_size_px = _box_sizes_from_headers(stack_paths)

    if all(columns.has(column) for column in _ORIGINS_ANGSTROM):
        origin_angstrom = np.stack([columns.floats(column) for column in _ORIGINS_ANGSTROM], axis=-1)
    else:
        origin_px = np.stack([columns.floats(column, 0.0) for column in _ORIGINS_PIXELS], axis=-1)  # (N, 2)
        origin_angstrom = origin_px * pixel_size_angstrom[:, None]

    defocus_u = columns.floats(_DEFOCUS_U, 0.0)
    random_subset = columns.integers(_RANDOM_SUBSET, 0)
    invalid_subset = np.flatnonzero(~np.isin(random_subset, (0, 1, 2)))
    if invalid_subset.size:
        row = int(invalid_subset[0])
        raise InputError(
            f"{path}, particle row {row + 1}: {_RANDOM_SUBSET} is {random_subset[row]}; it must be 1 or 2"
        )
    return ParticleTable(
        stack_paths=stack_paths,
        stack_indices=stack_indices,
        pixel_size_angstrom=pixel_size_angstrom,
        box_size_px=box_size_px,
        euler_deg=np.stack([columns.floats(column, 0.0) for column in _ANGLES], axis=-1),
        origin_angstrom=origin_angstrom,
        defocus_u_angstrom=defocus_u,
        defocus_v_angstrom=columns.floats(_DEFOCUS_V, 0.0) if columns.has(_DEFOCUS_V) else defocus_u.copy(),
        defocus_angle_deg=columns.floats(_DEFOCUS_ANGLE, 0.0),
        voltage_kv=columns.floats(_VOLTAGE, _RELION_DEFAULT_VOLTAGE_KV),
        spherical_aberration_mm=columns.floats(_CS, 0.0),
        amplitude_contrast=columns.floats(_AMPLITUDE_CONTRAST, 0.0),
        phase_shift_deg=columns.floats(_PHASE_SHIFT, 0.0),
        ctf_bfactor_angstrom2=columns.floats(_BFACTOR, 0.0),
        ctf_scale=columns.floats(_SCALE, 1.0),
        optics_group=columns.optics_group,
        class_number=columns.integers(_CLASS, 0),
        random_subset=random_subset,
        has_poses=all(columns.has(column) for column in _ANGLES),
        has_ctf=columns.has(_DEFOCUS_U),
        source_particles=particles,
        source_optics=optics,
        source_path=os.path.abspath(path),
    )


def _resolve_stack_paths(stack_names: np.ndarray, star_folder: Path, project_dir: Path | None) -> np.ndarray:
    """``(N,)`` absolute stack paths, resolving each distinct name once."""
    codes, unique_names = pd.factorize(stack_names)
    search = project_search_folders(star_folder, project_dir)
    fallback = star_folder if project_dir is None else project_dir
    resolved = np.array([resolve_stack_path(name, search, fallback) for name in unique_names], dtype=object)
    return resolved[codes] if len(codes) else np.array([], dtype=object)


def _box_sizes_from_headers(stack_paths: np.ndarray) -> np.ndarray:
    """``(N,)`` box sizes read from each existing stack's header once; 0 for missing stacks."""
    codes, unique_paths = pd.factorize(stack_paths)
    sizes = np.array(
        [read_mrc_header_summary(stack).width_px if os.path.isfile(stack) else 0 for stack in unique_paths],
        dtype=np.int64,
    )
    return sizes[codes] if len(codes) else np.array([], dtype=np.int64)


def _project_image_paths(stack_paths: np.ndarray) -> np.ndarray:
    """``(N,)`` object stack paths as written (:func:`project_path`), each distinct one computed once."""
    codes, unique_paths = pd.factorize(stack_paths)
    written = np.asarray([project_path(stack) for stack in unique_paths], dtype=object)
    return written[codes] if len(codes) else np.array([], dtype=object)


def _optics_and_particle_levels(table: ParticleTable) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split optics-level values into those constant per optics group and those that are not."""
    per_group_candidates = {
        _IMAGE_PIXEL_SIZE: table.pixel_size_angstrom,
        _IMAGE_SIZE: table.box_size_px,
        _VOLTAGE: table.voltage_kv,
        _CS: table.spherical_aberration_mm,
        _AMPLITUDE_CONTRAST: table.amplitude_contrast,
    }
    frame = pd.DataFrame({_OPTICS_GROUP: table.optics_group, **per_group_candidates})
    grouped = frame.groupby(_OPTICS_GROUP, sort=True)
    optics_level, particle_level = {}, {}
    for column, values in per_group_candidates.items():
        if bool((grouped[column].nunique() <= 1).all()):
            optics_level[column] = grouped[column].first().to_numpy()
        else:
            # RELION keeps these per optics group; a per-particle column is the lossless fallback.
            particle_level[column] = values
    return optics_level, particle_level


def _optics_block(table: ParticleTable, optics_level: dict[str, np.ndarray]) -> pd.DataFrame:
    groups = np.unique(table.optics_group)
    optics = pd.DataFrame({_OPTICS_GROUP: groups})
    source = table.source_optics
    carried = source is not None and _OPTICS_GROUP in source and bool(np.isin(groups, source[_OPTICS_GROUP]).all())
    if carried:
        assert source is not None
        extra = [column for column in source.columns if column not in _MANAGED_COLUMNS | {_IMAGE_DIMENSIONALITY}]
        optics = optics.merge(source[[_OPTICS_GROUP, *extra]], on=_OPTICS_GROUP, how="left")
    if _OPTICS_GROUP_NAME not in optics:
        optics[_OPTICS_GROUP_NAME] = [f"opticsGroup{group}" for group in groups]
    for column, values in optics_level.items():
        optics[column] = values
    optics[_IMAGE_DIMENSIONALITY] = 2
    return optics


def write_particles(
    path: str | os.PathLike[str],
    table: ParticleTable,
    extra_columns: dict[str, np.ndarray] | None = None,
) -> None:
    """Write a RELION 3.1/4 particle STAR file (``data_optics`` + ``data_particles``), atomically.

    Parameters
    ----------
    path
        Destination STAR file; image paths are written relative to the working directory
        (RELION's project folder) where the stacks lie inside it, else absolute.
    table
        Particles to write. Columns of ``table.source_particles`` that the table does not
        model (coordinates, micrograph names, ...) are carried through unchanged.
    extra_columns
        ``{RELION name without "_": (N,) values}`` added to, or replacing, particle columns
        (e.g. ``{"rlnClassNumber": classes}``).
    """
    path = Path(path)
    n_rows = len(table)
    optics_level, particle_level = _optics_and_particle_levels(table)
    image_paths = _project_image_paths(table.stack_paths)
    image_names = [f"{index + 1:06d}@{stack}" for index, stack in zip(table.stack_indices.tolist(), image_paths)]

    particles: dict[str, np.ndarray | list[str]] = {_IMAGE_NAME: image_names, _OPTICS_GROUP: table.optics_group}
    for axis, column in enumerate(_ANGLES):
        # Without poses only the angles that carry information (e.g. a 2D psi) are written,
        # so that reading the file back gives has_poses=False again.
        if table.has_poses or table.euler_deg[:, axis].any():
            particles[column] = table.euler_deg[:, axis]
    particles[_ORIGINS_ANGSTROM[0]] = table.origin_angstrom[:, 0]
    particles[_ORIGINS_ANGSTROM[1]] = table.origin_angstrom[:, 1]
    if table.has_ctf:
        particles[_DEFOCUS_U] = table.defocus_u_angstrom
        particles[_DEFOCUS_V] = table.defocus_v_angstrom
        particles[_DEFOCUS_ANGLE] = table.defocus_angle_deg
    particles[_PHASE_SHIFT] = table.phase_shift_deg
    particles[_BFACTOR] = table.ctf_bfactor_angstrom2
    particles[_SCALE] = table.ctf_scale
    if table.class_number.any():
        particles[_CLASS] = table.class_number
    if table.random_subset.any():
        particles[_RANDOM_SUBSET] = table.random_subset
    particles.update(particle_level)
    frame = pd.DataFrame(particles, index=pd.RangeIndex(n_rows))
    if table.source_particles is not None:
        source = table.source_particles.reset_index(drop=True)
        for column in source.columns:
            if column not in _MANAGED_COLUMNS:
                frame[column] = source[column]
    for column, values in (extra_columns or {}).items():
        values = np.asarray(values)
        if values.shape != (n_rows,):
            raise ValueError(f"extra column {column} has shape {values.shape}, expected ({n_rows},)")
        frame[column] = values
    write_star(path, {"optics": _optics_block(table, optics_level), "particles": frame}, relion_version=30001)
