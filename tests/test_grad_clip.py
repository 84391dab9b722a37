"""Gradient-spike clipping (``train --grad-clip-factor``): the limit follows the running median of the norms,
ordinary steps are untouched, and a version-1 run (trained before the option) keeps training without it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from particle_vae.engine.run_config import RunConfig
from particle_vae.engine.trainer import GRAD_CLIP_WARMUP, GradientSpikeClipper, TrainSettings
from particle_vae.models import MODELS


def step(clipper: GradientSpikeClipper, parameter: torch.nn.Parameter, norm: float) -> float:
    """Give ``parameter`` a gradient of ``norm``, clip, return the norm after clipping."""
    parameter.grad = torch.tensor([norm * 0.6, norm * 0.8])
    clipper([parameter])
    return float(parameter.grad.norm())


def test_spikes_are_cut_to_factor_times_the_running_median_and_ordinary_steps_are_not():
    parameter = torch.nn.Parameter(torch.zeros(2))
    clipper = GradientSpikeClipper(factor=20.0, window=50, warmup=GRAD_CLIP_WARMUP)
    first = step(clipper, parameter, 1e6)  # no history yet: never clipped during the warm-up
    assert first == pytest.approx(1e6)
    norms = [step(clipper, parameter, value) for value in [2.0, 4.0] * 20]
    assert norms == pytest.approx([2.0, 4.0] * 20)  # within 20 x median: untouched
    # the median of the 41 unclipped norms so far (torch takes the lower middle value)
    history = sorted([1e6] + [2.0, 4.0] * 20)
    limit = 20.0 * history[(len(history) - 1) // 2]
    assert step(clipper, parameter, 5000.0) == pytest.approx(limit, rel=1e-6)
    assert clipper.take_clipped() == 1 and clipper.take_clipped() == 0


def test_clipper_state_round_trip_and_off_switch():
    parameter = torch.nn.Parameter(torch.zeros(2))
    clipper = GradientSpikeClipper(20.0)
    for value in range(1, 30):
        step(clipper, parameter, float(value))
    copy = GradientSpikeClipper(20.0)
    copy.load_state_dict(clipper.state_dict())
    assert step(copy, parameter, 1e5) == pytest.approx(step(clipper, parameter, 1e5))
    off = GradientSpikeClipper(0.0)
    for _ in range(GRAD_CLIP_WARMUP + 5):
        step(off, parameter, 1.0)
    assert step(off, parameter, 1e9) == pytest.approx(1e9)


def test_runs_of_schema_version_1_keep_training_without_clipping(tmp_path):
    settings = {k: v for k, v in vars(TrainSettings()).items() if k != "grad_clip_factor"}
    model = {"model": "vae", **vars(MODELS["vae"].config_class(box=16))}
    raw = {"schema_version": 1, "data": {}, "train": settings, "ctf": False, "model": model, "pixel_size": 1.0, "box": 16,
           "class_values": None}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    config = RunConfig.read(path)
    assert config.train["grad_clip_factor"] == 0.0


def test_non_finite_norms_do_not_pull_the_limit_to_zero():
    parameter = torch.nn.Parameter(torch.zeros(2))
    clipper = GradientSpikeClipper(20.0)
    for step_number in range(30):
        step(clipper, parameter, math.inf if step_number % 3 else 1.0)
    assert step(clipper, parameter, 1.0) == pytest.approx(1.0)  # the median of the finite norms, 1
