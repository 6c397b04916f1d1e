"""File formats: RELION STAR (3.0 to 5), MRC maps and stacks, cryoSPARC ``.cs``.

This package is the only place that knows file layouts and RELION column names; the rest of
cryotorch works with :class:`ParticleTable`, :class:`MrcVolume` and arrays.
"""

from cryotorch.io._atomic import atomic_output_path
from cryotorch.io._images import ParticleImageReader, validate_particle_images
from cryotorch.io._mrc import ImageStack, MrcStackWriter, MrcVolume, read_mrc, write_mrc
from cryotorch.io._particles import read_particles
from cryotorch.io._paths import project_path
from cryotorch.io._relion import write_particles
from cryotorch.io._relion_model import (
    ClassSummary,
    ModelSummary,
    OptimiserSummary,
    SamplingSummary,
    read_model_star,
    write_model_star,
    write_optimiser_star,
    write_sampling_star,
)
from cryotorch.io._star import read_star, write_star
from cryotorch.io._table import ParticleTable

__all__ = [
    "atomic_output_path",
    "ParticleTable",
    "read_star",
    "write_star",
    "read_particles",
    "project_path",
    "write_particles",
    "ClassSummary",
    "ModelSummary",
    "OptimiserSummary",
    "read_model_star",
    "write_model_star",
    "write_optimiser_star",
    "SamplingSummary",
    "write_sampling_star",
    "MrcVolume",
    "read_mrc",
    "write_mrc",
    "ImageStack",
    "MrcStackWriter",
    "ParticleImageReader",
    "validate_particle_images",
]
