"""``+job=select``: write the particles of chosen classes (RELION's Subset selection).

Reads a classification's ``run_itNNN_data.star`` (``data.particles``), keeps the rows whose
``rlnClassNumber`` is in ``job.classes`` and, where ``job.metadata_label`` is set, whose value
of that column lies in ``[job.metadata_min, job.metadata_max]`` (RELION's "Select based on
metadata values", e.g. ``rlnMaxValueProbDistribution`` ≥ 0.5), and writes them with every
column to ``particles.star`` in the run folder, image paths named as RELION names them (relative
to the working directory, its project folder, where the stacks lie inside it).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from cryotorch.errors import InputError
from cryotorch.io import ParticleTable, read_particles, write_particles
from cryotorch.jobs.context import RunContext

log = logging.getLogger(__name__)

__all__ = ["SelectJob"]


class SelectJob:
    """Subset selection by class and by a metadata range; parameters are the keys of
    ``configs/job/select.yaml``."""

    def __init__(
        self,
        name: str,
        classes: list[int],
        output_name: str = "particles.star",
        metadata_label: str | None = None,
        metadata_min: float | None = None,
        metadata_max: float | None = None,
    ) -> None:
        if not classes and not metadata_label:
            raise InputError(
                "job.classes is empty and no job.metadata_label is set: list the class numbers to keep, e.g. job.classes=[1,3], "
                "or select on a column, e.g. job.metadata_label=rlnMaxValueProbDistribution job.metadata_min=0.5"
            )
        if metadata_label:
            if metadata_min is None and metadata_max is None:
                raise InputError(f"job.metadata_label={metadata_label} needs job.metadata_min, job.metadata_max or both (the range of values to keep)")
            if metadata_min is not None and metadata_max is not None and not metadata_min <= metadata_max:
                raise InputError(f"job.metadata_min={metadata_min} is above job.metadata_max={metadata_max}: no value lies between them")
        elif metadata_min is not None or metadata_max is not None:
            raise InputError("job.metadata_min and job.metadata_max need job.metadata_label, the column they bound (e.g. rlnMaxValueProbDistribution)")
        self.name = name
        self.classes = [int(c) for c in classes]
        self.output_name = output_name
        self.metadata_label = metadata_label
        self.metadata_range = (-math.inf if metadata_min is None else float(metadata_min), math.inf if metadata_max is None else float(metadata_max))

    def run(self, context: RunContext) -> None:
        """Select on rank 0 and write the subset STAR."""
        if context.particles is None:
            raise InputError("select needs a classification's data STAR: set data.particles=run_it025_data.star")
        if context.is_main:
            table = read_particles(context.particles, context.project_dir)
            keep = self.by_class(table, str(context.particles)) & self.by_metadata(table)
            if not keep.any():
                raise InputError(f"{context.particles}: {self.describe()} select no particle")
            subset = table.select(np.nonzero(keep)[0])
            (context.output_dir / self.output_name).parent.mkdir(parents=True, exist_ok=True)
            write_particles(context.output_dir / self.output_name, subset)
            log.info("selected %d of %d particles (%s) into %s", len(subset), len(table), self.describe(), context.output_dir / self.output_name)
        context.fabric.barrier()

    def by_class(self, table: ParticleTable, path: str) -> np.ndarray:
        """``(N,)`` bool: the rows of ``job.classes`` (every row where none are listed)."""
        if not self.classes:
            return np.ones(len(table), dtype=bool)
        if int(table.class_number.max(initial=0)) == 0:
            raise InputError(f"{path}: no rlnClassNumber column; select reads a class3d run_itNNN_data.star")
        present = np.unique(table.class_number).tolist()
        keep = np.isin(table.class_number, self.classes)
        if not keep.any():
            raise InputError(f"{path}: job.classes={self.classes} select no particle (its particles are in classes {present})")
        missing = sorted(set(self.classes) - set(present))
        if missing:
            log.warning("classes %s hold no particles in %s", missing, path)
        return keep

    def by_metadata(self, table: ParticleTable) -> np.ndarray:
        """``(N,)`` bool: the rows whose ``job.metadata_label`` value lies in the range (every
        row without a label)."""
        if not self.metadata_label:
            return np.ones(len(table), dtype=bool)
        values = table.metadata(self.metadata_label)
        low, high = self.metadata_range
        return (values >= low) & (values <= high)

    def describe(self) -> str:
        """The selection in words, for the log and errors."""
        parts = [f"job.classes={self.classes}"] if self.classes else []
        if self.metadata_label:
            low, high = self.metadata_range
            parts.append(f"{self.metadata_label} in [{low:g}, {high:g}]")
        return ", ".join(parts)
