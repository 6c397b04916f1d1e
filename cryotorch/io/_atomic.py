"""Atomic file replacement shared by every writer in :mod:`cryotorch.io`."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_output_path", "temporary_sibling_path"]


def temporary_sibling_path(path: str | os.PathLike[str]) -> Path:
    """A fresh, unused hidden file name in the folder of ``path`` (nothing is created)."""
    destination = Path(path)
    return destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.tmp")


@contextlib.contextmanager
def atomic_output_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` and move it onto ``path`` on success.

    The temporary file lives in the destination folder so that ``os.replace`` is a rename on
    one file system: readers never see a half-written file, and an interrupted job leaves the
    previous version intact. The caller creates the file (so it gets the usual permissions
    from the umask, unlike ``tempfile.mkstemp``'s 0600). On an exception it is removed.

    Parameters
    ----------
    path
        Final destination. Its folder must exist.
    """
    temp_path = temporary_sibling_path(path)
    try:
        yield temp_path
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)
