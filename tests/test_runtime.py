"""Process runtime: the thread-pool start-up that makes the first parallel math op exact,
deterministic CUDA kernels, the memory budget, and the phase timer of iterations."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from cryotorch.monitor import PhaseTimer
from cryotorch.monitor.timing import device_description
from cryotorch.runtime import memory_budget_bytes, use_deterministic_kernels

from conftest import DEVICES
from test_jobs import REPO

# the first parallel op of a fresh process: sqrt of a 32³ radius² grid, compared to NumPy's
# correctly rounded sqrt (an op in the unsafe first region is off by ~3e-4 on part of it)
FIRST_OP = """
import numpy as np, torch
from cryotorch.runtime import start_thread_pool
start_thread_pool(2)
c = torch.arange(32, dtype=torch.float32) - 16
r2 = sum(g**2 for g in torch.meshgrid(c, c, c, indexing="ij"))
print(np.allclose(torch.sqrt(r2).numpy(), np.sqrt(r2.numpy()), rtol=2e-7, atol=0))
"""


def test_the_first_parallel_op_of_every_process_is_exact() -> None:
    # the fault, where a CPU has it, hits about one fresh process in ten, so this takes 16,
    # two at a time (most of each is its imports)
    results = []
    for _ in range(8):
        pair = [subprocess.Popen([sys.executable, "-c", FIRST_OP], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for process in pair:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err[-2000:]
            results.append(out.strip())
    assert results == ["True"] * 16


@pytest.mark.gpu
def test_cuda_scatter_adds_are_bitwise_repeatable() -> None:
    # index_add_ of floats with many collisions: atomics add in arrival order unless the
    # deterministic kernels are on
    device = torch.device("cuda")
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    use_deterministic_kernels(device)
    generator = torch.Generator(device=device).manual_seed(0)
    values = torch.randn(2**22, device=device, generator=generator)
    index = torch.randint(0, 1000, (2**22,), device=device, generator=generator)
    try:
        sums = [torch.zeros(1000, device=device).index_add_(0, index, values) for _ in range(3)]
    finally:  # the later tests run as they would without this one
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    assert all(torch.equal(sums[0], other) for other in sums[1:])
    exact = torch.zeros(1000, dtype=torch.float64, device=device).index_add_(0, index, values.double())
    assert torch.allclose(sums[0].double(), exact, atol=1e-3)


def test_memory_budget_defaults_and_checks() -> None:
    cpu = torch.device("cpu")
    assert memory_budget_bytes(cpu, None) == 2 * 2**30
    assert memory_budget_bytes(cpu, 0.5) == 2**29
    with pytest.raises(ValueError, match="memory_budget_gb=0"):
        memory_budget_bytes(cpu, 0)


@pytest.mark.gpu
def test_cuda_memory_budget_is_a_share_of_the_device_memory() -> None:
    # of the total, not the free memory: the same batches whatever else runs on the GPU
    device = torch.device("cuda")
    _, total = torch.cuda.mem_get_info(device)
    assert memory_budget_bytes(device, None) == 0.25 * total


@pytest.mark.parametrize("device", DEVICES)
def test_phase_timer_charges_each_lap_to_its_phase_after_the_device_work(device: str) -> None:
    timer = PhaseTimer(torch.device(device))
    time.sleep(0.03)
    timer.lap("first")
    a = torch.randn(2048, 2048, device=device)
    for _ in range(20 if device == "cuda" else 1):
        a = a @ a / 2048**0.5
    timer.lap("work")
    # the work queued on the device has finished when its lap ends
    assert device != "cuda" or torch.cuda.current_stream().query()
    time.sleep(0.02)
    timer.lap("first")
    assert list(timer.seconds) == ["first", "work"]
    assert timer.seconds["first"] >= 0.05 and timer.seconds["work"] > 0
    assert timer.summary() == f"first {timer.seconds['first']:.2f} s, work {timer.seconds['work']:.2f} s"
    # a given order holds whichever phase ran first; phases it does not name follow
    ordered = PhaseTimer(torch.device(device), ("work", "unused", "first"))
    for name in ("other", "first", "work"):
        ordered.lap(name)
    assert list(ordered.seconds) == ["work", "first", "other"]


@pytest.mark.parametrize("device", DEVICES)
def test_benchmarks_name_the_machine_they_ran_on(device: str) -> None:
    text = device_description(torch.device(device))
    assert text.startswith(f"{device} (") and text.endswith(f"), torch {torch.__version__}")
    name = text[len(device) + 2 : text.rindex("), torch")]  # CPU model names hold brackets too: "Intel(R) Xeon(R) ..."
    assert name == torch.cuda.get_device_name() if device == "cuda" else name.endswith(f", {torch.get_num_threads()} threads")


def test_memory_share_keeps_the_budget_and_at_least_half_for_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    from cryotorch import runtime

    monkeypatch.setattr(runtime, "device_memory_bytes", lambda device: 10e9)
    cpu = torch.device("cpu")
    alone = runtime.memory_share(cpu, 1e9)
    assert alone.available_bytes == pytest.approx(7e9)
    assert alone.describe() == "the 7 GB this process may use (80 % of this device's 10 GB, less 1 GB for the working arrays of compute.memory_budget_gb)"
    # four processes on the node: 2 GB each, of which a budget of 2.7 GB may keep only half
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    shared = runtime.memory_share(cpu, runtime.working_arrays_bytes(runtime.CPU_MEMORY_BUDGET_BYTES))
    assert shared.available_bytes == pytest.approx(1e9)
    assert "shared by 4 processes, less 1 GB for the working arrays" in shared.describe()
    # images preloaded into the same memory come off first; the budget keeps half of the rest
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    preloaded = runtime.memory_share(cpu, 4e9, 3e9)
    assert (preloaded.kept_bytes, preloaded.available_bytes) == (pytest.approx(2.5e9), pytest.approx(2.5e9))
    assert "less 3 GB of images held by data.preload=true, less 2.5 GB for the working arrays" in preloaded.describe()
    assert runtime.memory_share(cpu, 1e9, 9e9).available_bytes < 0
