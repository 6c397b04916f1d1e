"""The benchmark scripts of docs/benchmarks.md run on small sizes and print their figures.

They time nothing here (benchmarks report figures, tests assert behaviour): these runs only
show that each script still runs against the current code, on the CPU and, with ``-m gpu``,
on a GPU, before a long benchmark session depends on it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEVICES
from test_jobs import REPO


def script(*arguments: str) -> str:
    """Run ``python scripts/…`` from the repository root; returns its output."""
    result = subprocess.run([sys.executable, *arguments], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(arguments)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_estep_ops_and_online_benchmarks_run(device: str) -> None:
    estep = script("scripts/bench_estep.py", "--device", device, "--box", "32", "--radius", "8", "--order", "1", "--classes", "2", "--particles", "8")
    assert "E-step scoring:" in estep and "ratio to same-shape matmul" in estep
    ops = script("scripts/bench_ops.py", "--device", device, "--boxes", "16", "--n-slices", "8")
    assert "box 16: 8 slices" in ops and "insert + reconstruct" in ops and "copy bandwidth" in ops
    online = script("scripts/bench_class3d_online.py", "speed", "--device", device, "--boxes", "32", "--classes", "4", "--repeats", "1", "--batch-bytes", "4e6")
    assert "box 32, K 4:" in online and "particles·classes/s" in online


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_class3d_benchmark_runs(shared_data: Path, tmp_path: Path, device: str) -> None:
    # simulation, consensus, oracle and one aligned class3d iteration on 40 particles
    output = script(
        "scripts/bench_class3d.py", "--map", str(shared_data / "maps/aspire_70S/clean70SRibosome_vol_65p.mrc"), "--particles", "40",
        "--snr", "0.1", "--iterations", "1", "--modes", "align", "--workdir", str(tmp_path), "--class3d-overrides", f"compute.accelerator={device}",
    )
    assert "SNR 0.1: oracle accuracy" in output and "align: accuracy" in output and "median angular error" in output
    assert "ms per particle-iteration" in output and "coarse pass" in output
