"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# devices every device-aware test runs on; the CUDA cases carry the `gpu` mark, so the
# default run (-m "not gpu") deselects them and `pytest -m gpu` runs them on a GPU machine
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real-data folder ``../shared/data`` (always present in CI).

    Its GPL/LGPL files are test inputs that may not be copied into ``tests/``, so tests read
    them in place and skip, saying why, where the folder is absent.
    """
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"shared real test data not found at {SHARED_DATA_DIR} (it is read in place, not copied into tests/)")
    return SHARED_DATA_DIR
