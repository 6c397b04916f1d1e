"""``+job=select``: write the particles of chosen classes (RELION's Subset selection).

Reads a classification's ``run_itNNN_data.star`` (``data.particles``), keeps the rows whose
``rlnClassNumber`` is in ``job.classes``, and writes them with every column to ``particles.star`` in the
run folder, image paths rewritten relative to it.
"""

from __future__ import annotations

import logging

import numpy as np

from cryotorch.errors import InputError
from cryotorch.io import read_particles, write_particles
from cryotorch.jobs.context import RunContext

log = logging.getLogger(__name__)

__all__ = ["SelectJob"]


class SelectJob:
    """Subset selection by class; parameters are the keys of ``configs/job/select.yaml``."""

    def __init__(self, name: str, classes: list[int], output_name: str = "particles.star") -> None:
        if not classes:
            raise InputError("job.classes is empty: list the class numbers to keep, e.g. job.classes=[1,3]")
        self.name = name
        self.classes = [int(c) for c in classes]
        self.output_name = output_name

    def run(self, context: RunContext) -> None:
        """Select on rank 0 and write the subset STAR."""
        if context.particles is None:
            raise InputError("select needs a classification's data STAR: set data.particles=run_it025_data.star")
        if context.is_main:
            table = read_particles(context.particles, context.project_dir)
            if int(table.class_number.max(initial=0)) == 0:
                raise InputError(f"{context.particles}: no rlnClassNumber column; select reads a class3d run_itNNN_data.star")
            keep = np.isin(table.class_number, self.classes)
            present = np.unique(table.class_number).tolist()
            if not keep.any():
                raise InputError(f"{context.particles}: job.classes={self.classes} select no particle (its particles are in classes {present})")
            missing = sorted(set(self.classes) - set(present))
            if missing:
                log.warning("classes %s hold no particles in %s", missing, context.particles)
            subset = table.select(np.nonzero(keep)[0])
            (context.output_dir / self.output_name).parent.mkdir(parents=True, exist_ok=True)
            write_particles(context.output_dir / self.output_name, subset)
            log.info("selected %d of %d particles (classes %s) into %s", len(subset), len(table), self.classes, context.output_dir / self.output_name)
        context.fabric.barrier()
