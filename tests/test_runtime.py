"""The thread-pool start-up that makes the first parallel math op of a process exact."""

from __future__ import annotations

import subprocess
import sys

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
    # the fault, where a CPU has it, hits about one fresh process in ten, so this takes 16
    results = [
        subprocess.run([sys.executable, "-c", FIRST_OP], cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout.strip()
        for _ in range(16)
    ]
    assert results == ["True"] * 16
