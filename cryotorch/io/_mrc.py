"""MRC maps and image stacks: reading (any axis order, modes 0/1/2/6/12) and atomic writing.

Arrays are always returned in the standard order ``[z, y, x]`` (volumes) or ``[image, y, x]``
(stacks); vectors such as voxel sizes and origins are ordered ``(x, y, z)``, in Å.
"""

from __future__ import annotations

import os
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import torch
from mrcfile.mrcinterpreter import MrcInterpreter

from cryotorch.errors import InputError
from cryotorch.io._atomic import atomic_output_path, temporary_sibling_path

__all__ = [
    "MrcVolume",
    "read_mrc",
    "write_mrc",
    "ImageStack",
    "MrcStackWriter",
    "MrcHeaderSummary",
    "read_mrc_header_summary",
]

# Bytes per value of the MRC modes cryo-EM programs write (RELION writes 12 = float16).
_BYTES_PER_VALUE = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}


@dataclass
class MrcVolume:
    """A map read from an MRC file.

    Attributes
    ----------
    data
        ``(z, y, x)`` float32 voxels (``(1, y, x)`` for a single image), standard axis order.
    voxel_size_angstrom
        ``(x, y, z)`` voxel size in Å (0 where the header says 0).
    origin_angstrom
        ``(x, y, z)`` position of voxel ``[0, 0, 0]`` in Å: the header origin when it is
        non-zero, else ``nxstart/nystart/nzstart`` times the voxel size.
    """

    data: np.ndarray
    voxel_size_angstrom: tuple[float, float, float]
    origin_angstrom: tuple[float, float, float]


def _open_mrc(path: Path, *, header_only: bool = False, mmap: bool = False) -> MrcInterpreter:
    """Open an MRC file read-only, turning every failure into an :class:`InputError`.

    Permissive mode lets slightly non-conforming headers (missing ``MAP`` stamp, unknown
    machine stamp, as in some EMDB and ASPIRE files) through; real damage (truncation,
    unknown mode) leaves ``data`` empty, which is reported here with mrcfile's explanation.
    """
    if not path.is_file():
        raise InputError(f"MRC file {path} does not exist; check the path")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if mmap:
                mrc = mrcfile.mmap(path, mode="r", permissive=True)
            else:
                mrc = mrcfile.open(path, mode="r", permissive=True, header_only=header_only)
        except (ValueError, OSError, EOFError) as error:
            raise InputError(f"cannot read MRC file {path}: {error}; check that it is an intact MRC file") from error
    if not header_only and mrc.data is None:
        mrc.close()
        reasons = "; ".join(str(warning.message) for warning in caught) or "no data block"
        raise InputError(
            f"cannot read the data of MRC file {path}: {reasons}; the file is probably truncated or "
            "not an MRC file — re-export or re-copy it"
        )
    mode = int(mrc.header.mode)
    if mode not in _BYTES_PER_VALUE:
        mrc.close()
        raise InputError(f"MRC file {path} has mode {mode}; supported modes are 0, 1, 2, 6 and 12 — convert it to mode 2")
    return mrc


def _axis_permutation(header: np.recarray) -> tuple[int, int, int]:
    """Transpose that takes stored ``(section, row, column)`` data to ``(z, y, x)``."""
    stored_axes = [int(header.maps), int(header.mapr), int(header.mapc)]  # 1 = x, 2 = y, 3 = z
    if sorted(stored_axes) != [1, 2, 3]:
        # Headers written without axis fields (all 0) mean the standard order.
        stored_axes = [3, 2, 1]
    return tuple(stored_axes.index(axis) for axis in (3, 2, 1))  # type: ignore[return-value]


def _voxel_size_xyz(mrc: MrcInterpreter) -> tuple[float, float, float]:
    voxel = mrc.voxel_size
    return float(voxel.x), float(voxel.y), float(voxel.z)


def _origin_xyz(header: np.recarray, voxel_size: tuple[float, float, float]) -> tuple[float, float, float]:
    origin = (float(header.origin.x), float(header.origin.y), float(header.origin.z))
    if any(origin):
        return origin
    # nxstart/nystart/nzstart count columns, rows and sections; map them onto x, y, z.
    starts_by_axis = {
        int(header.mapc): int(header.nxstart),
        int(header.mapr): int(header.nystart),
        int(header.maps): int(header.nzstart),
    }
    return tuple(starts_by_axis.get(axis, 0) * size for axis, size in zip((1, 2, 3), voxel_size))  # type: ignore[return-value]


def read_mrc(path: str | os.PathLike[str]) -> MrcVolume:
    """Read a whole MRC map (or image) into memory.

    Parameters
    ----------
    path
        ``.mrc``/``.map``/``.mrcs`` file, mode 0, 1, 2, 6 or 12, any axis order.

    Returns
    -------
    MrcVolume
        float32 ``(z, y, x)`` data in standard axis order, voxel size and origin in Å.

    Raises
    ------
    InputError
        The file is missing, truncated or not MRC, or a voxel is NaN or infinite.
    """
    path = Path(path)
    with _open_mrc(path) as mrc:
        data = np.asarray(mrc.data)
        if data.ndim == 2:
            data = data[None]  # (1, y, x)
        data = np.ascontiguousarray(data.transpose(_axis_permutation(mrc.header)), dtype=np.float32)
        voxel_size = _voxel_size_xyz(mrc)
        origin = _origin_xyz(mrc.header, voxel_size)
    bad = ~np.isfinite(data)
    if bad.any():
        z, y, x = (int(i) for i in np.argwhere(bad)[0])
        raise InputError(
            f"{path}: {int(bad.sum())} of {data.size} voxels are NaN or infinite (the first at x, y, z = {x}, {y}, {z}); "
            "fix the map or write it again without them"
        )
    return MrcVolume(data=data, voxel_size_angstrom=voxel_size, origin_angstrom=origin)


def write_mrc(
    path: str | os.PathLike[str],
    data: np.ndarray | torch.Tensor,
    voxel_size_angstrom: float,
    origin_angstrom: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> None:
    """Write a 2D image or 3D volume as a mode-2 (float32) MRC file, atomically.

    Parameters
    ----------
    path
        Destination file.
    data
        ``(y, x)`` image or ``(z, y, x)`` volume.
    voxel_size_angstrom
        Isotropic voxel size in Å.
    origin_angstrom
        ``(x, y, z)`` position of voxel ``[0, 0, 0]`` in Å (header ``origin`` field).
    """
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    array = np.ascontiguousarray(data, dtype=np.float32)
    if array.ndim not in (2, 3):
        raise ValueError(f"write_mrc takes a 2D image or a 3D volume, got shape {array.shape}")
    with atomic_output_path(path) as temp_path:
        with mrcfile.new(temp_path, overwrite=True) as mrc:
            mrc.set_data(array)
            mrc.voxel_size = voxel_size_angstrom
            mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = origin_angstrom


class ImageStack:
    """Read-only memory-mapped MRC stack of square images.

    A 3D file holds ``nz`` images whatever its space group says (RELION writes stacks with
    ``ispg`` 0 or 1); a 2D file holds one image.

    Parameters
    ----------
    path
        ``.mrcs`` or ``.mrc`` file, mode 0, 1, 2, 6 or 12, standard axis order.

    Attributes
    ----------
    n_images
        Number of images in the stack.
    box_size_px
        Image side length in pixels.
    pixel_size_angstrom
        Pixel size from the header in Å (0 if the header says 0).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._mrc = _open_mrc(self.path, mmap=True)
        header = self._mrc.header
        if _axis_permutation(header) != (0, 1, 2):
            order = f"{int(header.mapc)}/{int(header.mapr)}/{int(header.maps)}"
            self.close()
            raise InputError(f"image stack {self.path} stores its axes in the order mapc/mapr/maps = {order}; rewrite it in the standard order 1/2/3")
        data = self._mrc.data
        self._images = data[None] if data.ndim == 2 else data  # (n, y, x)
        self.n_images = int(self._images.shape[0])
        height, width = self._images.shape[1:]
        if height != width:
            self.close()
            raise InputError(f"image stack {self.path} has non-square {width}x{height} images; crop or re-extract them square")
        self.box_size_px = int(width)
        self.pixel_size_angstrom = _voxel_size_xyz(self._mrc)[0]

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Read images by 0-based index.

        Parameters
        ----------
        indices
            ``(B,)`` integer image indices within the stack.

        Returns
        -------
        numpy.ndarray
            ``(B, N, N)`` float32 images in the order of ``indices``.
        """
        indices = np.asarray(indices, dtype=np.int64)
        outside = (indices < 0) | (indices >= self.n_images)
        if outside.any():
            index = int(indices[outside][0])
            raise InputError(
                f"image index {index + 1} (1-based) is past the end of {self.path}, which holds "
                f"{self.n_images} images; fix the image reference or re-extract the stack"
            )
        return np.asarray(self._images[indices], dtype=np.float32)

    def close(self) -> None:
        """Release the memory map and file handle."""
        self._mrc.close()

    def __enter__(self) -> ImageStack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class MrcStackWriter:
    """Write a large mode-2 image stack chunk by chunk, publishing it only when complete.

    Images go into a memory-mapped temporary file beside ``path``; a clean exit from the
    ``with`` block fills in the header statistics and renames it onto ``path``. An exception
    (or images never written) leaves no file behind.

    Parameters
    ----------
    path
        Destination ``.mrcs`` file.
    n_images
        Number of images in the stack.
    box_size_px
        Image side length in pixels.
    pixel_size_angstrom
        Pixel size written to the header in Å.
    """

    def __init__(
        self, path: str | os.PathLike[str], n_images: int, box_size_px: int, pixel_size_angstrom: float
    ) -> None:
        self.path = Path(path)
        self.n_images = n_images
        self.box_size_px = box_size_px
        self.pixel_size_angstrom = pixel_size_angstrom
        self._written = np.zeros(n_images, dtype=bool)
        self._temp_path = temporary_sibling_path(self.path)
        self._mrc: MrcInterpreter | None = None

    def __enter__(self) -> MrcStackWriter:
        self._mrc = mrcfile.new_mmap(
            self._temp_path, shape=(self.n_images, self.box_size_px, self.box_size_px), mrc_mode=2, overwrite=True
        )
        self._mrc.set_image_stack()
        self._mrc.voxel_size = self.pixel_size_angstrom
        return self

    def write(self, start: int, images: np.ndarray) -> None:
        """Store ``images`` (``(B, N, N)``) at stack positions ``start … start + B - 1`` (0-based)."""
        if self._mrc is None:
            raise RuntimeError("MrcStackWriter.write must be called inside its `with` block")
        images = np.asarray(images, dtype=np.float32)
        stop = start + images.shape[0]
        if start < 0 or stop > self.n_images or images.shape[1:] != (self.box_size_px, self.box_size_px):
            raise ValueError(
                f"images of shape {images.shape} at {start} do not fit a stack of {self.n_images} "
                f"images of {self.box_size_px}x{self.box_size_px} px"
            )
        self._mrc.data[start:stop] = images
        self._written[start:stop] = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        assert self._mrc is not None
        complete = exc_type is None and bool(self._written.all())
        if complete:
            self._mrc.update_header_stats()
        self._mrc.close()
        self._mrc = None
        if complete:
            os.replace(self._temp_path, self.path)
            return
        self._temp_path.unlink(missing_ok=True)
        if exc_type is None:
            missing = int((~self._written).sum())
            raise ValueError(
                f"{missing} of {self.n_images} images of {self.path} were never written; the file was not created"
            )


@dataclass
class MrcHeaderSummary:
    """What :func:`validate_particle_images` needs from a stack header, read without mapping data.

    Attributes
    ----------
    n_images, width_px, height_px
        Stack dimensions (a 2D file holds one image).
    pixel_size_angstrom
        Header pixel size in Å along x (0 if unset).
    expected_file_bytes, actual_file_bytes
        Size the header implies (header + extended header + data) and size on disk.
    """

    n_images: int
    width_px: int
    height_px: int
    pixel_size_angstrom: float
    expected_file_bytes: int
    actual_file_bytes: int


def read_mrc_header_summary(path: str | os.PathLike[str]) -> MrcHeaderSummary:
    """Read the dimensions, pixel size and implied file size of an MRC stack from its header.

    Raises
    ------
    InputError
        If the file is missing, not an MRC file, or in an unsupported mode.
    """
    path = Path(path)
    with _open_mrc(path, header_only=True) as mrc:
        header = mrc.header
        width, height, depth = int(header.nx), int(header.ny), int(header.nz)
        expected = 1024 + int(header.nsymbt) + width * height * depth * _BYTES_PER_VALUE[int(header.mode)]
        pixel_size = _voxel_size_xyz(mrc)[0]
    return MrcHeaderSummary(
        n_images=depth,
        width_px=width,
        height_px=height,
        pixel_size_angstrom=pixel_size,
        expected_file_bytes=expected,
        actual_file_bytes=path.stat().st_size,
    )
