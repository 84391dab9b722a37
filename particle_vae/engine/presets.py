"""Named settings: the papers' configurations and a small CPU one.

A preset is three dicts (model, preprocessing, training); command-line options
override single entries. ``particle-vae train`` logs what the preset set.
"""

from __future__ import annotations

import math

#: TARGET-VAE paper, training of every experiment: Adam at learning rate 2e-4, halved after 10 epochs
#: without a better validation ELBO, early stopping after 20, at most 500 epochs, minibatches of 100
#: (the same values are the trainer's defaults; docs/training.md gives the sources)
PAPER_TRAINING: dict = {"epochs": 500, "batch_size": 100, "lr": 2e-4, "lr_patience": 10, "early_stop_patience": 20,
                        "val_fraction": 0.1}

TRAINING_PRESETS: dict[str, dict] = {
    # TARGET-VAE paper, MNIST(N)/(U): 50x50, 128 fields, kernel 28, padding 8, 1x1 layers shared
    # across rotation channels (the authors' encoder), 2 x 512 generator with 1024 Fourier
    # features (512 frequencies, a cosine and a sine each), p(t) std 5 px; theta prior normal
    # for MNIST(N). Where a value differs from the paper, docs/training.md says why.
    "mnist": {
        "model": {"n_fields": 128, "kernel": 28, "padding": 8, "mixing": "shared", "gen_layers": 2, "gen_hidden": 512,
                  "n_fourier": 512, "fourier_bandwidth": 0.1, "translation_prior_std": 5.0, "likelihood": "bernoulli"},
        "preprocessing": {},
        "train": dict(PAPER_TRAINING),
    },
    # Particles (EMPIAR-10025 400 px boxes / 4, EMPIAR-10029 200 px / 2: both 100 px),
    # 6 generator layers, uniform prior over rotations, Gaussian likelihood, the MNIST generator's
    # 1024 Fourier features.
    "particles": {
        "model": {"n_fields": 128, "kernel": 65, "padding": 4, "mixing": "shared", "gen_layers": 6, "gen_hidden": 512,
                  "n_fourier": 512, "fourier_bandwidth": 0.1, "translation_prior_std": 5.0, "theta_prior": "uniform",
                  "likelihood": "gaussian"},
        "preprocessing": {"target_box": 100, "normalize": "background"},
        "train": dict(PAPER_TRAINING),
    },
    # Minutes on a laptop CPU, for demos and tests (not the paper's): small encoder and generator,
    # 32 px boxes, a fast learning rate, short patience so that a 10-epoch demo can still halve it.
    "tiny": {
        "model": {"n_fields": 16, "kernel": None, "padding": 2, "gen_layers": 2, "gen_hidden": 128, "n_fourier": 64,
                  "translation_prior_std": 3.0, "likelihood": "gaussian"},
        "preprocessing": {"target_box": 32, "normalize": "background"},
        "train": {"epochs": 100, "batch_size": 32, "lr": 1e-3, "lr_patience": 3, "early_stop_patience": 10,
                  "val_fraction": 0.1},
    },
}

#: class references of infer's pose refinement, at most one per REFINE_PARTICLES_PER_CLASS particles: more
#: references hold fewer views each. On the SNR 0.1 low-SNR benchmark (2,400 particles) 20, 40, 60, 80 and
#: 100 classes gave origins of 1.63, 1.34, 1.17, 1.01 and 1.09 px and refinement-class purities of 0.92, 0.96,
#: 0.97, 0.986 and 0.982 (docs/benchmarks.md): below about 30 particles a class's average gets too noisy
REFINE_CLASSES = 80
REFINE_PARTICLES_PER_CLASS = 30

#: analyze: relative difference of two refinement classes' masses that counts as much as one prior standard
#: deviation of their mean latents when the classes are grouped (:func:`particle_vae.analysis.clustering.merge_groups`);
#: on the SNR 0.1 low-SNR benchmark's 40 classes 0.02, 0.1 and 0.2 group the same (docs/analysis.md)
MASS_TOLERANCE = 0.1

#: which preset a benchmark uses by default, and its theta prior
BENCHMARK_THETA_PRIOR = {"mnist-n": ("normal", math.pi / 4), "mnist-u": ("uniform", None),
                         "so2": ("uniform", None), "se2": ("uniform", None)}


def resolve_kernel(kernel: int | None, box: int) -> int:
    """A kernel of ``None`` means "about half the box, odd"."""
    if kernel is not None:
        return int(kernel)
    half = max(box // 2, 3)
    return half if half % 2 else half + 1
