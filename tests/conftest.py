"""Shared fixtures. Reference data comes from $PARTICLE_VAE_DATA or ../shared/data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[1]
_DEFAULT_DATA = REPO.parent / "shared" / "data"


def _data_root() -> Path | None:
    value = os.environ.get("PARTICLE_VAE_DATA")
    root = Path(value) if value else _DEFAULT_DATA
    return root if root.is_dir() else None


def on_ci() -> bool:
    """True under CI (``CI=true``, as .ci/run sets), where a test must not skip for want of data or programs."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the running test with ``reason``, or fail it under CI, where a skip would let the suite pass
    while testing little."""
    if on_ci():
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def unavailable() -> Callable[[str], NoReturn]:
    """:func:`skip_or_fail`, for a test that finds something it needs missing (``unavailable(reason)``)."""
    return skip_or_fail


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The reference data folder; tests that need it skip with a reason when it is absent,
    and fail instead under CI (``CI=true``)."""
    root = _data_root()
    if root is None:
        skip_or_fail("reference data not found: set PARTICLE_VAE_DATA or place it at ../shared/data")
    return root


@pytest.fixture(scope="session")
def cryoem_dir(data_root: Path) -> Path:
    return data_root / "cryoem"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/data/fixtures: a few-kB set of files in the layout of the reference data's, written by make_fixtures.py
    there (README.md; manifest.json says what each holds). It ships with the tests, so a test using it never skips."""
    return Path(__file__).resolve().parent / "data" / "fixtures"


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
