"""What every job receives: devices and processes, output folder, logger, budgets, seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric import Fabric
from torch.utils.tensorboard import SummaryWriter

from cryotorch.data.particles import exact_tree_sum, preload_bytes, tree_leaves
from cryotorch.em.sums import TensorSums
from cryotorch.runtime import MemoryShare, memory_share, working_arrays_bytes

__all__ = ["RunContext"]


@dataclass
class RunContext:
    """Run-wide objects built by :mod:`cryotorch.train` from the composed config.

    Attributes
    ----------
    fabric
        Launcher/strategy: device, rank, world size, collectives.
    output_dir
        The run's own folder (created).
    writer
        TensorBoard writer on rank 0, None elsewhere.
    seed
        Global seed; jobs derive every random stream from it.
    memory_budget_bytes
        Working-memory budget per process for chunked work.
    sum_tree_leaves
        Leaves of the summation tree over an iteration's batches
        (:func:`~cryotorch.data.particles.tree_leaves`), a power of two.
    particles
        Path of the input particle STAR/.cs (``data.particles``), or None.
    project_dir
        Folder that relative image paths refer to (``data.project_dir``), or None.
    preload
        Read all particle images into RAM instead of streaming from memory-mapped stacks.
    padding_factor
        Fourier oversampling of projections and reconstructions.
    symmetry
        Point-group symbol (``C1``, ``D7``, ``I`` ...).
    sampling
        The ``sampling`` config group (pose search settings) as a plain dict.
    """

    fabric: Fabric
    output_dir: Path
    writer: SummaryWriter | None
    seed: int
    memory_budget_bytes: float
    sum_tree_leaves: int
    particles: Path | None
    project_dir: Path | None
    preload: bool
    padding_factor: float
    symmetry: str
    sampling: dict[str, Any]

    @property
    def device(self) -> torch.device:
        """The compute device of this process."""
        return self.fabric.device

    @property
    def is_main(self) -> bool:
        """True on global rank 0, which writes files and logs."""
        return self.fabric.global_rank == 0

    def maps_memory_share(self, n_images: int, box_size: int) -> MemoryShare:
        """This process's :func:`~cryotorch.runtime.memory_share` for a job's maps and sums:
        the arrays sized from the memory budget kept back, and on a CPU the ``n_images``
        images of ``box_size``² px that ``data.preload=true`` holds in the same memory
        (images that memory cannot hold at all are refused here, with their own message)."""
        preloaded = preload_bytes(n_images, box_size) if self.preload else 0.0
        held = preloaded if self.device.type == "cpu" else 0.0
        return memory_share(self.device, working_arrays_bytes(self.memory_budget_bytes), held)

    def gather_rows(self, rows: torch.Tensor, values: torch.Tensor, n_total: int) -> torch.Tensor:
        """Assemble per-particle ``values`` ``(n_local, ...)`` of this rank's ``rows`` into ``(n_total, ...)`` on every rank."""
        if self.fabric.world_size == 1:
            out = values.new_zeros(n_total, *values.shape[1:])
            out[rows] = values
            return out
        count = torch.tensor([rows.shape[0]], device=self.device)
        longest = int(self.fabric.all_reduce(count, reduce_op="max"))
        padded_rows = torch.full((longest,), -1, dtype=torch.long, device=self.device)
        padded_rows[: rows.shape[0]] = rows
        padded_values = values.new_zeros(longest, *values.shape[1:])
        padded_values[: rows.shape[0]] = values
        all_rows = self.fabric.all_gather(padded_rows).reshape(-1)
        all_values = self.fabric.all_gather(padded_values).reshape(-1, *values.shape[1:])
        keep = all_rows >= 0
        out = values.new_zeros(n_total, *values.shape[1:])
        out[all_rows[keep]] = all_values[keep]
        return out

    def pairwise_sum(self, tensor: torch.Tensor, chunk_bytes: float) -> torch.Tensor:
        """Sum of ``tensor`` over a power-of-two number of processes, added pairwise in rank
        order, ``((r0 + r1) + (r2 + r3)) + …``, so that ranks holding consecutive nodes of a
        :class:`~cryotorch.em.sums.SumTree` end with the bits of its root. The ranks' values
        are gathered in chunks that hold at most ``chunk_bytes`` for all ranks together
        (``chunk_bytes / world_size`` from each), and added in place."""
        world_size = self.fabric.world_size
        if world_size == 1:
            return tensor
        values = torch.view_as_real(tensor) if tensor.is_complex() else tensor
        flat, total = values.reshape(-1), torch.empty_like(values)
        size = max(1, int(chunk_bytes // (world_size * flat.element_size())))
        for start in range(0, flat.numel(), size):
            parts = self.fabric.all_gather(flat[start : start + size].contiguous())  # (ranks, chunk)
            while parts.shape[0] > 1:
                parts[0::2] += parts[1::2]
                parts = parts[0::2]
            total.view(-1)[start : start + size] = parts[0]
        return torch.view_as_complex(total) if tensor.is_complex() else total

    def tree_leaves(self, rows: np.ndarray, batch_size: int) -> list[tuple[int, list[np.ndarray]]]:
        """This rank's leaves of the run's summation tree over the batches of ``rows`` (every
        rank's): :func:`~cryotorch.data.particles.tree_leaves` with ``sum_tree_leaves``."""
        return tree_leaves(rows, batch_size, self.sum_tree_leaves, self.fabric.global_rank, self.fabric.world_size)

    def tree_sum(self, sums: TensorSums, chunk_bytes: float) -> TensorSums:
        """Every sum of this rank's node of a :class:`~cryotorch.em.sums.SumTree` over
        :meth:`tree_leaves`, summed over processes in place: in the tree's order where the
        number of processes allows it (:meth:`pairwise_sum`), else all-reduced."""
        exact = exact_tree_sum(self.sum_tree_leaves, self.fabric.world_size)
        for tensor in sums.tensors():
            total = self.pairwise_sum(tensor, chunk_bytes) if exact else self.all_reduce_sum(tensor)
            if total is not tensor:
                tensor.copy_(total)
        return sums

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over all processes (identity in a single process)."""
        if self.fabric.world_size == 1:
            return tensor
        if tensor.is_complex():
            return torch.view_as_complex(self.fabric.all_reduce(torch.view_as_real(tensor).contiguous(), reduce_op="sum"))
        return self.fabric.all_reduce(tensor, reduce_op="sum")
