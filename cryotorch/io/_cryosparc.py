"""cryoSPARC particle exports (``.cs``: a NumPy structured array) → :class:`ParticleTable`.

Poses
    ``alignments3D/pose`` is an axis-angle (rotation) vector ``r`` in radians. With ``R(r)``
    the right-handed rotation by ``|r|`` about ``r / |r|`` (Rodrigues' formula), RELION's
    matrix is its transpose, ``A = R(r)ᵀ``, and the Euler angles are those of ``A``. This is
    the conversion of pyem's ``csparc2star`` (whose ``expmap`` builds ``Rᵀ`` directly) and of
    cryoDRGN's ``parse_pose_csparc`` (which transposes ``expmap``'s ``R`` to obtain the same
    matrix its ``parse_pose_star`` builds from RELION angles).
Shifts
    ``alignments3D/shift`` is in pixels of the particle image and has RELION's origin sign
    (both converters copy it to ``rlnOriginX/Y`` unchanged): ``origin_angstrom = shift ×
    blob/psize_A``.
2D classification exports
    ``alignments2D/pose`` is the in-plane angle in radians; it becomes ``psi`` (the Euler
    angles of ``A = R((0, 0, θ))ᵀ`` are ``(0, 0, θ)``), and ``has_poses`` stays False.
Other fields
    ``split`` 0/1 → random subset 1/2, ``class`` 0-based → 1-based, ``ctf/exp_group_id`` →
    1-based optics groups numbered densely in increasing id order.
Stack paths
    cryoSPARC writes ``blob/path`` relative to its project folder, sometimes with a leading
    ``>`` (imported files), which is dropped. A path is looked up under ``project_dir``, then
    the ``.cs`` folder, then by bare file name in the ``.cs`` folder (exports copied away
    from the project keep their stacks beside the ``.cs``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryotorch.conventions import matrix_to_euler_deg
from cryotorch.errors import InputError
from cryotorch.io._paths import resolve_stack_path
from cryotorch.io._table import ParticleTable

__all__ = ["read_cryosparc_particles", "cryosparc_pose_to_euler_deg"]

_REQUIRED_FIELDS = ("blob/path", "blob/idx", "blob/psize_A", "blob/shape")

# Optional CTF fields: cryoSPARC name → (ParticleTable.from_arrays argument, unit conversion).
_CTF_FIELDS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "ctf/df1_A": ("defocus_u_angstrom", lambda values: values),
    "ctf/df2_A": ("defocus_v_angstrom", lambda values: values),
    "ctf/df_angle_rad": ("defocus_angle_deg", np.rad2deg),
    "ctf/accel_kv": ("voltage_kv", lambda values: values),
    "ctf/cs_mm": ("spherical_aberration_mm", lambda values: values),
    "ctf/amp_contrast": ("amplitude_contrast", lambda values: values),
    "ctf/phase_shift_rad": ("phase_shift_deg", np.rad2deg),
    "ctf/bfactor": ("ctf_bfactor_angstrom2", lambda values: values),
    "ctf/scale": ("ctf_scale", lambda values: values),
}


def cryosparc_pose_to_euler_deg(pose_rad: np.ndarray) -> np.ndarray:
    """RELION Euler angles of cryoSPARC axis-angle poses.

    Parameters
    ----------
    pose_rad
        ``(N, 3)`` rotation vectors in radians (``alignments3D/pose``).

    Returns
    -------
    numpy.ndarray
        ``(N, 3)`` float64 ``(rot, tilt, psi)`` in degrees of ``A = R(pose)ᵀ``.
    """
    vectors = np.asarray(pose_rad, dtype=np.float64).reshape(-1, 3)
    angle = np.linalg.norm(vectors, axis=-1)  # (N,)
    axis = vectors / np.where(angle > 0, angle, 1.0)[:, None]  # zero vector → identity below
    x, y, z = axis.T
    zeros = np.zeros_like(x)
    cross = np.stack(
        [np.stack([zeros, -z, y], -1), np.stack([z, zeros, -x], -1), np.stack([-y, x, zeros], -1)], -2
    )  # (N, 3, 3): cross(axis, v) = cross @ v
    rotation = (
        np.eye(3)
        + np.sin(angle)[:, None, None] * cross
        + (1 - np.cos(angle))[:, None, None] * (cross @ cross)
    )  # (N, 3, 3) right-handed rotation by `angle` about `axis`
    relion_matrix = np.swapaxes(rotation, -1, -2)
    return matrix_to_euler_deg(torch.from_numpy(relion_matrix)).numpy()


def _dense_groups(exp_group_id: np.ndarray) -> np.ndarray:
    """1-based group numbers in increasing order of cryoSPARC's exposure-group ids."""
    return np.unique(exp_group_id, return_inverse=True)[1].reshape(-1).astype(np.int64) + 1


def read_cryosparc_particles(
    path: str | os.PathLike[str], project_dir: str | os.PathLike[str] | None = None
) -> ParticleTable:
    """Read a cryoSPARC particle ``.cs`` file (see the module docstring for the conversions).

    Parameters
    ----------
    path
        ``.cs`` file.
    project_dir
        cryoSPARC project folder (``P12/``) that ``blob/path`` is relative to.

    Returns
    -------
    ParticleTable
        ``source_particles`` is None (there are no RELION columns to carry through).
    """
    path = Path(path)
    try:
        records = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read cryoSPARC file {path}: {error}; check that it is a .cs export") from error
    if not isinstance(records, np.ndarray) or records.dtype.names is None:
        raise InputError(f"{path} is not a cryoSPARC .cs file (no structured array inside); pass a particle export")
    names = set(records.dtype.names)
    if len(records) == 0:
        # An empty selection is valid whatever fields the job wrote.
        empty = ParticleTable.from_arrays(stack_paths=[], stack_indices=[], pixel_size_angstrom=[], box_size_px=[])
        return replace(empty, source_path=os.path.abspath(path))
    missing = [field for field in _REQUIRED_FIELDS if field not in names]
    if missing:
        raise InputError(
            f"{path}: required field(s) {', '.join(missing)} missing; export the particles with their image "
            "blobs (e.g. from an Extract, Import or Refinement job's particles output)"
        )

    folder = path.parent
    project = None if project_dir is None else Path(project_dir)
    codes, unique_names = pd.factorize(np.char.decode(records["blob/path"].astype(bytes), "utf-8"))
    search = [folder] if project is None else [project, folder]
    resolved = np.array(
        [
            resolve_stack_path(name.removeprefix(">"), search, project or folder, by_basename_in=folder)
            for name in unique_names
        ],
        dtype=object,
    )
    pixel_size_angstrom = records["blob/psize_A"].astype(np.float64)
    shape = records["blob/shape"].reshape(len(records), -1)  # (N, 2) = (ny, nx)

    if not np.array_equal(shape[:, 0], shape[:, -1]):
        row = int(np.flatnonzero(shape[:, 0] != shape[:, -1])[0])
        raise InputError(f"{path}, row {row + 1}: blob/shape {shape[row].tolist()} is not square; re-extract square particles")
    optional: dict[str, np.ndarray] = {
        target: convert(records[name].astype(np.float64))
        for name, (target, convert) in _CTF_FIELDS.items()
        if name in names
    }

    if "alignments3D/pose" in names:
        alignment, has_poses = "alignments3D", True
        euler_deg = cryosparc_pose_to_euler_deg(records["alignments3D/pose"])
    elif "alignments2D/pose" in names:
        alignment, has_poses = "alignments2D", False
        euler_deg = np.zeros((len(records), 3))
        euler_deg[:, 2] = np.rad2deg(records["alignments2D/pose"].astype(np.float64))
    else:
        alignment, has_poses, euler_deg = None, False, None
    origin_angstrom = None
    class_number = random_subset = 0
    if alignment is not None:
        origin_angstrom = records[f"{alignment}/shift"].astype(np.float64) * pixel_size_angstrom[:, None]
        if f"{alignment}/class" in names:
            class_number = records[f"{alignment}/class"].astype(np.int64) + 1
        if f"{alignment}/split" in names:
            random_subset = records[f"{alignment}/split"].astype(np.int64) + 1

    table = ParticleTable.from_arrays(
        stack_paths=resolved[codes],
        stack_indices=records["blob/idx"].astype(np.int64),
        pixel_size_angstrom=pixel_size_angstrom,
        box_size_px=shape[:, -1].astype(np.int64),
        euler_deg=euler_deg,
        origin_angstrom=origin_angstrom,
        **optional,
        optics_group=_dense_groups(records["ctf/exp_group_id"]) if "ctf/exp_group_id" in names else 1,
        class_number=class_number,
        random_subset=random_subset,
        intensity_scale=records["alignments3D/alpha"].astype(np.float64) if "alignments3D/alpha" in names else None,
    )
    return replace(table, has_poses=has_poses, source_path=os.path.abspath(path))
