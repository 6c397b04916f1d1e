"""Resolution of the stack paths written inside metadata files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["resolve_stack_path"]


def resolve_stack_path(name: str, search_folders: Sequence[Path], fallback_folder: Path, *, by_basename_in: Path | None = None) -> str:
    """Absolute path of a stack named in a metadata file.

    Parameters
    ----------
    name
        Path as written in the file (absolute, or relative to some folder).
    search_folders
        Folders to try in order; the first in which ``name`` exists wins.
    fallback_folder
        Folder used when the stack exists nowhere, so that a later "missing stack" error
        names the path the user most likely meant.
    by_basename_in
        If given, also try the bare file name in this folder after ``search_folders``
        (exports moved away from their project keep their stacks beside the metadata).

    Returns
    -------
    str
        Normalised absolute path (symbolic links are kept, not resolved).
    """
    relative = Path(name)
    if relative.is_absolute():
        return os.path.normpath(relative)
    candidates = [folder / relative for folder in search_folders]
    if by_basename_in is not None:
        candidates.append(by_basename_in / relative.name)
    chosen = next((candidate for candidate in candidates if candidate.exists()), fallback_folder / relative)
    return os.path.abspath(chosen)
