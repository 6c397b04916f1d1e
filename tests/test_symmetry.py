"""Point-group matrices: group axioms, RELION's settings and RELION's element order."""

from __future__ import annotations

import math
import re

import pytest
import torch

from cryotorch.conventions import euler_deg_to_matrix
from cryotorch.ops.symmetry import canonical_symmetry_name, symmetry_matrices, symmetry_order

from conftest import DEVICES

GROUPS = ["C1", "C2", "C4", "C7", "D1", "D2", "D7", "T", "O", "I", "I1", "I2", "I3", "I4"]


def _axis_angle(matrix: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Unit axis and angle (degrees) of one (3, 3) rotation."""
    angle = math.degrees(math.acos(max(-1.0, min(1.0, (float(matrix.trace()) - 1.0) / 2.0))))
    eigenvalues, eigenvectors = torch.linalg.eig(matrix)
    axis = eigenvectors[:, (eigenvalues - 1).abs().argmin()].real
    return axis / axis.norm(), angle


def _contains(group: torch.Tensor, matrix: torch.Tensor, atol: float = 1e-6) -> bool:
    return bool(((group - matrix).abs().amax(dim=(-2, -1)) < atol).any())


@pytest.mark.parametrize(
    ("name", "order"),
    [("C1", 1), ("C4", 4), ("c4", 4), ("D7", 14), ("d1", 2), ("T", 12), ("O", 24), ("I", 60), ("i3", 60)],
)
def test_group_order(name: str, order: int) -> None:
    assert symmetry_order(name) == order
    assert symmetry_matrices(name).shape == (order, 3, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", GROUPS)
def test_group_axioms(name: str, device: str) -> None:
    group = symmetry_matrices(name, device=device)
    assert group.device.type == device and group.dtype == torch.float64
    eye = torch.eye(3, dtype=torch.float64, device=device)
    assert torch.equal(group[0], eye)
    assert torch.allclose(group @ group.transpose(-1, -2), eye.expand_as(group), atol=1e-12)
    assert torch.allclose(torch.linalg.det(group), torch.ones(len(group), dtype=torch.float64, device=device))
    products = (group[:, None] @ group[None]).reshape(-1, 1, 9)  # (G * G, 1, 9)
    distance = (products - group.reshape(1, -1, 9)).abs().amax(-1).amin(-1)
    assert float(distance.max()) < 1e-6
    # No duplicates: the list is the group, once.
    pairwise = (group.reshape(-1, 1, 9) - group.reshape(1, -1, 9)).abs().amax(-1)
    assert int((pairwise < 1e-6).sum()) == len(group)


def test_cyclic_generator_is_rotation_about_z() -> None:
    # RELION stores rotation3DMatrix(+90, z)^T first, i.e. a -90 degree turn about z.
    c4 = symmetry_matrices("C4")
    expected = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(c4[1], expected, atol=1e-15)
    axis, angle = _axis_angle(symmetry_matrices("C7")[1])
    assert abs(abs(float(axis[2])) - 1.0) < 1e-12 and abs(angle - 360.0 / 7) < 1e-9


def test_dihedral_order_matches_relion() -> None:
    # Generators z 2-fold then x 2-fold; closure appends their product (y 2-fold).
    expected = torch.stack(
        [torch.diag(torch.tensor(d, dtype=torch.float64)) for d in ([1, 1, 1], [-1, -1, 1], [1, -1, -1], [-1, 1, -1])]
    )
    assert torch.equal(symmetry_matrices("D2"), expected)
    assert _contains(symmetry_matrices("D7"), torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)))


def test_i2_has_two_folds_along_x_y_z() -> None:
    group = symmetry_matrices("I")
    assert torch.equal(group, symmetry_matrices("I2"))
    for diagonal in ([1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]):
        assert _contains(group, torch.diag(torch.tensor(diagonal, dtype=torch.float64)))
    # I2's 5-fold lies in the xz plane at atan(1 / phi) from z.
    phi = (1 + math.sqrt(5)) / 2
    five_fold = torch.tensor([1.0, 0.0, phi], dtype=torch.float64)
    turn = torch.linalg.matrix_exp(
        math.radians(72)
        * torch.tensor(
            [[0, -five_fold[2], five_fold[1]], [five_fold[2], 0, -five_fold[0]], [-five_fold[1], five_fold[0], 0]],
            dtype=torch.float64,
        )
        / five_fold.norm()
    )
    assert _contains(group, turn)


@pytest.mark.parametrize(("name", "tilt_deg"), [("I1", 90.0), ("I3", -31.7174744114613), ("I4", 31.7174744114613)])
def test_other_icosahedral_settings_are_turned_i2(name: str, tilt_deg: float) -> None:
    # I1, I3, I4 are I2 seen after a turn about y (RELION's comments: I1 has no 2-fold on z,
    # I3 has a 5-fold on z).
    turn = euler_deg_to_matrix(torch.tensor([0.0, tilt_deg, 0.0], dtype=torch.float64))
    turned_i2 = turn.T @ symmetry_matrices("I2") @ turn
    group = symmetry_matrices(name)
    assert all(_contains(group, m) for m in turned_i2)
    if name == "I3":
        five_fold_about_z = euler_deg_to_matrix(torch.tensor([72.0, 0.0, 0.0], dtype=torch.float64))
        assert _contains(group, five_fold_about_z)


def test_names_are_case_insensitive() -> None:
    assert torch.equal(symmetry_matrices("c4"), symmetry_matrices("C4"))
    assert torch.equal(symmetry_matrices("d7"), symmetry_matrices("D7"))
    assert canonical_symmetry_name(" i ") == "I2"


@pytest.mark.parametrize("bad", ["C0", "D0", "X3", "", "C2v", "D3h", "I5", "Ci", "Cs", "4"])
def test_bad_names_raise(bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        symmetry_matrices(bad)
    with pytest.raises(ValueError):
        symmetry_order(bad)


def test_result_is_not_the_cache() -> None:
    first = symmetry_matrices("C2")
    first.zero_()
    assert torch.equal(symmetry_matrices("C2")[0], torch.eye(3, dtype=torch.float64))
