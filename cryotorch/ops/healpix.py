"""HEALPix sphere tessellation (NESTED scheme) and RELION's 3D orientation sampling.

HEALPix (Górski et al. 2005, ApJ 622:759) splits the sphere into 12 base faces, each into
``nside x nside`` equal-area pixels with ``nside = 2**order``. In the NESTED scheme a pixel
index is ``face * nside**2 + interleave(x, y)``: the bits of the in-face coordinates ``x``
and ``y`` alternate (x in the even bits), so that pixels ``4p .. 4p + 3`` at ``order + 1`` are
the four children of pixel ``p`` at ``order``. Angles are colatitude ``theta`` in ``[0, pi]``
and longitude ``phi`` in ``[0, 2 pi)``, in radians.

RELION's sampling (``src/healpix_sampling.cpp``)
    Directions are the NESTED pixel centres of ``Healpix_Base(order)``: ``rot = phi`` and
    ``tilt = acos(z)`` in degrees, with rot folded into ``[-180, 180]``. The in-plane angle
    uses ``6 * 2**order`` values ``psi = i * step`` with ``step = 360 / (6 * 2**order)``.
    Adaptive oversampling by ``k`` orders replaces a coarse ``(pixel, psi)`` by the
    ``4**k`` NESTED descendants of the pixel times ``2**k`` psi values centred in the coarse
    psi bin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryotorch.conventions import euler_deg_to_matrix
from cryotorch.ops.symmetry import canonical_symmetry_name
from cryotorch.ops.symmetry import symmetry_matrices as point_group_matrices

__all__ = [
    "OrientationGrid",
    "healpix_nside",
    "healpix_npix",
    "pix2ang_nest",
    "ang2pix_nest",
    "healpix_max_pixel_radius_rad",
    "angular_step_deg",
    "order_from_angular_step",
    "orientation_grid",
    "oversample_orientations",
    "rotation_angle_deg",
    "pairwise_rotation_angle_deg",
    "pairwise_matrix_angle_deg",
    "rowwise_matrix_angle_deg",
    "trace_angle_deg",
]

# Pixel indices are int64 and hold 2 * order + 4 bits.
_MAX_ORDER = 29

# Per base face: ring index of its southmost corner in units of nside (counted from the
# north pole) and longitude of that corner in units of pi / 4.
_FACE_RING = (2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4)
_FACE_PHI = (1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7)

# RELION's GUI labels are the sampling steps rounded down to one or two significant digits
# (3.75 -> "3.7", 0.234 -> "0.2"); 20 % slack maps each label to RELION's order.
_STEP_TOLERANCE = 0.2

# RELION only cleans the borders of the asymmetric unit for grids smaller than this.
_MAX_DIRECTIONS_FOR_SEAM_CLEANING = 4000


def _check_order(order: int) -> None:
    if not isinstance(order, int) or order < 0 or order > _MAX_ORDER:
        raise ValueError(f"healpix order must be an int in [0, {_MAX_ORDER}], got {order!r}")


def healpix_nside(order: int) -> int:
    """Number of pixels along a base-face edge: ``2**order``."""
    _check_order(order)
    return 1 << order


def healpix_npix(order: int) -> int:
    """Number of pixels on the sphere: ``12 * 4**order``."""
    _check_order(order)
    return 12 << (2 * order)


def _nest_to_face_xy(order: int, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NESTED indices → (face, x, y), all int64 of the shape of ``pixels``."""
    face = pixels >> (2 * order)
    x = torch.zeros_like(pixels)
    y = torch.zeros_like(pixels)
    for bit in range(order):
        x |= ((pixels >> (2 * bit)) & 1) << bit
        y |= ((pixels >> (2 * bit + 1)) & 1) << bit
    return face, x, y


def _face_xy_to_nest(order: int, face: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(face, x, y) → NESTED indices (int64)."""
    pixels = face << (2 * order)
    for bit in range(order):
        pixels = pixels | (((x >> bit) & 1) << (2 * bit)) | (((y >> bit) & 1) << (2 * bit + 1))
    return pixels


def _pix2z_phi_nest(order: int, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NESTED pixel centres → (z = cos theta, phi in radians), float64."""
    pixels = torch.as_tensor(pixels).long()
    if pixels.numel() and (int(pixels.min()) < 0 or int(pixels.max()) >= healpix_npix(order)):
        raise ValueError(f"pixel indices must lie in [0, {healpix_npix(order)}) at order {order}")
    nside = healpix_nside(order)
    face, x, y = _nest_to_face_xy(order, pixels)
    face_ring = torch.tensor(_FACE_RING, device=pixels.device)[face]
    face_phi = torch.tensor(_FACE_PHI, device=pixels.device)[face]

    ring = face_ring * nside - x - y - 1  # 1 .. 4 nside - 1, from the north pole
    north = ring < nside
    south = ring > 3 * nside
    # Pixels per quarter-ring: grows towards the equator in the caps, constant (nside) between.
    ring_pixels = torch.where(north, ring, torch.where(south, 4 * nside - ring, torch.full_like(ring, nside)))
    cap_z = 1.0 - ring_pixels.double() ** 2 / (3.0 * nside * nside)
    belt_z = (2 * nside - ring).double() * (2.0 / (3.0 * nside))
    z = torch.where(north, cap_z, torch.where(south, -cap_z, belt_z))
    # Alternate belt rings are offset by half a pixel in phi.
    shift = torch.where(north | south, torch.zeros_like(ring), (ring - nside) & 1)
    phi_index = (face_phi * ring_pixels + x - y + 1 + shift) // 2  # 1-based along the ring
    phi_index = torch.where(phi_index > 4 * nside, phi_index - 4 * nside, phi_index)
    phi_index = torch.where(phi_index < 1, phi_index + 4 * nside, phi_index)
    phi = (phi_index.double() - 0.5 * (shift + 1).double()) * (0.5 * math.pi / ring_pixels.double())
    return z, phi


def pix2ang_nest(order: int, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres of NESTED HEALPix pixels.

    Parameters
    ----------
    order
        HEALPix order (``nside = 2**order``).
    pixels
        ``(...)`` int64 NESTED indices in ``[0, 12 * 4**order)``.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``(theta, phi)``, each ``(...)`` float64 radians: colatitude in ``[0, pi]`` and
        longitude in ``[0, 2 pi)``.
    """
    z, phi = _pix2z_phi_nest(order, pixels)
    return torch.acos(z), phi


def ang2pix_nest(order: int, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """NESTED pixel containing each direction.

    Parameters
    ----------
    order
        HEALPix order.
    theta, phi
        ``(...)`` broadcastable colatitude in ``[0, pi]`` and longitude (any value; taken
        modulo ``2 pi``), in radians.

    Returns
    -------
    torch.Tensor
        ``(...)`` int64 NESTED pixel indices.
    """
    nside = healpix_nside(order)
    theta, phi = torch.broadcast_tensors(torch.as_tensor(theta).double(), torch.as_tensor(phi).double())
    z = torch.cos(theta)
    quarter = torch.remainder(phi, 2.0 * math.pi) / (0.5 * math.pi)
    # remainder() of a tiny negative phi rounds to exactly 2 pi; that is phi = 0.
    quarter = torch.where(quarter >= 4.0, torch.zeros_like(quarter), quarter)

    # Belt: the two families of face edges are straight lines in (phi, z); count them.
    t1 = nside * (0.5 + quarter)
    t2 = nside * z * 0.75
    ascending = torch.floor(t1 - t2).long()
    descending = torch.floor(t1 + t2).long()
    face_asc = ascending >> order
    face_desc = descending >> order
    belt_face = torch.where(
        face_asc == face_desc, face_asc | 4, torch.where(face_asc < face_desc, face_asc, face_desc + 8)
    )
    belt_x = descending & (nside - 1)
    belt_y = nside - (ascending & (nside - 1)) - 1

    # Caps: 1 - |z| from the half-angle formula keeps precision near the poles.
    one_minus_abs_z = 2.0 * torch.where(z >= 0, torch.sin(0.5 * theta), torch.cos(0.5 * theta)) ** 2
    quadrant = torch.clamp(torch.floor(quarter).long(), max=3)
    frac = quarter - quadrant.double()
    scale = nside * torch.sqrt(3.0 * one_minus_abs_z)
    cap_a = torch.clamp(torch.floor(frac * scale).long(), max=nside - 1)
    cap_b = torch.clamp(torch.floor((1.0 - frac) * scale).long(), max=nside - 1)
    north = z >= 0
    cap_face = torch.where(north, quadrant, quadrant + 8)
    cap_x = torch.where(north, nside - cap_b - 1, cap_a)
    cap_y = torch.where(north, nside - cap_a - 1, cap_b)

    belt = z.abs() <= 2.0 / 3.0
    face = torch.where(belt, belt_face, cap_face)
    x = torch.where(belt, belt_x, cap_x)
    y = torch.where(belt, belt_y, cap_y)
    return _face_xy_to_nest(order, face, x, y)


def healpix_max_pixel_radius_rad(order: int) -> float:
    """Largest centre-to-corner angle of any pixel (HEALPix ``max_pixrad``), in radians.

    Every point of the sphere lies within this angle of its pixel's centre.
    """
    nside = healpix_nside(order)
    # The extreme pixel spans the belt/cap boundary (z = 2/3) next to phi = 0.
    z_a, phi_a = 2.0 / 3.0, math.pi / (4 * nside)
    z_b = 1.0 - (1.0 - 1.0 / nside) ** 2 / 3.0
    s_a, s_b = math.sqrt(1.0 - z_a * z_a), math.sqrt(1.0 - z_b * z_b)
    cos_angle = s_a * s_b * math.cos(phi_a) + z_a * z_b
    return math.acos(min(1.0, cos_angle))


def angular_step_deg(order: int) -> float:
    """RELION's nominal angular sampling of an order: ``360 / (6 * 2**order)`` degrees."""
    return 360.0 / (6 * healpix_nside(order))


def order_from_angular_step(step_deg: float) -> int:
    """HEALPix order of a requested angular step.

    Returns the smallest order whose :func:`angular_step_deg` is at most ``step_deg``, with
    20 % slack so that RELION's GUI labels map as RELION maps them (30 → 1, 15 → 2,
    7.5 → 3, 3.7 → 4, 1.8 → 5, 0.9 → 6, 0.5 → 7, 0.2 → 8, 0.1 → 9).

    This is the order of the sampling itself. RELION's GUI runs ``relion_refine`` at this
    order minus the adaptive oversampling (GUI "7.5 degrees" = ``--healpix_order 2
    --oversampling 1``); the caller subtracts the oversampling.

    Parameters
    ----------
    step_deg
        Requested angular step in degrees, > 0.
    """
    if not step_deg > 0.0:
        raise ValueError(f"angular step must be positive, got {step_deg!r} degrees")
    order = 0
    while angular_step_deg(order) > step_deg * (1.0 + _STEP_TOLERANCE) and order < _MAX_ORDER:
        order += 1
    return order


@dataclass(frozen=True)
class OrientationGrid:
    """RELION's coarse orientation sampling at one HEALPix order, held as its directions.

    Orientation ``r = d * n_psi + p`` (direction-major) is direction ``d`` with psi sample
    ``p``. Its angles are computed when asked for (:meth:`euler_deg`), so that a grid holds
    its ``D`` directions, never its ``D · n_psi`` orientations (151 million at order 7).

    Attributes
    ----------
    rot_deg, tilt_deg
        ``(D,)`` float64 angles of the directions in degrees; rot in ``[-180, 180]``, tilt in
        ``[0, 180]``.
    pixels
        ``(D,)`` int64 NESTED HEALPix pixel of each direction (RELION's ``directions_ipix``);
        ``0 .. D - 1`` for ``C1``.
    order
        HEALPix order.
    symmetry
        Point group whose asymmetric unit the directions cover (canonical name).
    n_psi
        Number of psi samples: ``psi = p * angular_step_deg(order)``.
    """

    rot_deg: torch.Tensor
    tilt_deg: torch.Tensor
    pixels: torch.Tensor
    order: int
    symmetry: str
    n_psi: int

    @property
    def n_directions(self) -> int:
        """Number ``D`` of directions."""
        return self.pixels.shape[0]

    @property
    def n_orientations(self) -> int:
        """Number ``R = D · n_psi`` of orientations."""
        return self.n_directions * self.n_psi

    def direction_index(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n,)`` int64 direction ``d`` of the orientations ``rows`` ``(n,)`` (RELION's ``idir``)."""
        return rows // self.n_psi

    def pixel_index(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n,)`` int64 NESTED pixel of the orientations ``rows`` ``(n,)``; pass it to
        :func:`oversample_orientations`."""
        return self.pixels[rows // self.n_psi]

    def psi_index(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n,)`` int64 psi sample ``p`` of the orientations ``rows`` ``(n,)``."""
        return rows % self.n_psi

    def euler_deg(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n, 3)`` float64 ``(rot, tilt, psi)`` in degrees of the orientations ``rows``
        ``(n,)`` int64; psi in ``[0, 360)``."""
        direction = rows // self.n_psi
        psi = (rows % self.n_psi).double() * angular_step_deg(self.order)
        return torch.stack([self.rot_deg[direction], self.tilt_deg[direction], psi], dim=-1)


def _rot_tilt_deg(z: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RELION's (rot, tilt) of a HEALPix centre, rot folded into [-180, 180] (checkDirection)."""
    rot = phi * (180.0 / math.pi)
    rot = torch.where(rot > 180.0, rot - 360.0, rot)
    tilt = torch.acos(z) * (180.0 / math.pi)
    return rot, tilt


def _directions_from_rot_tilt(rot_deg: torch.Tensor, tilt_deg: torch.Tensor) -> torch.Tensor:
    """Unit viewing directions (RELION's Euler_angles2direction); (N, 3) float64."""
    rot, tilt = torch.deg2rad(rot_deg), torch.deg2rad(tilt_deg)
    return torch.stack([torch.sin(tilt) * torch.cos(rot), torch.sin(tilt) * torch.sin(rot), torch.cos(tilt)], -1)


# Plane normals bounding RELION's asymmetric units (removeSymmetryEquivalentPointsGeometric),
# kept as RELION's literals so that centres lying on a border fall on the same side. A
# direction is kept when sign * dot(direction, normal) >= 0 for every normal.
_I2_NORMALS = (
    (0.0, 1.0, 0.0),
    (-0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
    (0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
)
_AU_NORMALS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "T": ((-0.942809, 0.0, 0.0), (0.471405, 0.272165, 0.7698), (0.471404, 0.816497, 0.0)),
    "O": ((0.0, -1.0, 1.0), (1.0, 1.0, 0.0), (-1.0, 1.0, 0.0)),
    "I2": _I2_NORMALS,
    "I1": _I2_NORMALS,
    "I3": _I2_NORMALS,
    "I4": (
        (0.0, 0.0, 1.0),
        (0.187592467856686, -0.303530987314591, -0.491123477863004),
        (0.187592467856686, 0.303530987314591, -0.491123477863004),
    ),
}
# RELION turns the I1/I3/I4 normals by Euler_angles2matrix(0, tilt, 0) before use.
_AU_NORMALS_TILT_DEG = {"I1": 90.0, "I3": 31.7174745559, "I4": -31.7174745559}


def _geometric_asymmetric_unit(canonical: str, rot: torch.Tensor, tilt: torch.Tensor) -> torch.Tensor:
    """RELION's first, purely geometric, asymmetric-unit selection; (N,) bool."""
    kind, rest = canonical[0], canonical[1:]
    if kind == "C" and rest.isdigit():
        half_width = 180.0 / int(rest)
        return (rot >= -half_width) & (rot <= half_width)
    if kind == "D" and rest.isdigit():
        n = int(rest)
        if n == 1:
            return tilt <= 90.0
        return (rot >= 90.0 - 180.0 / n) & (rot <= 90.0 + 180.0 / n) & (tilt <= 90.0)

    normals = torch.tensor(_AU_NORMALS[canonical], dtype=torch.float64, device=rot.device)
    normals = normals / normals.norm(dim=-1, keepdim=True)
    if canonical in _AU_NORMALS_TILT_DEG:
        euler = torch.tensor([0.0, _AU_NORMALS_TILT_DEG[canonical], 0.0], dtype=torch.float64, device=rot.device)
        normals = normals @ euler_deg_to_matrix(euler).T  # each row becomes A @ normal
    sign = -1.0 if canonical == "I4" else 1.0
    dots = _directions_from_rot_tilt(rot, tilt) @ normals.T  # (N, 3)
    keep = (sign * dots >= 0).all(dim=-1)
    # RELION's exact-equality tests on rot are reproduced as written.
    if canonical == "T":
        keep &= ((rot >= 90.0) & (rot <= 150.0)) | (rot == 0.0)
    elif canonical == "O":
        keep &= ((rot >= 45.0) & (rot <= 135.0) & (tilt <= 90.0)) | (rot == 0.0)
    return keep


def _remove_seam_duplicates(
    directions: torch.Tensor, matrices: torch.Tensor, max_angle_rad: float
) -> torch.Tensor:
    """Greedy removal of directions symmetry-equivalent (within an angle) to earlier kept ones.

    Parameters
    ----------
    directions
        ``(N, 3)`` unit vectors in grid order.
    matrices
        ``(G, 3, 3)`` RELION symmetry matrices ``R``; direction ``d`` is equivalent to ``R^T d``.

    Returns
    -------
    torch.Tensor
        ``(N,)`` bool mask of kept directions.
    """
    cos_max = math.cos(max_angle_rad)
    n = directions.shape[0]
    close = torch.zeros(n, n, dtype=torch.bool, device=directions.device)
    for matrix in matrices:
        # (R^T d_k) . d_i = (d_k^T R) . d_i
        close |= (directions @ matrix) @ directions.T > cos_max
    kept = torch.zeros(n, dtype=torch.bool, device=directions.device)
    for i in range(n):
        kept[i] = not bool((close[:, i] & kept).any())
    return kept


def orientation_grid(
    order: int, symmetry: str = "C1", device: torch.device | str | None = None
) -> OrientationGrid:
    """RELION's (non-oversampled) 3D orientation sampling at a HEALPix order.

    Directions are the NESTED pixel centres in pixel order (``rot = phi``, ``tilt = theta``
    in degrees); psi takes ``6 * 2**order`` values ``0, step, 2 step, ...`` with
    ``step = angular_step_deg(order)``. For a symmetry other than ``C1`` only directions in
    RELION's asymmetric unit are kept, as ``HealpixSampling::removeSymmetryEquivalentPoints``
    does: a geometric cut, then (for fewer than 4000 remaining directions) removal of
    directions within half HEALPix's ``max_pixrad`` of a symmetry mate of an earlier kept
    one. ``--limit_tilt`` is not applied; RELION's random perturbation is applied per
    iteration by :func:`cryotorch.em.sampling.perturb_pose_grid`.

    Parameters
    ----------
    order
        HEALPix order of the sampling (RELION's ``--healpix_order``).
    symmetry
        Point group name accepted by :func:`cryotorch.ops.symmetry.symmetry_matrices`.
    device
        Device of the returned tensors.

    Returns
    -------
    OrientationGrid
        ``R = n_directions * n_psi`` orientations, direction-major, held as their
        directions.
    """
    canonical = canonical_symmetry_name(symmetry)
    pixels = torch.arange(healpix_npix(order), dtype=torch.int64)
    rot, tilt = _rot_tilt_deg(*_pix2z_phi_nest(order, pixels))

    if canonical != "C1":
        keep = _geometric_asymmetric_unit(canonical, rot, tilt)
        pixels, rot, tilt = pixels[keep], rot[keep], tilt[keep]
        if pixels.numel() < _MAX_DIRECTIONS_FOR_SEAM_CLEANING:
            keep = _remove_seam_duplicates(
                _directions_from_rot_tilt(rot, tilt),
                point_group_matrices(canonical),
                0.5 * healpix_max_pixel_radius_rad(order),
            )
            pixels, rot, tilt = pixels[keep], rot[keep], tilt[keep]

    return OrientationGrid(
        rot_deg=rot.to(device),
        tilt_deg=tilt.to(device),
        pixels=pixels.to(device),
        order=order,
        symmetry=canonical,
        n_psi=6 * healpix_nside(order),
    )


def oversample_orientations(
    order: int, pixel_index: torch.Tensor, psi_index: torch.Tensor, oversampling: int = 1
) -> torch.Tensor:
    """Fine orientations of coarse samples, as RELION's adaptive oversampling builds them.

    For each coarse ``(pixel, psi)`` at ``order``: the ``4**oversampling`` NESTED descendant
    pixels at ``order + oversampling`` (RELION's loop order: in-face y outer, x inner) times
    ``2**oversampling`` psi values ``psi - step / 2 + (k + 1/2) * step / 2**oversampling``
    (``step`` the coarse psi step; not wrapped, so they may fall below 0).

    Parameters
    ----------
    order
        Coarse HEALPix order.
    pixel_index
        ``(n,)`` int64 coarse NESTED pixels (:meth:`OrientationGrid.pixel_index`).
    psi_index
        ``(n,)`` int64 coarse psi samples (:meth:`OrientationGrid.psi_index`).
    oversampling
        Number of extra orders, ≥ 0.

    Returns
    -------
    torch.Tensor
        ``(n, 4**oversampling * 2**oversampling, 3)`` float64 ``(rot, tilt, psi)`` degrees,
        pixel-major then psi, on the device of ``pixel_index``.
    """
    if oversampling < 0:
        raise ValueError(f"oversampling must be >= 0, got {oversampling}")
    fine_order = order + oversampling
    _check_order(fine_order)
    pixel_index = torch.as_tensor(pixel_index).long()
    psi_index = torch.as_tensor(psi_index, device=pixel_index.device).long()
    device = pixel_index.device
    factor = 1 << oversampling

    face, x, y = _nest_to_face_xy(order, pixel_index)
    offset_y, offset_x = torch.meshgrid(
        torch.arange(factor, device=device), torch.arange(factor, device=device), indexing="ij"
    )
    fine_x = factor * x[:, None] + offset_x.reshape(1, -1)  # (n, factor**2)
    fine_y = factor * y[:, None] + offset_y.reshape(1, -1)
    fine_pixels = _face_xy_to_nest(fine_order, face[:, None].expand_as(fine_x), fine_x, fine_y)
    rot, tilt = _rot_tilt_deg(*_pix2z_phi_nest(fine_order, fine_pixels))  # (n, factor**2)

    step = angular_step_deg(order)
    sub = (torch.arange(factor, device=device, dtype=torch.float64) + 0.5) * (step / factor) - 0.5 * step
    psi = psi_index.double()[:, None] * step + sub[None, :]  # (n, factor)

    n, n_pix, n_sub = pixel_index.shape[0], factor * factor, factor
    euler_deg = torch.stack(
        [
            rot[:, :, None].expand(n, n_pix, n_sub),
            tilt[:, :, None].expand(n, n_pix, n_sub),
            psi[:, None, :].expand(n, n_pix, n_sub),
        ],
        dim=-1,
    )
    return euler_deg.reshape(n, n_pix * n_sub, 3)


def rotation_angle_deg(euler_a_deg: torch.Tensor, euler_b_deg: torch.Tensor, symmetry_matrices: torch.Tensor | None = None) -> torch.Tensor:
    """Angle of the rotation taking pose ``b`` to pose ``a``.

    Equals ``arccos((trace(A B^T) - 1) / 2)``, evaluated as ``atan2`` of the sine (from the
    antisymmetric part) and cosine so that it stays accurate near 0 and 180 degrees.

    Parameters
    ----------
    euler_a_deg, euler_b_deg
        ``(..., 3)`` broadcastable ``(rot, tilt, psi)`` in degrees.
    symmetry_matrices
        Optional ``(G, 3, 3)`` RELION symmetry matrices ``L`` (identity included): the angle
        is then to the nearest equivalent pose ``B·L``, as RELION measures changes of
        orientations.

    Returns
    -------
    torch.Tensor
        ``(...)`` angles in degrees, in ``[0, 180]``.
    """
    a = euler_deg_to_matrix(euler_a_deg.double())
    b = euler_deg_to_matrix(euler_b_deg.double())
    if symmetry_matrices is None:
        symmetry_matrices = torch.eye(3, dtype=torch.float64, device=b.device)[None]
    angles = []
    for mate in symmetry_matrices.to(b):
        relative = a @ (b @ mate).transpose(-1, -2)  # (..., 3, 3)
        cos_2x = relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0
        antisym = torch.stack(
            [
                relative[..., 2, 1] - relative[..., 1, 2],
                relative[..., 0, 2] - relative[..., 2, 0],
                relative[..., 1, 0] - relative[..., 0, 1],
            ],
            dim=-1,
        )
        angles.append(torch.rad2deg(torch.atan2(antisym.norm(dim=-1), cos_2x)))
    return torch.stack(angles).amin(0)


def pairwise_rotation_angle_deg(
    euler_a_deg: torch.Tensor, euler_b_deg: torch.Tensor, symmetry_matrices: torch.Tensor | None = None
) -> torch.Tensor:
    """Angles of the rotations between every pose of ``a`` and every pose of ``b``.

    ``arccos((trace(A B^T) - 1) / 2)`` with the traces of all pairs as float64 matrix products
    of the flattened matrices: the local searches' priors over whole orientation grids. Within
    about 1e-6 degrees of :func:`rotation_angle_deg` (arccos loses digits near 0 and 180
    degrees, which float64 leaves far below any sampling step).

    Parameters
    ----------
    euler_a_deg
        ``(A, 3)`` ``(rot, tilt, psi)`` in degrees.
    euler_b_deg
        ``(B, 3)`` ``(rot, tilt, psi)`` in degrees.
    symmetry_matrices
        Optional ``(G, 3, 3)`` RELION symmetry matrices ``L`` (identity included): a pose ``B``
        then stands for all its equivalent poses ``B·L``, and the angle is to the nearest of
        them (``trace(A (B L)^T) = <A L^T, B>_F``, one product per matrix).

    Returns
    -------
    torch.Tensor
        ``(A, B)`` float64 angles in degrees, in ``[0, 180]``.
    """
    return pairwise_matrix_angle_deg(euler_deg_to_matrix(euler_a_deg.double()), euler_deg_to_matrix(euler_b_deg.double()), symmetry_matrices)


def pairwise_matrix_angle_deg(a: torch.Tensor, b: torch.Tensor, symmetry_matrices: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`pairwise_rotation_angle_deg` of rotation matrices: ``a`` ``(A, 3, 3)`` and ``b``
    ``(B, 3, 3)`` float64 RELION matrices (of a grid converted once, rather than on every
    call); ``(A, B)`` float64 angles in degrees."""
    b = b.reshape(-1, 9)
    trace = None
    for mate in _mates(symmetry_matrices, b):
        mate_trace = (a @ mate.T).reshape(-1, 9) @ b.T  # (A, B)
        trace = mate_trace if trace is None else torch.maximum(trace, mate_trace, out=trace)
    assert trace is not None
    return trace_angle_deg(trace)


def rowwise_matrix_angle_deg(poses: torch.Tensor, matrices: torch.Tensor, symmetry_matrices: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`pairwise_matrix_angle_deg` of each row's own matrices: ``(b, ...)`` angles
    (degrees) from pose ``poses[i]`` ``(b, 3, 3)`` to the matrices ``matrices[i]``
    ``(b, ..., 3, 3)`` (float64), to the nearest symmetry mate."""
    b = poses.shape[0]
    flat = matrices.reshape(b, -1, 9)
    mates = (poses[:, None] @ _mates(symmetry_matrices, poses).transpose(-1, -2)).reshape(b, -1, 9)  # (b, G, 9): A·Lᵀ
    trace = (flat @ mates.transpose(-1, -2)).amax(-1)  # (b, m)
    return trace_angle_deg(trace).view(matrices.shape[:-2])


def trace_angle_deg(trace: torch.Tensor) -> torch.Tensor:
    """Angles (degrees) of rotations ``R`` from their traces, ``arccos((trace(R) − 1)/2)``,
    in place of ``trace`` (the traces of ``A Bᵀ`` give the angle between A and B)."""
    return torch.rad2deg(torch.arccos(((trace - 1.0) * 0.5).clamp_(-1.0, 1.0)))


def _mates(symmetry_matrices: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``(G, 3, 3)`` the symmetry matrices in the dtype and on the device of ``like``; the
    identity alone for None."""
    if symmetry_matrices is None:
        return torch.eye(3, dtype=like.dtype, device=like.device)[None]
    return symmetry_matrices.to(like)
