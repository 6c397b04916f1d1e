"""Process-level set-up of PyTorch's CPU thread pool, done once before any real work, and the
memory a process may use: its working budget and its share of the device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["start_thread_pool", "use_deterministic_kernels", "memory_budget_bytes", "device_memory_bytes", "MemoryShare", "memory_share", "working_arrays_bytes"]

#: working memory of a CPU process when ``compute.memory_budget_gb`` is not set
CPU_MEMORY_BUDGET_BYTES = 2 * 2**30

# elements per task of PyTorch's element-wise CPU kernels (``at::internal::GRAIN_SIZE``)
_GRAIN_SIZE = 32768


def start_thread_pool(num_threads: int | None = None) -> None:
    """Set the number of CPU threads and start every worker thread with a throw-away op.

    The first parallel region of a process is not safe on PyTorch's MKL builds: a vectorised
    math function (``sqrt``, ``cos``, ``exp``, ...) evaluated in it is, in about one process in
    ten, computed on the worker threads' share of the tensor to only ~12 bits (relative error
    ~3e-4), while the main thread's share and every later call are accurate. A mask, a filter
    or a CTF made in that first region then differs from one run of the same command to the
    next. Running one parallel op here, whose result is discarded, makes every later call
    exact and runs reproducible.

    Parameters
    ----------
    num_threads
        Threads of PyTorch's CPU pool; ``None`` keeps the current number. Call this again
        after anything else changes the number of threads.
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.sqrt(torch.ones(torch.get_num_threads() * _GRAIN_SIZE + 1))


def use_deterministic_kernels(device: torch.device) -> None:
    """Make ``device``'s kernels give the same bits for the same inputs, run after run.

    On a CPU every kernel cryotorch uses already does (after :func:`start_thread_pool`). On
    CUDA, ``index_add_`` of floats (back-projection, radial averages, noise sums) adds with
    atomics in whatever order the threads arrive, and cuBLAS may split sums by its workspace:
    PyTorch's deterministic mode switches both to fixed-order kernels. An op with no
    deterministic kernel warns instead of failing. Call this before the first matrix product
    on the device (cuBLAS reads its workspace setting then).
    """
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def memory_budget_bytes(device: torch.device, budget_gb: float | None) -> float:
    """Working memory per process for chunked work, in bytes.

    Parameters
    ----------
    device
        The process's device.
    budget_gb
        The configured budget (GiB); ``None``: a quarter of the GPU's memory on CUDA (chunks
        sized from the budget can be alive together, beside the volumes, the sums and
        PyTorch's cache), :data:`CPU_MEMORY_BUDGET_BYTES` on a CPU. The device's total, not
        what is free at the start, so that batches, and with them the results, do not change
        with what else runs on the GPU.
    """
    if budget_gb is not None:
        if not budget_gb > 0:
            raise ValueError(f"compute.memory_budget_gb={budget_gb} must be positive (GiB), or null for the device's default")
        return float(budget_gb) * 2**30
    if device.type == "cuda":
        return 0.25 * device_memory_bytes(device)
    return float(CPU_MEMORY_BUDGET_BYTES)


def device_memory_bytes(device: torch.device) -> float:
    """Total memory of the process's device in bytes: the GPU's on CUDA, the machine's
    physical memory on a CPU."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[1])
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass(frozen=True)
class MemoryShare:
    """The memory a process may fill with a job's maps, sums or preloaded images: 80 % of its
    device's, on a CPU node divided among the processes launched on it (torchrun's
    ``LOCAL_WORLD_SIZE``; a GPU is each process's own), less ``held_bytes`` that the job's
    data already fills in the same memory (images preloaded into a CPU's), less
    ``reserved_bytes`` kept for other work (the arrays sized from the memory budget), but at
    most half of what is left: a budget too large for the machine (the CPU's default 2 GiB on
    a small node shared by several processes) then leaves the maps and sums half the share
    rather than nothing.

    Attributes
    ----------
    device_bytes
        The device's total memory (bytes).
    sharing
        Processes that share it.
    reserved_bytes
        Bytes kept for other work.
    held_bytes
        Bytes the job's data holds in the same memory (preloaded images).
    """

    device_bytes: float
    sharing: int
    reserved_bytes: float
    held_bytes: float = 0.0

    @property
    def share_bytes(self) -> float:
        """80 % of the device's memory over the processes that share it."""
        return 0.8 * self.device_bytes / self.sharing

    @property
    def kept_bytes(self) -> float:
        """Bytes kept for other work: ``reserved_bytes``, at most half of the share that the
        held data leaves."""
        return min(self.reserved_bytes, 0.5 * max(0.0, self.share_bytes - self.held_bytes))

    @property
    def available_bytes(self) -> float:
        """Bytes left to the job's maps, sums or images (negative where the held data alone
        fills more than the share)."""
        return self.share_bytes - self.held_bytes - self.kept_bytes

    def describe(self) -> str:
        """The share in words, for error messages: ``the 9.1 GB this process may use (80 % of
        this device's 16 GB, shared by 2 processes, less 2.7 GB for ...)``."""
        parts = [f"80 % of this device's {self.device_bytes / 1e9:.3g} GB"]
        if self.sharing > 1:
            parts.append(f"shared by {self.sharing} processes")
        if self.held_bytes > 0:
            parts.append(f"less {self.held_bytes / 1e9:.3g} GB of images held by data.preload=true")
        if self.kept_bytes > 0:
            parts.append(f"less {self.kept_bytes / 1e9:.3g} GB for the working arrays of compute.memory_budget_gb")
        return f"the {self.available_bytes / 1e9:.3g} GB this process may use ({', '.join(parts)})"


def memory_share(device: torch.device, reserved_bytes: float = 0.0, held_bytes: float = 0.0) -> MemoryShare:
    """The :class:`MemoryShare` of this process on ``device``, ``reserved_bytes`` kept back
    and ``held_bytes`` already filled."""
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    return MemoryShare(device_memory_bytes(device), sharing, reserved_bytes, held_bytes)


def working_arrays_bytes(memory_budget_bytes: float) -> float:
    """Bytes that the arrays sized from the memory budget can fill at once: the tables of an
    aligned iteration (a quarter of the budget each, those of the particles exempt from
    oversampling an eighth each) and a batch's score matrices, about 1¼ budgets."""
    return 1.25 * memory_budget_bytes
