"""The paper presets train as the TARGET-VAE paper does, and docs/training.md documents every preset value."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from particle_vae.engine.presets import PAPER_TRAINING, TRAINING_PRESETS
from particle_vae.engine.trainer import TrainSettings

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def test_paper_training_is_the_papers():
    # Adam lr 2e-4, halved after 10 epochs without improvement, early stop after 20, 500 epochs, batch 100
    assert PAPER_TRAINING == {"epochs": 500, "batch_size": 100, "lr": 2e-4, "lr_patience": 10, "early_stop_patience": 20,
                              "val_fraction": 0.1}


def test_trainer_defaults_are_the_papers():
    defaults = {f.name: f.default for f in fields(TrainSettings)}
    for name, value in PAPER_TRAINING.items():
        assert defaults[name] == value, name


@pytest.mark.parametrize("name", ["mnist", "particles"])
def test_paper_presets_set_the_papers_training_themselves(name):
    assert TRAINING_PRESETS[name]["train"] == PAPER_TRAINING
    TrainSettings(**TRAINING_PRESETS[name]["train"])  # every key is a training setting


def test_tiny_preset_sets_all_its_training_values():
    # the fast preset must not inherit the paper's 500 epochs and long patience through the defaults
    assert set(TRAINING_PRESETS["tiny"]["train"]) >= {"epochs", "batch_size", "lr", "lr_patience", "early_stop_patience"}
    TrainSettings(**TRAINING_PRESETS["tiny"]["train"])


@pytest.mark.parametrize("name", sorted(TRAINING_PRESETS))
def test_docs_list_every_preset_value(name):
    """Each setting of each preset has a row in the per-value table of docs/training.md."""
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index(f"#### `{name}` preset"):]
    section = section[:section.index("\n#", 1)]
    for group in ("model", "preprocessing", "train"):
        for setting in TRAINING_PRESETS[name].get(group, {}):
            assert f"| `{setting}` |" in section, (name, setting)
