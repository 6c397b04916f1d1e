"""Wall-clock timing for benchmarks and for the phases of an iteration (synchronising CUDA
so that GPU work is counted where it runs, not where it is next waited for)."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["PhaseTimer", "best_wall_time", "device_description"]


def device_description(device: torch.device) -> str:
    """The machine benchmark figures come from: ``"cuda (NVIDIA H100 80GB HBM3), torch …"``
    or ``"cpu (AMD EPYC …, 2 threads), torch …"`` (the CPU model from ``/proc/cpuinfo``
    where there is one)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")] if cpuinfo.is_file() else []
        name = f"{models[0] if models else platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{device.type} ({name}), torch {torch.__version__}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_wall_time(function: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call, in seconds."""
    function()
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        function()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


class PhaseTimer:
    """Seconds spent in named phases of a sequence of steps, each summed over every time it ran.

    Each :meth:`lap` charges the time since the previous lap (or since the timer was made) to
    one phase, after waiting for the device's queued work, so that on a GPU a phase is charged
    with its own kernels rather than with those it happens to wait for.

    Parameters
    ----------
    device
        The device whose work is waited for (a no-op off CUDA).
    order
        Phases in the order :attr:`seconds` lists them, whichever ran first; phases not named
        here follow in the order they first ran.
    """

    def __init__(self, device: torch.device, order: Sequence[str] = ()) -> None:
        self.device = device
        self._rank = {name: position for position, name in enumerate(order)}
        self._seconds: dict[str, float] = {}
        _synchronize(device)
        self._last = time.perf_counter()

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per phase that ran, in the timer's order."""
        names = sorted(self._seconds, key=lambda name: self._rank.get(name, len(self._rank)))
        return {name: self._seconds[name] for name in names}

    def lap(self, name: str) -> None:
        """Charge the time since the previous lap to phase ``name``."""
        _synchronize(self.device)
        now = time.perf_counter()
        self._seconds[name] = self._seconds.get(name, 0.0) + now - self._last
        self._last = now

    def summary(self) -> str:
        """``"name 1.23 s, other 0.45 s"`` in the timer's order."""
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.seconds.items())
