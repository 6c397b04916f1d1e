"""Format dispatch for particle metadata files."""

from __future__ import annotations

import os
from pathlib import Path

from cryotorch.errors import InputError
from cryotorch.io._cryosparc import read_cryosparc_particles
from cryotorch.io._relion import read_relion_particles
from cryotorch.io._table import ParticleTable

__all__ = ["read_particles"]


def read_particles(path: str | os.PathLike[str], project_dir: str | os.PathLike[str] | None = None) -> ParticleTable:
    """Read particle metadata: RELION ``.star`` (3.0 to 5) or cryoSPARC ``.cs``.

    Parameters
    ----------
    path
        Particle file; the suffix picks the format.
    project_dir
        Project folder that relative image paths may be relative to (RELION project or
        cryoSPARC project folder); see :mod:`cryotorch.io._relion` and
        :mod:`cryotorch.io._cryosparc` for the lookup order.

    Returns
    -------
    ParticleTable
        One row per particle.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".star":
        return read_relion_particles(path, project_dir)
    if suffix == ".cs":
        return read_cryosparc_particles(path, project_dir)
    raise InputError(f"cannot tell the format of {path} from its suffix; pass a RELION .star or a cryoSPARC .cs file")
