"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path
from types import MethodType, SimpleNamespace
from typing import Any

import pytest
import torch

from cryotorch.jobs.context import RunContext
from cryotorch.runtime import start_thread_pool

# devices every device-aware test runs on; the CUDA cases carry the `gpu` mark, so the
# default run (-m "not gpu") deselects them and `pytest -m gpu` runs them on a GPU machine
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

# the first parallel math op of a process is unsafe (cryotorch/runtime.py); tests that compute in
# process take it only after this
start_thread_pool()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real-data folder ``../shared/data`` (always present in CI).

    Its GPL/LGPL files are test inputs that may not be copied into ``tests/``, so tests read
    them in place and skip, saying why, where the folder is absent.
    """
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"shared real test data not found at {SHARED_DATA_DIR} (it is read in place, not copied into tests/)")
    return SHARED_DATA_DIR


def quarter_turn(volume: torch.Tensor) -> torch.Tensor:
    """``(z, y, x)`` volume turned by 90° about z through the map centre ``N // 2`` (the
    voxel grid is taken as periodic, so that the turn permutes voxels)."""
    n = volume.shape[-1]
    index = torch.arange(n, device=volume.device)
    # out[z, y, x] = volume[z, (2c − x) mod n, y] with c = n // 2
    return volume[:, ((2 * (n // 2) - index) % n)[None, :], index[:, None]]


def c4_average(volume: torch.Tensor) -> torch.Tensor:
    """``volume`` made C4-symmetric about z through the map centre: the mean of its 4 turns."""
    total, turned = volume.clone(), volume
    for _ in range(3):
        turned = quarter_turn(turned)
        total += turned
    return total / 4


def memory_context(**fields: Any) -> SimpleNamespace:
    """A stand-in for a job's RunContext with only ``fields`` (device, memory budget, ...;
    ``preload`` False unless given) and its ``maps_memory_share``, for the jobs' memory checks."""
    context = SimpleNamespace(**{"preload": False, **fields})
    context.maps_memory_share = MethodType(RunContext.maps_memory_share, context)
    return context
