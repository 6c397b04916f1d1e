"""cryoSPARC .cs conversion: poses, shifts, paths and fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cryotorch.conventions import euler_deg_to_matrix
from cryotorch.errors import InputError
from cryotorch.io import read_particles
from cryotorch.io._cryosparc import cryosparc_pose_to_euler_deg


def _rotation_from_vector(vectors: np.ndarray) -> torch.Tensor:
    """Right-handed rotations exp([r]×) by the matrix exponential (independent of Rodrigues)."""
    r = torch.from_numpy(np.array(vectors, dtype=np.float64))  # (N, 3), copied out of the record layout
    zero = torch.zeros_like(r[:, 0])
    skew = torch.stack(
        [torch.stack([zero, -r[:, 2], r[:, 1]], -1), torch.stack([r[:, 2], zero, -r[:, 0]], -1), torch.stack([-r[:, 1], r[:, 0], zero], -1)],
        -2,
    )
    return torch.linalg.matrix_exp(skew)


def test_relion_matrix_is_transpose_of_cryosparc_rotation() -> None:
    poses = np.random.default_rng(0).normal(size=(200, 3))
    poses[0] = 0.0  # identity
    relion = euler_deg_to_matrix(torch.from_numpy(cryosparc_pose_to_euler_deg(poses)))
    torch.testing.assert_close(relion, _rotation_from_vector(poses).transpose(-1, -2))


def test_in_plane_pose_is_psi() -> None:
    np.testing.assert_allclose(cryosparc_pose_to_euler_deg(np.array([[0.0, 0.0, np.deg2rad(30.0)]])), [[0.0, 0.0, 30.0]], atol=1e-12)


def test_refinement_export(shared_data: Path) -> None:
    path = shared_data / "metadata/cryodrgn/cryosparc_P12_J24_001_particles.cs"
    records = np.load(path)
    table = read_particles(path)
    assert len(table) == 2019 and table.has_poses and table.has_ctf
    relion = euler_deg_to_matrix(torch.from_numpy(table.euler_deg))
    torch.testing.assert_close(relion, _rotation_from_vector(records["alignments3D/pose"]).transpose(-1, -2))
    # Shifts in pixels with RELION's origin sign, converted with the blob pixel size.
    np.testing.assert_allclose(table.origin_angstrom, records["alignments3D/shift"] * records["blob/psize_A"][:, None], rtol=1e-6)
    np.testing.assert_allclose(table.defocus_angle_deg, np.rad2deg(records["ctf/df_angle_rad"]), rtol=1e-6)
    np.testing.assert_array_equal(table.defocus_u_angstrom, records["ctf/df1_A"])
    np.testing.assert_array_equal(table.random_subset, records["alignments3D/split"] + 1)
    np.testing.assert_array_equal(table.class_number, 1)
    assert table.box_size_px[0] == 180 and table.voltage_kv[0] == 200.0
    np.testing.assert_array_equal(table.intensity_scale, records["alignments3D/alpha"])  # cryoSPARC's per-particle scale
    assert table.select(np.array([3, 1])).intensity_scale.tolist() == records["alignments3D/alpha"][[3, 1]].tolist()
    # blob/path is project-relative; without the project the stack would sit beside the .cs.
    assert table.stack_paths[0] == str(path.parent / records["blob/path"][0].decode())


def test_2d_export_strips_import_marker_and_keeps_psi(shared_data: Path) -> None:
    path = shared_data / "metadata/cryodrgn/cryosparc_J2_particles_exported.cs"
    records = np.load(path)
    table = read_particles(path)
    assert records["blob/path"][0].startswith(b">") and ">" not in table.stack_paths[0]
    assert not table.has_poses and table.intensity_scale is None
    np.testing.assert_allclose(table.euler_deg[:, 2], np.rad2deg(records["alignments2D/pose"]), rtol=1e-6)
    np.testing.assert_array_equal(table.class_number, records["alignments2D/class"] + 1)


def test_stack_found_by_basename_beside_the_cs(tmp_path: Path) -> None:
    records = np.zeros(1, dtype=[("blob/path", "S40"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4"), ("blob/shape", "<u4", (2,))])
    records["blob/path"] = b"J7/extract/stack.mrc"
    records["blob/psize_A"], records["blob/shape"] = 1.5, (16, 16)
    (tmp_path / "stack.mrc").touch()
    with open(tmp_path / "p.cs", "wb") as handle:
        np.save(handle, records)
    table = read_particles(tmp_path / "p.cs")
    assert table.stack_paths[0] == str(tmp_path / "stack.mrc") and not table.has_ctf and not table.has_poses
    project = tmp_path / "P1"
    (project / "J7/extract").mkdir(parents=True)
    (project / "J7/extract/stack.mrc").touch()
    assert read_particles(tmp_path / "p.cs", project_dir=project).stack_paths[0] == str(project / "J7/extract/stack.mrc")


def test_missing_blob_field_names_field_and_file(tmp_path: Path) -> None:
    records = np.zeros(2, dtype=[("uid", "<u8"), ("blob/idx", "<u4")])
    with open(tmp_path / "bad.cs", "wb") as handle:
        np.save(handle, records)
    with pytest.raises(InputError, match=r"bad\.cs.*blob/path"):
        read_particles(tmp_path / "bad.cs")


def test_unreadable_plain_and_oblong_exports_are_reported(tmp_path: Path) -> None:
    (tmp_path / "text.cs").write_text("uid,blob/path\n1,a.mrc\n")
    with pytest.raises(InputError, match=r"cannot read cryoSPARC file .*text\.cs: .*; check that it is a \.cs export"):
        read_particles(tmp_path / "text.cs")
    with open(tmp_path / "plain.cs", "wb") as handle:
        np.save(handle, np.zeros((3, 2)))
    with pytest.raises(InputError, match=r"plain\.cs is not a cryoSPARC \.cs file \(no structured array inside\)"):
        read_particles(tmp_path / "plain.cs")
    records = np.zeros(2, dtype=[("blob/path", "S40"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4"), ("blob/shape", "<u4", (2,))])
    records["blob/path"], records["blob/psize_A"], records["blob/shape"] = b"stack.mrc", 1.5, [(16, 16), (16, 20)]
    (tmp_path / "stack.mrc").touch()
    with open(tmp_path / "oblong.cs", "wb") as handle:
        np.save(handle, records)
    with pytest.raises(InputError, match=r"oblong\.cs, row 2: blob/shape \[16, 20\] is not square; re-extract square particles"):
        read_particles(tmp_path / "oblong.cs")
