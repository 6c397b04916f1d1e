"""The typed per-particle table that the rest of cryotorch sees instead of file columns."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from cryotorch.errors import InputError

__all__ = ["ParticleTable", "finite_floats"]


def finite_floats(values: pd.Series, subject: str, rows: str = "row") -> np.ndarray:
    """``(N,)`` float64 ``values`` of a STAR column, or an InputError naming the first that is
    not a finite number: ``{subject} has the value '…' in {rows} n, …`` (``subject`` e.g.
    ``particles.star: column rlnDefocusU of data_particles``, n from 1)."""
    numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(numeric))
    if bad.size:
        row = int(bad[0])
        raise InputError(f"{subject} has the value '{values.iloc[row]}' in {rows} {row + 1}, which is not a finite number; fix or remove that row")
    return numeric

# Per-particle array fields with their dtype and trailing shape; everything else is metadata.
_ARRAY_FIELDS: dict[str, tuple[type, tuple[int, ...]]] = {
    "stack_paths": (object, ()),
    "stack_indices": (np.int64, ()),
    "pixel_size_angstrom": (np.float64, ()),
    "box_size_px": (np.int64, ()),
    "euler_deg": (np.float64, (3,)),
    "origin_angstrom": (np.float64, (2,)),
    "defocus_u_angstrom": (np.float64, ()),
    "defocus_v_angstrom": (np.float64, ()),
    "defocus_angle_deg": (np.float64, ()),
    "voltage_kv": (np.float64, ()),
    "spherical_aberration_mm": (np.float64, ()),
    "amplitude_contrast": (np.float64, ()),
    "phase_shift_deg": (np.float64, ()),
    "ctf_bfactor_angstrom2": (np.float64, ()),
    "ctf_scale": (np.float64, ()),
    "optics_group": (np.int64, ()),
    "class_number": (np.int64, ()),
    "random_subset": (np.int64, ()),
}


@dataclass(eq=False)
class ParticleTable:
    """Per-particle metadata with optics-group parameters resolved per particle. N rows.

    Attributes
    ----------
    stack_paths
        ``(N,)`` object array of absolute paths (str) of the MRC stacks.
    stack_indices
        ``(N,)`` int64 0-based image index within its stack.
    pixel_size_angstrom
        ``(N,)`` float64 image pixel size in Å.
    box_size_px
        ``(N,)`` int64 image side length in pixels (0 where neither the metadata nor an
        existing stack says).
    euler_deg
        ``(N, 3)`` float64 RELION ZYZ angles ``(rot, tilt, psi)`` in degrees, 0 where absent.
    origin_angstrom
        ``(N, 2)`` float64 particle origin ``(x, y)`` in Å (image = projection shifted by
        ``-origin``).
    defocus_u_angstrom, defocus_v_angstrom
        ``(N,)`` float64 defocus along the major / minor astigmatism axis in Å.
    defocus_angle_deg
        ``(N,)`` float64 astigmatism angle from x in degrees.
    voltage_kv, spherical_aberration_mm, amplitude_contrast
        ``(N,)`` float64 acceleration voltage (kV), Cs (mm) and amplitude contrast fraction.
    phase_shift_deg, ctf_bfactor_angstrom2, ctf_scale
        ``(N,)`` float64 phase-plate shift (degrees, default 0), CTF B-factor (Å², default 0)
        and CTF scale (default 1).
    optics_group
        ``(N,)`` int64 1-based optics group.
    class_number
        ``(N,)`` int64 1-based class, 0 where absent.
    random_subset
        ``(N,)`` int64 half-set 1 or 2, 0 where absent.
    has_poses
        True when the file had all three Euler angles.
    has_ctf
        True when the file had defocus values.
    intensity_scale
        ``(N,)`` float64 per-particle intensity scale of a previous refinement (cryoSPARC's
        ``alignments3D/alpha``), or None where the file has none.
    source_particles
        Raw particle rows as read (RELION column names, one row per particle) so that
        :func:`write_particles` can carry unknown columns through; None if not from a STAR file.
    source_optics
        Raw optics table as read, if any.
    source_path
        File the table was read from, named in error messages; None if built in memory.
    """

    stack_paths: np.ndarray
    stack_indices: np.ndarray
    pixel_size_angstrom: np.ndarray
    box_size_px: np.ndarray
    euler_deg: np.ndarray
    origin_angstrom: np.ndarray
    defocus_u_angstrom: np.ndarray
    defocus_v_angstrom: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kv: np.ndarray
    spherical_aberration_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_deg: np.ndarray
    ctf_bfactor_angstrom2: np.ndarray
    ctf_scale: np.ndarray
    optics_group: np.ndarray
    class_number: np.ndarray
    random_subset: np.ndarray
    has_poses: bool
    has_ctf: bool
    intensity_scale: np.ndarray | None = None
    source_particles: pd.DataFrame | None = None
    source_optics: pd.DataFrame | None = None
    source_path: str | None = None

    def __post_init__(self) -> None:
        # Coerce once here so every consumer can rely on dtypes and shapes.
        n_rows = len(np.asarray(self.stack_paths))
        for name, (dtype, trailing_shape) in _ARRAY_FIELDS.items():
            array = np.asarray(getattr(self, name), dtype=dtype)
            if array.shape != (n_rows, *trailing_shape):
                raise ValueError(f"ParticleTable.{name} has shape {array.shape}, expected {(n_rows, *trailing_shape)}")
            setattr(self, name, array)
        if self.intensity_scale is not None:
            self.intensity_scale = np.asarray(self.intensity_scale, dtype=np.float64)
            if self.intensity_scale.shape != (n_rows,):
                raise ValueError(f"ParticleTable.intensity_scale has shape {self.intensity_scale.shape}, expected {(n_rows,)}")
        if self.source_particles is not None and len(self.source_particles) != n_rows:
            raise ValueError(f"source_particles has {len(self.source_particles)} rows, the table {n_rows}")

    @staticmethod
    def array_field_names() -> tuple[str, ...]:
        """Names of the per-particle array fields, in declaration order."""
        return tuple(_ARRAY_FIELDS)

    def __len__(self) -> int:
        return len(self.stack_paths)

    def select(self, indices: np.ndarray) -> ParticleTable:
        """Row subset (also of ``source_particles``), in the order of ``indices``.

        Parameters
        ----------
        indices
            ``(M,)`` integer row indices or ``(N,)`` boolean mask.
        """
        indices = np.arange(len(self))[np.asarray(indices)]
        subset = {name: getattr(self, name)[indices] for name in _ARRAY_FIELDS}
        source = None if self.source_particles is None else self.source_particles.iloc[indices].reset_index(drop=True)
        scale = None if self.intensity_scale is None else self.intensity_scale[indices]
        return replace(self, **subset, intensity_scale=scale, source_particles=source)

    def metadata(self, label: str) -> np.ndarray:
        """``(N,)`` float64 values of the STAR column ``label`` (e.g. ``rlnMaxValueProbDistribution``;
        a leading ``_`` is ignored) as read: the particle's own, else its optics group's.

        Raises
        ------
        InputError
            If the table was not read from a STAR file, holds no such column (the error lists
            those it holds), or a value is not a finite number (the error names the row).
        """
        name = label.removeprefix("_")
        where = self.source_path or "the particle table"
        if self.source_particles is None:
            raise InputError(f"{where}: no STAR columns to select on; read the particles from a STAR file")
        if name in self.source_particles:
            values = self.source_particles[name]
        elif self.source_optics is not None and name in self.source_optics and "rlnOpticsGroup" in self.source_optics:
            by_group = dict(zip(self.source_optics["rlnOpticsGroup"].astype(int), self.source_optics[name]))
            values = pd.Series([by_group[int(group)] for group in self.optics_group])
        else:
            held = sorted(set(self.source_particles.columns) | set(() if self.source_optics is None else self.source_optics.columns))
            raise InputError(f"{where}: no column {name}; it holds {', '.join(held)}")
        return finite_floats(values, f"{where}: column {name}", "particle row")

    @classmethod
    def from_arrays(
        cls,
        *,
        stack_paths: np.ndarray | list[str],
        stack_indices: np.ndarray,
        pixel_size_angstrom: float | np.ndarray,
        box_size_px: int | np.ndarray,
        euler_deg: np.ndarray | None = None,
        origin_angstrom: np.ndarray | None = None,
        defocus_u_angstrom: float | np.ndarray | None = None,
        defocus_v_angstrom: float | np.ndarray | None = None,
        defocus_angle_deg: float | np.ndarray = 0.0,
        voltage_kv: float | np.ndarray = 300.0,
        spherical_aberration_mm: float | np.ndarray = 2.7,
        amplitude_contrast: float | np.ndarray = 0.1,
        phase_shift_deg: float | np.ndarray = 0.0,
        ctf_bfactor_angstrom2: float | np.ndarray = 0.0,
        ctf_scale: float | np.ndarray = 1.0,
        optics_group: int | np.ndarray = 1,
        class_number: int | np.ndarray = 0,
        random_subset: int | np.ndarray = 0,
        intensity_scale: np.ndarray | None = None,
    ) -> ParticleTable:
        """Build a table from arrays, broadcasting scalars to N rows.

        ``has_poses`` is True when ``euler_deg`` is given and ``has_ctf`` when
        ``defocus_u_angstrom`` is (``defocus_v_angstrom`` then defaults to it). The voltage, Cs
        and amplitude contrast defaults are the common 300 kV, 2.7 mm and 0.1.
        """
        paths = np.asarray([str(path) for path in stack_paths], dtype=object)
        n_rows = len(paths)

        def per_row(value: object, trailing_shape: tuple[int, ...] = ()) -> np.ndarray:
            return np.broadcast_to(np.asarray(value), (n_rows, *trailing_shape)).copy()

        has_ctf = defocus_u_angstrom is not None
        if defocus_v_angstrom is None:
            defocus_v_angstrom = defocus_u_angstrom
        return cls(
            stack_paths=paths,
            stack_indices=per_row(stack_indices),
            pixel_size_angstrom=per_row(pixel_size_angstrom),
            box_size_px=per_row(box_size_px),
            euler_deg=per_row(0.0 if euler_deg is None else euler_deg, (3,)),
            origin_angstrom=per_row(0.0 if origin_angstrom is None else origin_angstrom, (2,)),
            defocus_u_angstrom=per_row(0.0 if defocus_u_angstrom is None else defocus_u_angstrom),
            defocus_v_angstrom=per_row(0.0 if defocus_v_angstrom is None else defocus_v_angstrom),
            defocus_angle_deg=per_row(defocus_angle_deg),
            voltage_kv=per_row(voltage_kv),
            spherical_aberration_mm=per_row(spherical_aberration_mm),
            amplitude_contrast=per_row(amplitude_contrast),
            phase_shift_deg=per_row(phase_shift_deg),
            ctf_bfactor_angstrom2=per_row(ctf_bfactor_angstrom2),
            ctf_scale=per_row(ctf_scale),
            optics_group=per_row(optics_group),
            class_number=per_row(class_number),
            random_subset=per_row(random_subset),
            has_poses=euler_deg is not None,
            has_ctf=has_ctf,
            intensity_scale=None if intensity_scale is None else per_row(intensity_scale),
        )

