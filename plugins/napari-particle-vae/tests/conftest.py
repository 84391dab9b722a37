"""Fixtures of the napari plugin's tests.

Tests marked ``gui`` need napari, a Qt binding, pytest-qt and a display
(pytest-xvfb starts Xvfb when it is installed). When any is missing they are
skipped with the reason, except on CI (``CI=true``), where they fail with that
one-line reason so a broken set-up cannot pass unnoticed. The other tests
only need the core package (``particle_vae``) and run everywhere: the plugin's
``src`` folder is put on ``sys.path`` when the plugin is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("napari_particle_vae") is None:
    sys.path.insert(0, str(PLUGIN / "src"))

INSTALL_HINT = ("pip install -e 'plugins/napari-particle-vae[test]' and apt-get install xvfb libxcb-icccm4 libxcb-keysyms1 "
                "(see docs/napari.md)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gui: needs napari, Qt, pytest-qt and a display (Xvfb); skipped without them, failed on CI")


def gui_problem() -> str | None:
    """Why the GUI tests cannot run here (one line), or ``None`` when they can."""
    for module, package in (("napari", "napari"), ("qtpy", "qtpy"), ("pytestqt", "pytest-qt"), ("npe2", "npe2")):
        if importlib.util.find_spec(module) is None:
            return f"GUI tests need {package}, which is not installed: {INSTALL_HINT}"
    try:
        import qtpy  # noqa: F401  (raises when no Qt binding is installed)
    except Exception as error:  # qtpy raises its own PythonQtError
        return f"GUI tests need a Qt binding (PyQt6): {type(error).__name__}: {error}; {INSTALL_HINT}"
    if importlib.util.find_spec("napari_particle_vae") is None or not _plugin_registered():
        return "the napari-particle-vae plugin is not installed (its reader/widget manifest is needed): " + INSTALL_HINT
    if not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM") != "offscreen":
        xvfb = "Xvfb is installed but pytest-xvfb did not start it" if shutil.which("Xvfb") else "no Xvfb"
        return f"GUI tests need a display: DISPLAY is unset and {xvfb}; {INSTALL_HINT}"
    return None


def _plugin_registered() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "napari-particle-vae" for ep in entry_points(group="napari.manifest"))


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("gui") is None:
        return
    problem = gui_problem()
    if problem is None:
        return
    if _on_ci():
        pytest.fail(f"CI=true but {problem}", pytrace=False)
    pytest.skip(problem)


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory) -> Path:
    """A tiny simulated run (three shapes, 120 particles, one epoch) built once per test session.

    Returns the folder (``data/``, ``run/``, ``particles_vae.star``, ``analysis/clustered_particles.star``).
    """
    import torch
    from napari_particle_vae.sample_data import make_sample_run

    folder = tmp_path_factory.mktemp("sample_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        make_sample_run(folder, n=120, epochs=1, k=3)
    finally:
        torch.set_num_threads(threads)
    return folder


def write_synthetic_star(folder: Path, n: int, box: int = 16, stack_images: int = 100, pixel_size: float = 2.0,
                         seed: int = 0) -> Path:
    """A particle STAR of ``n`` rows written like ``particle-vae infer``'s output, over one small stack.

    The stack ``particles.mrcs`` holds ``stack_images`` noise images ``(box, box)``
    that the rows reuse in turn (row ``i`` shows image ``i % stack_images``), so
    a STAR of hundreds of thousands of particles is written in about a second.
    Columns: ``rlnAnglePsi``, ``rlnOriginX/YAngst``, ``pvaeZ1``, ``pvaeZ2`` (four
    blobs centred on the class) and ``rlnClassNumber`` (1-4).

    Returns:
        The STAR path (``folder / "particles_vae.star"``).
    """
    import numpy as np

    from particle_vae.io.mrc import StackWriter
    from particle_vae.io.star import image_name, make_particle_star

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with StackWriter(folder / "particles.mrcs", box, pixel_size) as writer:
        writer.write(rng.normal(size=(stack_images, box, box)).astype(np.float32))
    classes = rng.integers(1, 5, n)
    centres = np.array([[0.0, 0.0], [-2.0, -2.0], [2.0, -1.0], [0.0, 2.5], [3.0, 3.0]])
    latents = centres[classes] + rng.normal(scale=0.6, size=(n, 2))
    star = make_particle_star([image_name(i % stack_images, "particles.mrcs") for i in range(n)], pixel_size, box, columns={
        "rlnAnglePsi": rng.uniform(-180, 180, n), "rlnOriginXAngst": rng.normal(size=n), "rlnOriginYAngst": rng.normal(size=n),
        "pvaeZ1": latents[:, 0], "pvaeZ2": latents[:, 1], "rlnClassNumber": classes})
    path = folder / "particles_vae.star"
    star.write(path)
    return path


@pytest.fixture
def synthetic_star():
    """:func:`write_synthetic_star` (a factory: ``synthetic_star(folder, n, ...)`` -> STAR path)."""
    return write_synthetic_star
