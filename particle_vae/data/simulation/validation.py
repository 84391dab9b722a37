"""Checks of a :class:`~particle_vae.data.simulation.config.SimulationConfig`: impossible
settings raise a one-line :class:`~particle_vae.errors.InputFileError`."""

from __future__ import annotations

import numpy as np

from particle_vae.data.simulation.config import SHIFT_DISTRIBUTIONS, SNR_MODES, VIEWS, SimulationConfig
from particle_vae.errors import InputFileError


def _settings_error(message: str, fix: str | None = None) -> InputFileError:
    return InputFileError(message, None, fix)


def validate_config(config: SimulationConfig) -> None:
    """Reject impossible settings with a one-line :class:`InputFileError`."""
    if not config.structures:
        raise _settings_error("no structure to simulate", "pass --structure PATH or a preset")
    if int(config.n) < 1:
        raise _settings_error(f"--n {config.n}: need at least one particle")
    if int(config.box) < 8:
        raise _settings_error(f"--box {config.box} is too small", "use a box of at least 8 px")
    if not config.pixel_size > 0:
        raise _settings_error(f"--pixel-size {config.pixel_size} must be positive")
    if config.downsample_to is not None and not 8 <= int(config.downsample_to) <= int(config.box):
        raise _settings_error(f"--downsample-to {config.downsample_to} must lie between 8 and the simulation box ({config.box} px)",
                              "give a smaller --downsample-to or a larger --box")
    if config.resolution is not None and not config.resolution > 0:
        raise _settings_error(f"--resolution {config.resolution} must be positive (Angstrom)")
    if config.views not in VIEWS:
        raise _settings_error(f"unknown view set '{config.views}'", f"choose one of {', '.join(VIEWS)}")
    if config.shift_distribution not in SHIFT_DISTRIBUTIONS:
        raise _settings_error(f"unknown shift distribution '{config.shift_distribution}'",
                              f"choose one of {', '.join(SHIFT_DISTRIBUTIONS)}")
    if not 0 <= config.max_shift < config.output_box / 2:
        raise _settings_error(f"--max-shift {config.max_shift} px is impossible in a {config.output_box} px box",
                              f"use 0 <= max shift < {config.output_box / 2:g} px")
    if config.snr is not None and not (config.snr > 0):
        raise _settings_error(f"--snr {config.snr} must be positive", "use e.g. 0.1, or inf for noise-free particles")
    if config.snr_mode not in SNR_MODES:
        raise _settings_error(f"unknown SNR mode '{config.snr_mode}'", f"choose one of {', '.join(SNR_MODES)}")
    if config.ctf_premultiplied and not config.ctf:
        raise _settings_error("--ctf-premultiplied multiplies the particles by their CTF, but the CTF is off (--no-ctf)",
                              "drop --no-ctf or --ctf-premultiplied")
    if not config.voltage > 0 or config.cs < 0 or not 0 <= config.amplitude_contrast < 1:
        raise _settings_error(f"impossible optics: {config.voltage} kV, Cs {config.cs} mm, amplitude contrast {config.amplitude_contrast}",
                              "voltage must be positive, Cs non-negative and amplitude contrast in [0, 1)")
    low, high = config.defocus_range
    if not 0 < low <= high or config.max_astigmatism < 0 or config.max_astigmatism / 2 >= low:
        raise _settings_error(f"impossible defocus range {low}-{high} A with astigmatism {config.max_astigmatism} A",
                              "use 0 < min <= max (Angstrom, underfocus positive)")
    if config.class_weights is not None:
        weights = np.asarray(config.class_weights, dtype=np.float64)
        if weights.shape != (len(config.structures),) or (weights < 0).any() or not weights.sum() > 0:
            raise _settings_error(f"class weights {list(config.class_weights)} do not fit {len(config.structures)} structure(s)",
                                  "give one non-negative weight per structure")
    if int(config.batch_size) < 1:
        raise _settings_error(f"--batch-size {config.batch_size} must be at least 1")
    names = [s.name for s in config.structures]
    if len(set(names)) != len(names):
        raise _settings_error(f"structure names {names} are not unique", "rename the files or give distinct names")
