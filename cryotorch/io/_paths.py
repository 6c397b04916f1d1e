"""Paths written inside metadata files: how they are resolved, and how they are written.

RELION's programs run in the project directory and name every file relative to it
(``Extract/job007/Movies/a.mrcs``, ``Class3D/job012/run_it025_model.star``); cryotorch writes
paths the same way, relative to the working directory where the file lies inside it
(:func:`project_path`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["project_path", "project_search_folders", "resolve_stack_path"]


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


def project_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a metadata file names it: relative to the working directory (RELION's
    project directory, from which its programs run) where it lies inside it, else absolute."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute, os.getcwd())
    return absolute if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def project_search_folders(metadata_folder: Path, project_dir: Path | None) -> list[Path]:
    """Folders in which a relative path written in a metadata file in ``metadata_folder`` is
    looked for, in order: that folder, ``project_dir`` where given, the folder's ancestors
    (a RELION job folder such as ``Refine3D/job012/`` lies inside its project, to which its
    paths are relative), then the working directory."""
    folder = Path(os.path.abspath(metadata_folder))
    folders = [folder, *([] if project_dir is None else [Path(os.path.abspath(project_dir))]), *folder.parents, Path.cwd()]
    return list(dict.fromkeys(folders))
