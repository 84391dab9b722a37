"""Benchmark metrics on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from particle_vae.analysis.metrics import circular_correlation, cluster_latents, clustering_accuracy, pearson


def test_clustering_accuracy_is_permutation_invariant():
    true = np.array([0, 0, 1, 1, 2, 2])
    assert clustering_accuracy(true, [5, 5, 3, 3, 9, 9]) == 1.0
    assert clustering_accuracy(true, [1, 1, 1, 1, 2, 2]) == pytest.approx(4 / 6)
    # more clusters than labels: only one cluster may map to each label
    assert clustering_accuracy([0, 0, 0, 0], [0, 1, 2, 3]) == 0.25


def test_circular_correlation_cases():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 2 * np.pi, 500)
    assert circular_correlation(a, a + 1.3) == pytest.approx(1.0)
    assert circular_correlation(a, -a) == pytest.approx(-1.0)
    assert abs(circular_correlation(a, rng.uniform(0, 2 * np.pi, 500))) < 0.1
    # wrapping does not matter
    assert circular_correlation(a, np.mod(a + 3.0, 2 * np.pi) - np.pi) == pytest.approx(1.0)
    assert math.isnan(circular_correlation(a, np.zeros_like(a)))


def test_circular_correlation_hand_computed():
    a = np.array([0.0, np.pi / 2])
    b = np.array([0.0, np.pi / 4])
    # means: pi/4 and pi/8; sin terms: (-s1, s1) and (-s2, s2)
    assert circular_correlation(a, b) == pytest.approx(1.0)
    assert circular_correlation(a, -b) == pytest.approx(-1.0)


def test_pearson():
    x = np.arange(10.0)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert math.isnan(pearson(x, np.ones(10)))


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_cluster_latents_recovers_separated_blobs(method):
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [10, 0], [0, 10]])
    labels = np.repeat(np.arange(3), 50)
    z = centres[labels] + rng.normal(scale=0.5, size=(150, 2))
    assert clustering_accuracy(labels, cluster_latents(z, 3, method)) == 1.0
