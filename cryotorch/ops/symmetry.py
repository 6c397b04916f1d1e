"""Point-group symmetry operators in RELION's convention.

RELION (``SymList`` in ``src/symmetries.cpp``) describes each point group by a few generating
rotation axes, e.g. ``D7`` = a 7-fold about z plus a 2-fold about x. For an ``n``-fold axis
``u`` it stores the matrices ``R_j = rot(u, j * 360 / n)^T`` for ``j = 1 .. n - 1`` (``rot``
is the right-handed, active rotation), then closes the set under multiplication, appending
each new product in a fixed scan order. :func:`symmetry_matrices` reproduces that list and
its order, with the identity prepended as RELION's samplers do (``R_repository``).

Meaning of ``R``
    With ``A`` a RELION pose matrix (:func:`cryotorch.conventions.euler_deg_to_matrix`), the
    poses ``A`` and ``A @ R`` give identical projections of a symmetric reference (RELION's
    ``Euler_apply_transf(L=I, R, ...)``, used by ``relion_particle_symmetry_expand``). The
    viewing direction ``d = A[2]`` then maps to ``R^T d``.

Supported names (case-insensitive): ``Cn``, ``Dn`` (n ≥ 1), ``T``, ``O``, ``I`` (= ``I2``),
``I1``, ``I2``, ``I3``, ``I4``. Groups with mirrors or inversion (``Ci``, ``Cs``, ``Cnv``,
``Cnh``, ``Dnh``, ``Sn``, ...) cannot be applied to a chiral reference and are rejected.
"""

from __future__ import annotations

import functools
import math
import re

import torch

__all__ = ["canonical_symmetry_name", "symmetry_generators", "symmetry_matrices", "symmetry_order"]

# RELION compares matrices and zeroes small entries with XMIPP_EQUAL_ACCURACY (double build).
_EQUAL_ACCURACY = 1e-6

_PHI = (1.0 + math.sqrt(5.0)) / 2.0
_INV_SQRT3 = 1.0 / math.sqrt(3.0)
_INV_NORM_1_PHI = 1.0 / math.sqrt(1.0 + _PHI**2)

# RELION writes these axes as decimal literals with 6-16 significant digits; the exact values
# below agree with its literals to that precision, so that the group closes to 1e-12.
_GENERATORS: dict[str, tuple[tuple[int, tuple[float, float, float]], ...]] = {
    "T": (
        (3, (0.0, 0.0, 1.0)),
        (2, (0.0, math.sqrt(2.0 / 3.0), _INV_SQRT3)),
    ),
    "O": (
        (3, (_INV_SQRT3, _INV_SQRT3, _INV_SQRT3)),
        (4, (0.0, 0.0, 1.0)),
    ),
    "I2": (
        (2, (0.0, 0.0, 1.0)),
        (5, (_INV_NORM_1_PHI, 0.0, _PHI * _INV_NORM_1_PHI)),
        (3, (0.0, _INV_SQRT3 / _PHI, _INV_SQRT3 * _PHI)),
    ),
    "I1": (
        (2, (1.0, 0.0, 0.0)),
        (5, (_PHI * _INV_NORM_1_PHI, 0.0, -_INV_NORM_1_PHI)),
        (3, (_INV_SQRT3 * _PHI, _INV_SQRT3 / _PHI, 0.0)),
    ),
    # I3 and I4 are I2 turned about y by -/+ atan(1 / phi) (a 5-fold onto z for I3).
    "I3": (
        (2, (-_INV_NORM_1_PHI, 0.0, _PHI * _INV_NORM_1_PHI)),
        (5, (0.0, 0.0, 1.0)),
        (3, (-_PHI * _INV_SQRT3 * _INV_NORM_1_PHI, _INV_SQRT3 / _PHI, _PHI**2 * _INV_SQRT3 * _INV_NORM_1_PHI)),
    ),
    "I4": (
        (2, (_INV_NORM_1_PHI, 0.0, _PHI * _INV_NORM_1_PHI)),
        (5, (2.0 / math.sqrt(5.0), 0.0, 1.0 / math.sqrt(5.0))),
        (3, (_PHI * _INV_SQRT3 * _INV_NORM_1_PHI, _INV_SQRT3 / _PHI, _PHI**2 * _INV_SQRT3 * _INV_NORM_1_PHI)),
    ),
}

_NAME_PATTERN = re.compile(r"^(?:([CD])(\d+)|(T|O|I[1-4]?))$")


def canonical_symmetry_name(name: str) -> str:
    """RELION-style group name, validated and upper-cased (``"i"`` → ``"I2"``, ``"c04"`` → ``"C4"``).

    Raises
    ------
    ValueError
        If ``name`` is not a supported point group.
    """
    if not isinstance(name, str):
        raise ValueError(f"symmetry name must be a string, got {name!r}")
    upper = name.strip().upper()
    match = _NAME_PATTERN.match(upper)
    if match is None or (match.group(2) is not None and int(match.group(2)) < 1):
        raise ValueError(
            f"unsupported symmetry {name!r}: expected Cn or Dn (n >= 1), T, O, I or I1-I4"
        )
    if match.group(1) is not None:
        return f"{match.group(1)}{int(match.group(2))}"
    return "I2" if upper == "I" else upper


def symmetry_generators(name: str) -> tuple[tuple[int, tuple[float, float, float]], ...]:
    """RELION's generating axes of a point group.

    Parameters
    ----------
    name
        Group name, case-insensitive (``"c4"``, ``"D7"``, ``"I"``).

    Returns
    -------
    tuple
        ``((fold, (x, y, z)), ...)`` in RELION's order; axes are unit vectors. ``C1`` has none.
    """
    canonical = canonical_symmetry_name(name)
    kind = canonical[0]
    if kind in "CD" and canonical[1:].isdigit():
        fold = int(canonical[1:])
        z_axis = ((fold, (0.0, 0.0, 1.0)),) if fold > 1 else ()
        # RELION's Dn adds the 2-fold about x after the n-fold about z.
        return z_axis + (((2, (1.0, 0.0, 0.0)),) if kind == "D" else ())
    normalised = []
    for fold, axis in _GENERATORS[canonical]:
        norm = math.sqrt(sum(c * c for c in axis))
        normalised.append((fold, (axis[0] / norm, axis[1] / norm, axis[2] / norm)))
    return tuple(normalised)


def _axis_angle_matrix(axis: tuple[float, float, float], angle_deg: float) -> torch.Tensor:
    """Right-handed (active) rotation by ``angle_deg`` about the unit ``axis``; (3, 3) float64."""
    u = torch.tensor(axis, dtype=torch.float64)
    angle = math.radians(angle_deg)
    cross = torch.tensor(
        [[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]], dtype=torch.float64
    )
    return (
        math.cos(angle) * torch.eye(3, dtype=torch.float64)
        + math.sin(angle) * cross
        + (1.0 - math.cos(angle)) * torch.outer(u, u)
    )


def _zero_small(matrix: torch.Tensor) -> torch.Tensor:
    return torch.where(matrix.abs() < _EQUAL_ACCURACY, torch.zeros_like(matrix), matrix)


@functools.lru_cache(maxsize=64)
def _symmetry_matrices_cpu(canonical: str) -> torch.Tensor:
    elements: list[torch.Tensor] = []
    for fold, axis in symmetry_generators(canonical):
        for j in range(1, fold):
            # RELION stores the transpose of rotation3DMatrix(+j * 360 / fold, axis).
            elements.append(_zero_small(_axis_angle_matrix(axis, j * 360.0 / fold).T))

    # Closure in RELION's scan order (SymList::compute_subgroup): pairs (i, j) are visited
    # shell by shell, shell n being (0, n), (1, n), ..., (n, n), (n, n - 1), ..., (n, 0);
    # a product not yet listed (and not the identity) is appended and opens a new shell.
    identity = torch.eye(3, dtype=torch.float64)
    known = torch.stack([identity, *elements])  # (1 + len(elements), 3, 3)
    shell = 0
    while shell < len(elements):
        pairs = [(i, shell) for i in range(shell + 1)] + [(shell, j) for j in range(shell - 1, -1, -1)]
        for i, j in pairs:
            product = elements[i] @ elements[j]
            if bool(((known - product).abs().amax(dim=(-2, -1)) <= _EQUAL_ACCURACY).any()):
                continue
            elements.append(_zero_small(product))
            known = torch.cat([known, elements[-1][None]])
        shell += 1
    return known  # (G, 3, 3), identity first


def symmetry_matrices(
    name: str, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """All rotations of a point group, in RELION's order, identity first.

    Parameters
    ----------
    name
        Group name, case-insensitive: ``Cn``, ``Dn`` (n ≥ 1), ``T``, ``O``, ``I`` (RELION's
        default setting ``I2``), ``I1`` .. ``I4``.
    device, dtype
        Placement of the result.

    Returns
    -------
    torch.Tensor
        ``(G, 3, 3)`` matrices ``R`` such that poses ``A`` and ``A @ R`` are equivalent
        (see the module docstring). ``G`` is the group order.

    Raises
    ------
    ValueError
        For names that are not supported point groups (``"C0"``, ``"X3"``, ``"C2v"``).
    """
    matrices = _symmetry_matrices_cpu(canonical_symmetry_name(name))
    return matrices.to(device=device, dtype=dtype, copy=True)  # never hand out the cached tensor


def symmetry_order(name: str) -> int:
    """Number of rotations ``G`` in the point group ``name`` (``C4`` → 4, ``I`` → 60)."""
    canonical = canonical_symmetry_name(name)
    kind, rest = canonical[0], canonical[1:]
    if kind == "C" and rest.isdigit():
        return int(rest)
    if kind == "D" and rest.isdigit():
        return 2 * int(rest)
    return {"T": 12, "O": 24}.get(canonical, 60)
