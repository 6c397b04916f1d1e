"""Process-level set-up of PyTorch's CPU thread pool, done once before any real work."""

from __future__ import annotations

import torch

__all__ = ["start_thread_pool"]

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
