"""Shared fixtures. Reference data comes from $PARTICLE_VAE_DATA or ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_DEFAULT_DATA = REPO.parent / "shared" / "data"


def _data_root() -> Path | None:
    value = os.environ.get("PARTICLE_VAE_DATA")
    root = Path(value) if value else _DEFAULT_DATA
    return root if root.is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The reference data folder; tests that need it skip with a reason when it is absent,
    and fail instead under CI (``CI=true``), where a skip would let the suite pass while testing little."""
    root = _data_root()
    if root is None:
        message = "reference data not found: set PARTICLE_VAE_DATA or place it at ../shared/data"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: data-dependent tests must run)")
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def cryoem_dir(data_root: Path) -> Path:
    return data_root / "cryoem"


@pytest.fixture(scope="session")
def mnist_dir(data_root: Path) -> Path:
    return data_root / "mnist"


@pytest.fixture(scope="session")
def structures_dir(data_root: Path) -> Path:
    return data_root / "structures"


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny models on one torch thread: they gain nothing from
    intra-op threads, and oversubscription on a busy 2-core machine slows them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
