"""Reading and checking the particle images that a :class:`ParticleTable` refers to."""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import pandas as pd

from cryotorch.errors import InputError
from cryotorch.io._mrc import ImageStack, read_mrc_header_summary
from cryotorch.io._table import ParticleTable

__all__ = ["ParticleImageReader", "validate_particle_images"]

# Relative pixel-size disagreement between metadata and stack header that is reported as an error.
_PIXEL_SIZE_TOLERANCE = 0.01
# Header pixel sizes that mean "not set": 0, and 1.0, which many tools (cryoDRGN, EMAN2, ASPIRE)
# write when they do not know it (the shared relion31.mrcs says 1.0 for 2.806 Å pixels).
_UNSET_HEADER_PIXEL_SIZES = (0.0, 1.0)


def _describe_row(table: ParticleTable, row: int) -> str:
    source = f" of {table.source_path}" if table.source_path else ""
    return f"particle row {row + 1}{source}"


def validate_particle_images(table: ParticleTable) -> None:
    """Check every referenced stack against the table, opening each stack header once.

    Detects a missing stack file, an image index past the end of its stack, a truncated file
    (smaller than its header implies), a box size that disagrees with the table, and a pixel
    size that disagrees by more than 1 % (unless the header pixel size is 0 or exactly 1.0,
    the placeholders written by tools that do not know it; the metadata is authoritative).

    Parameters
    ----------
    table
        Particles whose images are to be checked.

    Raises
    ------
    InputError
        At the first problem, naming the particle row (1-based), the stack and the fix.
    """
    codes, unique_paths = pd.factorize(table.stack_paths)
    first_row_of = np.full(len(unique_paths), -1, dtype=np.int64)
    first_row_of[codes[::-1]] = np.arange(len(codes))[::-1]  # earliest row per stack
    for code, stack in enumerate(unique_paths):
        rows = np.flatnonzero(codes == code)
        where = _describe_row(table, int(first_row_of[code]))
        if not os.path.isfile(stack):
            raise InputError(
                f"{where}: image stack {stack} does not exist; fix the image path in the metadata, or pass "
                "project_dir if paths are relative to a project folder"
            )
        header = read_mrc_header_summary(stack)
        if header.actual_file_bytes < header.expected_file_bytes:
            raise InputError(
                f"{where}: image stack {stack} is truncated ({header.actual_file_bytes} bytes on disk, its header "
                f"implies {header.expected_file_bytes}); copy or re-extract it again"
            )
        past_end = rows[table.stack_indices[rows] >= header.n_images]
        if past_end.size:
            row = int(past_end[0])
            raise InputError(
                f"{_describe_row(table, row)}: image {table.stack_indices[row] + 1} (1-based) is past the end of "
                f"{stack}, which holds {header.n_images} images; fix the image index or re-extract the stack"
            )
        wrong_box = rows[
            (table.box_size_px[rows] != header.width_px) | (header.height_px != header.width_px)
        ]
        if wrong_box.size:
            row = int(wrong_box[0])
            raise InputError(
                f"{_describe_row(table, row)}: box size {table.box_size_px[row]} px in the metadata (rlnImageSize) "
                f"disagrees with the {header.width_px}x{header.height_px} px images of {stack}; fix rlnImageSize "
                "or re-extract"
            )
        if header.pixel_size_angstrom not in _UNSET_HEADER_PIXEL_SIZES:
            relative_error = np.abs(table.pixel_size_angstrom[rows] / header.pixel_size_angstrom - 1)
            wrong_pixel = rows[relative_error > _PIXEL_SIZE_TOLERANCE]
            if wrong_pixel.size:
                row = int(wrong_pixel[0])
                raise InputError(
                    f"{_describe_row(table, row)}: pixel size {table.pixel_size_angstrom[row]:.4f} Å in the metadata "
                    f"(rlnImagePixelSize) differs by more than 1 % from {header.pixel_size_angstrom:.4f} Å in the "
                    f"header of {stack}; fix the metadata (or the header with relion_image_handler --angpix)"
                )


class ParticleImageReader:
    """Reads the images of table rows, keeping stacks memory-mapped between calls.

    At most ``max_open_stacks`` stacks stay open (least recently used are closed first), so
    that projects with one stack per micrograph do not run out of file handles. The reader
    can be pickled (e.g. into DataLoader workers); open stacks are reopened on demand.

    Parameters
    ----------
    table
        Particles to read.
    preload
        Read every image into memory now (and check them all for NaN/Inf once).
    max_open_stacks
        Number of memory-mapped stacks kept open.
    """

    def __init__(self, table: ParticleTable, preload: bool = False, max_open_stacks: int = 128) -> None:
        self.table = table
        self.max_open_stacks = max_open_stacks
        self._stack_codes, self._stack_paths = pd.factorize(table.stack_paths)
        self._open_stacks: OrderedDict[int, ImageStack] = OrderedDict()
        self._images: np.ndarray | None = None
        if preload:
            self._images = self.read(np.arange(len(table)))  # (N, box, box)
            self.close()

    def _stack(self, code: int) -> ImageStack:
        stack = self._open_stacks.pop(code, None)
        if stack is None:
            stack = ImageStack(self._stack_paths[code])
            if len(self._open_stacks) >= self.max_open_stacks:
                _, oldest = self._open_stacks.popitem(last=False)
                oldest.close()
        self._open_stacks[code] = stack
        return stack

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Images of table rows.

        Parameters
        ----------
        rows
            ``(B,)`` integer row indices into the table.

        Returns
        -------
        numpy.ndarray
            ``(B, N, N)`` float32 images in the order of ``rows``.

        Raises
        ------
        InputError
            If the rows have different box sizes, an image index is past the end of its
            stack, or an image holds NaN or infinite pixels.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self._images is not None:
            return self._images[rows]
        box_sizes = np.unique(self.table.box_size_px[rows])
        if box_sizes.size > 1:
            raise InputError(
                f"rows {rows.tolist()[:8]} mix box sizes {box_sizes.tolist()}; read images of one box size at a time "
                "(or re-extract them at one size)"
            )
        box_size = int(box_sizes[0]) if box_sizes.size else 0
        images = np.empty((rows.size, box_size, box_size), dtype=np.float32)
        codes = self._stack_codes[rows]
        for code in np.unique(codes):
            positions = np.flatnonzero(codes == code)
            stack = self._stack(int(code))
            if stack.box_size_px != box_size:
                raise InputError(
                    f"{_describe_row(self.table, int(rows[positions[0]]))}: images of {stack.path} are "
                    f"{stack.box_size_px} px but the metadata says {box_size} px; fix rlnImageSize or re-extract"
                )
            images[positions] = stack.read(self.table.stack_indices[rows[positions]])
        self._check_finite(images, rows)
        return images

    def _check_finite(self, images: np.ndarray, rows: np.ndarray) -> None:
        finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)  # (B,)
        if not finite.all():
            position = int(np.flatnonzero(~finite)[0])
            row = int(rows[position])
            raise InputError(
                f"{_describe_row(self.table, row)}: image {self.table.stack_indices[row] + 1} (1-based) of "
                f"{self.table.stack_paths[row]} has NaN or infinite pixels; remove the particle or re-extract it"
            )

    def __getstate__(self) -> dict[str, object]:
        # Memory maps cannot be pickled; each process reopens the stacks it needs.
        state = self.__dict__.copy()
        state["_open_stacks"] = OrderedDict()
        return state

    def close(self) -> None:
        """Close every open stack (the reader stays usable and reopens them on demand)."""
        for stack in self._open_stacks.values():
            stack.close()
        self._open_stacks.clear()
