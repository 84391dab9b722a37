"""Simulation presets (:data:`SIMULATION_PRESETS`: ``t20s``, ``groel``, ``mixture``) and
:func:`preset_config`, which turns one into a validated configuration."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from particle_vae.data.simulation.config import SimulationConfig, StructureSpec
from particle_vae.data.simulation.validation import _settings_error, validate_config

log = logging.getLogger(__name__)

#: Relative path (under the data root) of the EMPIAR-10025 micrograph CTF table.
EMPIAR10025_CTF = "cryoem/empiar10025_metadata/ctf_params.star"

#: Preset settings; structure files are relative to ``<data root>/structures``.
SIMULATION_PRESETS: dict[str, dict] = {
    "t20s": {
        "description": "EMPIAR-10025-like T20S proteasome (PDB 3J9I), 64 px at 4 A",
        "structures": [("t20s", "t20s_3j9i.pdb", True)],
        "box": 64, "pixel_size": 4.0, "downsample_to": None,
        "voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1,
        "defocus_star": EMPIAR10025_CTF, "defocus_range": (13800.0, 19900.0), "max_astigmatism": 300.0,
        "max_shift": 3.0,
    },
    "groel": {
        "description": "EMPIAR-10029-like GroEL 14-mer (PDB 1OEL + BIOMT), 200 px at 1.35 A Fourier-cropped to 100 px at 2.7 A",
        "structures": [("groel", "groel_1oel.pdb", True)],
        "box": 200, "pixel_size": 1.35, "downsample_to": 100,
        "voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1,
        "defocus_star": None, "defocus_range": (10000.0, 25000.0), "max_astigmatism": 300.0,
        "max_shift": 5.0,
    },
    "mixture": {
        "description": "three classes (T20S, GroEL 14-mer, single GroEL heptamer ring), 64 px at 4 A",
        "structures": [("t20s", "t20s_3j9i.pdb", True), ("groel", "groel_1oel.pdb", True),
                       ("groel_ring", "groel_1oel.pdb", False)],
        "box": 64, "pixel_size": 4.0, "downsample_to": None,
        "voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1,
        "defocus_star": EMPIAR10025_CTF, "defocus_range": (13800.0, 19900.0), "max_astigmatism": 300.0,
        "max_shift": 3.0,
    },
}


def preset_config(
    preset: str,
    n: int,
    data_dir: str | Path | None = None,
    structures: Sequence[str | Path] | None = None,
    defocus_star: str | Path | None = None,
    **overrides,
) -> SimulationConfig:
    """Build the configuration of a preset (see :data:`SIMULATION_PRESETS`), with overrides.

    Structure files are looked up in ``<data root>/structures`` (``data_dir``
    or ``$PARTICLE_VAE_DATA``) unless ``structures`` lists the files (one
    class per file, named after the file stem, assemblies expanded). The
    EMPIAR-10025 CTF table is used for ``t20s``/``mixture`` when the data root
    has it; ``defocus_star`` replaces it. Overriding ``box`` without
    ``downsample_to`` turns the preset's downsampling off.

    Args:
        preset: ``t20s``, ``groel`` or ``mixture``.
        n: number of particles.
        overrides: any :class:`SimulationConfig` field (``None`` values are ignored).
    Returns:
        A validated :class:`SimulationConfig`.
    Raises:
        InputFileError: unknown preset, no data root when one is needed,
            impossible settings.
    """
    from particle_vae.io.paths import data_root

    if preset not in SIMULATION_PRESETS:
        raise _settings_error(f"unknown preset '{preset}'", f"choose one of {', '.join(SIMULATION_PRESETS)}")
    spec = SIMULATION_PRESETS[preset]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - set(SimulationConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown simulation settings: {sorted(unknown)}")
    root = None
    if structures:
        specs = [StructureSpec(Path(p), Path(p).stem, True) for p in structures]
        stems = [s.name for s in specs]
        if len(set(stems)) != len(stems):
            specs = [replace(s, name=f"{s.name}_{i + 1}") for i, s in enumerate(specs)]
    else:
        root = data_root(data_dir)
        specs = [StructureSpec(root / "structures" / filename, name, assembly) for name, filename, assembly in spec["structures"]]
    star = None
    if defocus_star is not None:
        star = Path(defocus_star)
    elif spec["defocus_star"] is not None:
        root = root if root is not None else data_root(data_dir, required=False)
        if root is not None and (root / spec["defocus_star"]).is_file():
            star = root / spec["defocus_star"]
        else:
            log.info("no %s under the data root; drawing defocus uniformly from %.0f-%.0f A", spec["defocus_star"], *spec["defocus_range"])
    values = {key: spec[key] for key in ("box", "pixel_size", "downsample_to", "voltage", "cs", "amplitude_contrast",
                                         "defocus_range", "max_astigmatism", "max_shift")}
    if "box" in overrides and "downsample_to" not in overrides:
        values["downsample_to"] = None
    values.update(overrides)
    config = SimulationConfig(structures=specs, n=int(n), defocus_star=star, preset=preset, **values)
    validate_config(config)
    return config
