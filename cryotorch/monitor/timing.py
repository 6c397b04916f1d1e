"""Wall-clock timing for benchmarks (synchronising CUDA so that GPU work is counted)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["best_wall_time"]


def best_wall_time(function: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call, in seconds."""
    function()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best
