"""Clustering of per-particle latent means and the choice of the number of clusters.

Inputs are the latent posterior means written by ``infer`` (``pvaeZ1..k``),
an ``(N, d)`` array in the prior's units (the prior is N(0, I)); nothing is
rescaled. Three methods:

* ``kmeans``: k-means (Lloyd, 10 initialisations), centres are the centroids;
* ``gmm``: Gaussian mixture with full covariances (3 initialisations), labels
  are the most probable component, centres the component means;
* ``ward``: agglomerative clustering with Ward linkage (the tree is built
  once, on at most ``WARD_MAX_FIT`` particles drawn at random; every particle
  is then given the cluster of the nearest centre), centres are member means.

``--k auto`` (:func:`suggest_k`) scores every k in a range (``1..10`` by
default) and says how strongly the data support the choice:

* ``gmm``: the Bayesian information criterion of the Gaussian mixture, lowest
  wins (``k = 1`` included). ``exp(-BIC_k / 2)`` approximates the marginal
  likelihood of k (Schwarz 1978), so the normalised weights are approximate
  posterior probabilities of each k (equal prior over the range), and the BIC
  difference to the runner-up is graded on Kass & Raftery's (1995) scale.
* ``kmeans``, ``ward``: first the gap statistic (Tibshirani, Walther & Hastie
  2001) tests one population against several: the pooled within-cluster sum of
  squares of k-means, ``W_k``, is compared with its mean over uniform reference
  sets in the box of the data's principal axes, ``Gap(k) = E*[log W*_k] -
  log W_k``, and k = 1 is kept by their one-standard-error rule ``Gap(1) >=
  Gap(2) - s_2``. Among unimodal (log-concave) populations the uniform one
  gains most from a split, so one population is rejected only when a split
  gains more than it does on uniform data. When it is rejected, the mean
  silhouette coefficient picks k among ``k >= 2`` (highest wins) and is graded
  on Kaufman & Rousseeuw's (1990) scale. Both are computed on at most
  ``SILHOUETTE_SAMPLE`` particles.

Clusters are numbered by size, largest first (ties by first appearance), so
the numbering does not depend on the library's random initialisation order.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from particle_vae.engine.presets import MASS_TOLERANCE

log = logging.getLogger(__name__)

METHODS = ("kmeans", "gmm", "ward")
#: criterion name per method, and whether larger is better
CRITERIA = {"kmeans": ("silhouette", True), "ward": ("silhouette", True), "gmm": ("bic", False)}
#: most particles the Ward tree is built on (its memory grows as N^2)
WARD_MAX_FIT = 5000
#: most particles the silhouette score is computed on (its cost grows as N^2)
SILHOUETTE_SAMPLE = 5000
#: default upper end of the k range searched by ``--k auto``
DEFAULT_K_MAX = 10
#: uniform reference sets of the gap statistic (Tibshirani et al. 2001 use 10 to 20)
GAP_REFERENCES = 20
#: Kass & Raftery (1995): BIC difference (about 2 ln Bayes factor) -> strength of the evidence for the better k
BIC_EVIDENCE = ((10.0, "very strong"), (6.0, "strong"), (2.0, "positive"), (float("-inf"), "weak"))
#: Kaufman & Rousseeuw (1990): mean silhouette -> structure found (> 0.70 strong, > 0.50 reasonable, > 0.25 weak)
SILHOUETTE_EVIDENCE = ((0.70, "strong"), (0.50, "reasonable"), (0.25, "weak"), (float("-inf"), "none"))

#: up to this many particles, clustering runs on one thread (thread start-up and
#: contention with other processes cost far more than they gain on small sets)
SINGLE_THREAD_MAX = 20_000

_LATENT_RE = re.compile(r"^pvaeZ(\d+)$")


def _thread_limit(n: int):
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1 if n <= SINGLE_THREAD_MAX else None)


def latent_columns(particles: pd.DataFrame, prefix: str = "pvaeZ") -> list[str]:
    """The latent-mean columns ``pvaeZ1..k`` of a particle table, in numeric order.

    ``pvaeZStd*`` columns are not included. Returns ``[]`` when there are none.
    """
    pattern = _LATENT_RE if prefix == "pvaeZ" else re.compile(rf"^{re.escape(prefix)}(\d+)$")
    found = [(int(m.group(1)), c) for c in particles.columns if (m := pattern.match(str(c)))]
    return [c for _, c in sorted(found)]


@dataclass
class ClusterResult:
    """Clusters of ``N`` latent vectors.

    Attributes:
        labels: ``(N,)`` int64 cluster ids ``0..k-1`` (0 = largest cluster).
        centres: ``(k, d)`` float64 cluster centres in latent units.
        counts: ``(k,)`` int64 particles per cluster.
        method: ``"kmeans"``, ``"gmm"`` or ``"ward"``.
        info: method details for the record (e.g. inertia, log-likelihood).
    """

    labels: np.ndarray
    centres: np.ndarray
    counts: np.ndarray
    method: str
    info: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.centres.shape[0])


@dataclass
class GapTest:
    """The gap statistic's test of one population against several (Tibshirani, Walther & Hastie 2001).

    Attributes:
        gap_1, gap_2: ``Gap(k) = E*[log W*_k] - log W_k`` for k = 1 and 2, with ``W_k`` the
            pooled within-cluster sum of squares of k-means (latent units squared) and
            ``E*`` the mean over uniform reference sets in the box of the data's principal axes.
        se_2: ``s_2 = sd(log W*_2) * sqrt(1 + 1 / references)``.
        z: ``(gap_2 - gap_1) / se_2``: how much more a split into two gains on the data
            than on uniform data, in standard errors; one population when ``z <= 1``
            (the one-standard-error rule ``Gap(1) >= Gap(2) - s_2``).
        references: number of uniform reference sets.
        particles: latent vectors used (a random subset of at most ``SILHOUETTE_SAMPLE``).
    """

    gap_1: float
    gap_2: float
    se_2: float
    z: float
    references: int
    particles: int

    @property
    def one_population(self) -> bool:
        return not self.z > 1.0

    def record(self) -> dict:
        """JSON-ready values (infinities as strings)."""
        def number(value: float):
            return round(value, 6) if np.isfinite(value) else str(value)

        return {"test": "gap statistic", "gap_1": number(self.gap_1), "gap_2": number(self.gap_2),
                "se_2": number(self.se_2), "z": number(self.z), "one_population": self.one_population,
                "references": self.references, "particles": self.particles}


@dataclass
class KSelection:
    """Scores of each candidate number of clusters, and how strongly the data support the choice.

    Attributes:
        k: the suggested number of clusters.
        criterion: ``"bic"`` (lower is better) or ``"silhouette"`` (higher is better).
        scores: candidate k -> score (silhouette: only ``k >= 2``; k = 1 is judged by ``single_population``).
        strength: the evidence for ``k`` on the criterion's published scale: BIC (Kass & Raftery)
            ``"very strong"``, ``"strong"``, ``"positive"``, ``"weak"``; silhouette (Kaufman &
            Rousseeuw) ``"strong"``, ``"reasonable"``, ``"weak"``, ``"none"``; k = 1 by the gap
            statistic ``"strong"`` (a split gains less than on uniform data) or ``"weak"``;
            ``"untested"`` when the range held one k.
        evidence: one sentence with the numbers behind ``strength``.
        caution: a sentence for the user when the evidence is weak, else ``None``.
        single_population: the test of one population against several (``None`` when the
            range does not start at 1): for ``gmm`` the approximate posterior probability of
            k = 1, for ``kmeans``/``ward`` the :class:`GapTest` record.
        probabilities: ``gmm`` only: candidate k -> approximate posterior probability (BIC weights).
    """

    k: int
    criterion: str
    scores: dict[int, float]
    strength: str = "untested"
    evidence: str = ""
    caution: str | None = None
    single_population: dict | None = None
    probabilities: dict[int, float] | None = None

    def record(self) -> dict:
        """How k was chosen, for ``analysis.json``."""
        return {"strength": self.strength, "evidence": self.evidence, "caution": self.caution,
                "single_population": self.single_population,
                "probabilities": None if self.probabilities is None else {str(k): round(p, 6) for k, p in self.probabilities.items()}}


def _check_z(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"latents must be an (N, d) array with N > 0, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("latents contain NaN or Inf values")
    return z


def _member_means(z: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    centres = np.zeros((k, z.shape[1]))
    counts = np.bincount(labels, minlength=k)
    np.add.at(centres, labels, z)
    return centres / np.maximum(counts, 1)[:, None]


def nearest_centre(z: np.ndarray, centres: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index of the nearest centre (Euclidean) for each row, in bounded memory."""
    out = np.empty(len(z), dtype=np.int64)
    for start in range(0, len(z), chunk):
        part = z[start:start + chunk]
        out[start:start + chunk] = ((part[:, None, :] - centres[None, :, :]) ** 2).sum(-1).argmin(1)
    return out


def _ward_tree(z: np.ndarray, seed: int):
    """Ward linkage on (a random subset of) ``z``: ``(linkage matrix, fitted row indices)``."""
    from scipy.cluster.hierarchy import linkage

    rows = np.arange(len(z))
    if len(z) > WARD_MAX_FIT:
        rows = np.sort(np.random.default_rng(seed).choice(len(z), WARD_MAX_FIT, replace=False))
        log.info("ward: building the tree on %d of %d particles (random subset); the rest go to the nearest centre",
                 WARD_MAX_FIT, len(z))
    return linkage(z[rows], method="ward"), rows


def _ward_labels(z: np.ndarray, tree, rows: np.ndarray, k: int) -> np.ndarray:
    from scipy.cluster.hierarchy import fcluster

    fitted = fcluster(tree, t=k, criterion="maxclust").astype(np.int64) - 1
    # fcluster may give fewer clusters than asked when distances tie; renumber densely
    _, fitted = np.unique(fitted, return_inverse=True)
    if len(rows) == len(z):
        return fitted
    centres = _member_means(z[rows], fitted, int(fitted.max()) + 1)
    return nearest_centre(z, centres)


def _relabel_by_size(labels: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renumber so that cluster 0 is the largest (ties: the one seen first)."""
    k = centres.shape[0]
    counts = np.bincount(labels, minlength=k)
    first = np.full(k, len(labels))
    seen, where = np.unique(labels, return_index=True)
    first[seen] = where
    order = np.lexsort((first, -counts))  # new id -> old id
    mapping = np.empty(k, dtype=np.int64)
    mapping[order] = np.arange(k)
    return mapping[labels], centres[order], counts[order]


def fit_clusters(z, k: int, method: str = "kmeans", seed: int = 0) -> ClusterResult:
    """Cluster latent means into ``k`` groups.

    Args:
        z: ``(N, d)`` latent means (prior units).
        k: number of clusters, ``1 <= k <= N``.
        method: ``"kmeans"``, ``"gmm"`` or ``"ward"``.
        seed: random seed of the initialisations (and of the Ward subset).
    Returns:
        A :class:`ClusterResult`, clusters numbered by size (0 = largest).
    Raises:
        ValueError: unknown method, ``k`` out of range, non-finite latents.
    """
    z = _check_z(z)
    with _thread_limit(len(z)):
        return _fit_clusters(z, k, method, seed)


def _fit_clusters(z: np.ndarray, k: int, method: str, seed: int) -> ClusterResult:
    k = int(k)
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r} (choose from {', '.join(METHODS)})")
    if not 1 <= k <= len(z):
        raise ValueError(f"k = {k} clusters needs 1 <= k <= {len(z)} (the number of particles)")
    info: dict = {}
    if method == "kmeans":
        from sklearn.cluster import KMeans

        fitted = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(z)
        labels, centres = fitted.labels_.astype(np.int64), fitted.cluster_centers_.astype(np.float64)
        info["inertia"] = float(fitted.inertia_)
    elif method == "gmm":
        from sklearn.mixture import GaussianMixture

        fitted = GaussianMixture(n_components=k, covariance_type="full", n_init=3, random_state=seed, reg_covar=1e-6).fit(z)
        labels, centres = fitted.predict(z).astype(np.int64), fitted.means_.astype(np.float64)
        info["bic"] = float(fitted.bic(z))
        info["mean_log_likelihood"] = float(fitted.score(z))
    else:
        tree, rows = _ward_tree(z, seed)
        labels = _ward_labels(z, tree, rows, k)
        centres = _member_means(z, labels, k)
    empty = np.flatnonzero(np.bincount(labels, minlength=k) == 0)
    if empty.size:
        log.warning("%s: %d of %d clusters received no particle", method, empty.size, k)
    labels, centres, counts = _relabel_by_size(labels, centres)
    return ClusterResult(labels=labels, centres=centres, counts=counts.astype(np.int64), method=method, info=info)


def merge_groups(z, groups, k: int, seed: int = 0, mass=None, mass_tolerance: float = MASS_TOLERANCE,
                 join=None) -> ClusterResult:
    """Cluster whole groups of particles (e.g. the classes of ``infer``'s pose refinement) into ``k`` clusters.

    Each group is represented by the mean latent of its particles and, when
    ``mass`` is given, by the log of its mass divided by ``mass_tolerance``; the
    points are clustered by k-means weighted by the group sizes, and every
    particle takes its group's cluster. Where the groups are purer than latent
    clusters (pose refinement compares the images themselves), the clusters
    inherit that purity.

    The mass of a class (the integrated density of its reference, which is the
    same for every view of one structure) separates structures whose views the
    latents mix: with the default tolerance of 0.1, two classes whose masses
    differ by 10% are as far apart as two whose latent means differ by one
    prior standard deviation along one axis.

    Args:
        z: ``(N, d)`` latent means (prior units).
        groups: ``(N,)`` int group of each particle (any integers).
        k: number of clusters, ``1 <= k <=`` the number of groups.
        seed: random seed of the k-means initialisations.
        mass: ``(N,)`` mass of each particle's group (any positive unit; the same value within a
            group); ``None``: the latents alone. Values at or below zero (an empty or flat
            reference) count as 1% of the median positive mass.
        mass_tolerance: relative mass difference worth one latent standard deviation (> 0).
        join: ``(N,)`` the group whose cluster each particle takes instead of its own group's (e.g.
            infer's class that fits the particle best at low resolution); a value that is no
            particle's group leaves the particle with its own group's. ``None``: every particle
            takes its own group's cluster.
    Returns:
        A :class:`ClusterResult` (method ``"kmeans"``, clusters numbered by size, centres the
        member means of ``z``), its ``info`` holding ``groups`` (the number of groups),
        ``inertia``, ``mass`` (whether the masses were used) and ``moved`` (particles whose
        cluster ``join`` changed).
    Raises:
        ValueError: ``k`` out of range, mismatched lengths, non-finite latents or masses,
            ``mass_tolerance`` not positive.
    """
    from sklearn.cluster import KMeans

    z = _check_z(z)
    groups = np.asarray(groups)
    if groups.shape != (len(z),):
        raise ValueError(f"{len(groups)} group numbers for {len(z)} particles")
    names, members = np.unique(groups, return_inverse=True)
    if not 1 <= int(k) <= len(names):
        raise ValueError(f"k = {k} clusters of {len(names)} groups needs 1 <= k <= {len(names)}")
    sizes = np.bincount(members).astype(np.float64)
    points = np.stack([z[members == j].mean(0) for j in range(len(names))])
    if mass is not None:
        points = np.hstack([points, _log_mass(mass, members, len(names), len(z))[:, None] / _positive(mass_tolerance)])
    with _thread_limit(len(z)):
        fitted = KMeans(n_clusters=int(k), n_init=10, random_state=seed).fit(points, sample_weight=sizes)
    cluster_of_group = fitted.labels_.astype(np.int64)
    own = cluster_of_group[members]
    labels = own
    if join is not None:
        join = np.asarray(join)
        if join.shape != (len(z),):
            raise ValueError(f"{len(join)} joined groups for {len(z)} particles")
        where = np.clip(np.searchsorted(names, join), 0, len(names) - 1)
        known = names[where] == join
        labels = np.where(known, cluster_of_group[where], own)
    moved = int((labels != own).sum())
    labels, centres, counts = _relabel_by_size(labels, _member_means(z, labels, int(k)))
    return ClusterResult(labels=labels, centres=centres, counts=counts.astype(np.int64), method="kmeans",
                         info={"groups": int(len(names)), "inertia": float(fitted.inertia_), "mass": mass is not None,
                               "moved": moved})


def _positive(value: float) -> float:
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"the mass tolerance must be a positive number, got {value}")
    return float(value)


def _log_mass(mass, members: np.ndarray, n_groups: int, n: int) -> np.ndarray:
    """``(G,)`` log of each group's mean mass (non-positive masses raised to 1% of the median positive one)."""
    mass = np.asarray(mass, dtype=np.float64)
    if mass.shape != (n,):
        raise ValueError(f"{len(mass)} masses for {n} particles")
    if not np.isfinite(mass).all():
        raise ValueError("the class masses contain NaN or Inf values")
    per_group = np.bincount(members, weights=mass, minlength=n_groups) / np.bincount(members, minlength=n_groups)
    positive = per_group[per_group > 0]
    floor = 0.01 * (np.median(positive) if len(positive) else 1.0)
    return np.log(np.maximum(per_group, floor))


def default_k_range(method: str, n: int, k_max: int = DEFAULT_K_MAX) -> tuple[int, int]:
    """``(k_min, k_max)`` searched by :func:`suggest_k`: from 1 up to ``k_max``, capped
    by the number of particles (``N`` for BIC, ``N - 1`` for the silhouette)."""
    return 1, max(1, min(k_max, n if method == "gmm" else n - 1))


def _graded(value: float, scale) -> str:
    """The label of the first ``(threshold, label)`` of ``scale`` that ``value`` exceeds (else the last label)."""
    return next((label for threshold, label in scale if value > threshold), scale[-1][1])


def gap_test(z, seed: int = 0, references: int = GAP_REFERENCES) -> GapTest:
    """Test one population against several with the gap statistic (see :class:`GapTest`).

    Args:
        z: ``(N, d)`` latent means (prior units), ``N >= 2``.
        seed: seeds the subset (above ``SILHOUETTE_SAMPLE`` particles), the reference sets and k-means.
        references: number of uniform reference sets ``B``.
    Returns:
        A :class:`GapTest`; identical latents give ``z = -inf`` (one population), latents
        with exactly two distinct values ``z = +inf``.
    """
    z = _check_z(z)
    if len(z) < 2:
        raise ValueError(f"the gap statistic needs at least 2 latent vectors, got {len(z)}")
    with _thread_limit(len(z)):
        return _gap_test(z, seed, references)


def _gap_test(z: np.ndarray, seed: int, references: int) -> GapTest:
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    if len(z) > SILHOUETTE_SAMPLE:
        z = z[np.sort(rng.choice(len(z), SILHOUETTE_SAMPLE, replace=False))]
    centred = z - z.mean(0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    rotated = centred @ axes.T  # the reference box is aligned with the principal axes (Tibshirani et al., method b)
    low, high = rotated.min(0), rotated.max(0)

    def log_dispersions(points: np.ndarray) -> tuple[float, float]:
        """``log W_1, log W_2`` (``-inf`` for a zero sum of squares)."""
        total = float(((points - points.mean(0)) ** 2).sum())
        if total == 0.0:
            return float("-inf"), float("-inf")
        split = float(KMeans(n_clusters=2, n_init=10, random_state=seed).fit(points).inertia_)
        with np.errstate(divide="ignore"):
            return float(np.log(total)), float(np.log(split))

    data_1, data_2 = log_dispersions(rotated)
    if not np.isfinite(data_1):  # every latent vector identical
        return GapTest(gap_1=0.0, gap_2=0.0, se_2=0.0, z=float("-inf"), references=0, particles=len(z))
    reference = np.array([log_dispersions(rng.uniform(low, high, size=rotated.shape)) for _ in range(references)])
    gap_1 = float(reference[:, 0].mean() - data_1)
    gap_2 = float(reference[:, 1].mean() - data_2)
    se_2 = float(reference[:, 1].std() * np.sqrt(1.0 + 1.0 / references))
    if not np.isfinite(gap_2):
        score = float("inf")
    else:
        score = (gap_2 - gap_1) / se_2 if se_2 > 0 else float("inf") if gap_2 > gap_1 else float("-inf")
    return GapTest(gap_1=gap_1, gap_2=gap_2, se_2=se_2, z=float(score), references=references, particles=len(z))


def suggest_k(z, method: str = "kmeans", k_range: tuple[int, int] | None = None, seed: int = 0) -> KSelection:
    """Score every ``k`` in ``k_range`` (inclusive) and pick the best.

    ``gmm``: BIC of a full-covariance Gaussian mixture, lowest wins.
    ``kmeans`` / ``ward``: with k = 1 in the range, the gap statistic first tests
    one population against several (:func:`gap_test`); otherwise (or when it is
    rejected) the mean silhouette coefficient (Euclidean) of that method's
    clusters picks the highest-scoring ``k >= 2`` (both on at most
    ``SILHOUETTE_SAMPLE`` particles). The result says how strong the evidence is
    (see the module docstring and :class:`KSelection`).

    Args:
        z: ``(N, d)`` latent means.
        k_range: ``(k_min, k_max)``; default :func:`default_k_range`.
    Returns:
        A :class:`KSelection`; ties go to the smaller k.
    Raises:
        ValueError: a range the method cannot score (``kmeans``/``ward``
            ``1 <= k <= N - 1``, ``gmm`` ``1 <= k <= N``).
    """
    z = _check_z(z)
    with _thread_limit(len(z)):
        return _suggest_k(z, method, k_range, seed)


def _suggest_k(z: np.ndarray, method: str, k_range, seed: int) -> KSelection:
    n = len(z)
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r} (choose from {', '.join(METHODS)})")
    k_min, k_max = k_range if k_range is not None else default_k_range(method, n)
    criterion, _ = CRITERIA[method]
    low, high = (1, n) if criterion == "bic" else (1, max(1, n - 1))
    if k_min > k_max or k_min < low or k_max > high:
        scorer = "bic" if criterion == "bic" else "the gap statistic (k = 1) and the silhouette (k >= 2)"
        raise ValueError(f"{scorer} can score k from {low} to {high} for {n} particles; got the range {k_min}..{k_max}")
    if criterion == "bic":
        selection = _suggest_by_bic(z, k_min, k_max, seed)
    else:
        selection = _suggest_by_gap_and_silhouette(z, method, k_min, k_max, seed)
    log.info("suggested k = %d (evidence %s): %s", selection.k, selection.strength, selection.evidence)
    return selection


def _suggest_by_bic(z: np.ndarray, k_min: int, k_max: int, seed: int) -> KSelection:
    from sklearn.mixture import GaussianMixture

    scores: dict[int, float] = {}
    for k in range(k_min, k_max + 1):
        model = GaussianMixture(n_components=k, covariance_type="full", n_init=3, random_state=seed, reg_covar=1e-6).fit(z)
        scores[k] = float(model.bic(z))
        log.info("k = %d: BIC %.6g", k, scores[k])
    best = min(scores, key=lambda key: (scores[key], key))
    # exp(-BIC/2) approximates each k's marginal likelihood: normalised, the approximate posterior probabilities
    relative = np.array([scores[k] - scores[best] for k in scores])
    weights = np.exp(-relative / 2.0)
    probabilities = {k: float(w) for k, w in zip(scores, weights / weights.sum())}
    single = {"test": "bic", "p_one_population": round(probabilities[1], 6)} if 1 in scores else None
    if len(scores) == 1:
        return KSelection(k=best, criterion="bic", scores=scores, strength="untested", single_population=single,
                          probabilities=probabilities, evidence=f"only k = {best} was searched")
    runner_up = min((k for k in scores if k != best), key=lambda key: (scores[key], key))
    margin = scores[runner_up] - scores[best]
    strength = _graded(margin, BIC_EVIDENCE)
    evidence = (f"BIC gives k = {best} an approximate posterior probability of {probabilities[best]:.3g} "
                f"(runner-up k = {runner_up}: {probabilities[runner_up]:.3g}, BIC {margin:.3g} higher: {strength} evidence "
                f"on Kass & Raftery's scale)")
    if single is not None and best != 1:
        evidence += f"; one population: {probabilities[1]:.3g}"
    caution = None
    if strength == "weak":
        caution = (f"k = {best} and k = {runner_up} are about equally supported (BIC differs by {margin:.3g} < 2); "
                   f"look at latent_scatter.png and compare --k {best} with --k {runner_up}")
    return KSelection(k=best, criterion="bic", scores=scores, strength=strength, evidence=evidence, caution=caution,
                      single_population=single, probabilities=probabilities)


def _suggest_by_gap_and_silhouette(z: np.ndarray, method: str, k_min: int, k_max: int, seed: int) -> KSelection:
    from sklearn.metrics import silhouette_score

    n = len(z)
    scores: dict[int, float] = {}
    if k_max >= 2:
        sample = SILHOUETTE_SAMPLE if n > SILHOUETTE_SAMPLE else None
        tree = rows = None
        if method == "ward":
            tree, rows = _ward_tree(z, seed)
        for k in range(max(2, k_min), k_max + 1):
            if method == "ward":
                labels = _ward_labels(z, tree, rows, k)
            else:
                from sklearn.cluster import KMeans

                labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)
            if len(np.unique(labels)) < 2:
                scores[k] = float("-inf")
            else:
                scores[k] = float(silhouette_score(z, labels, sample_size=sample, random_state=seed))
            log.info("k = %d: silhouette %.4f", k, scores[k])
    if k_min == k_max == 1:
        return KSelection(k=1, criterion="silhouette", scores=scores, strength="untested", evidence="only k = 1 was searched")
    best_split = max(scores, key=lambda key: (scores[key], -key))
    split_strength = _graded(scores[best_split], SILHOUETTE_EVIDENCE)
    silhouette_text = (f"silhouette {scores[best_split]:.3g} at k = {best_split}: {split_strength} structure on "
                       f"Kaufman & Rousseeuw's scale")
    if k_min >= 2:
        caution = None
        if split_strength in ("weak", "none"):
            caution = (f"the clusters overlap ({silhouette_text}) and one population was not tested (--k-range starts "
                       f"at {k_min}); treat the classes as uncertain or search from 1")
        return KSelection(k=best_split, criterion="silhouette", scores=scores, strength=split_strength,
                          evidence=f"{silhouette_text}; k = 1 not tested (--k-range starts at {k_min})", caution=caution)
    gap = gap_test(z, seed)
    log.info("gap statistic: Gap(1) %.4g, Gap(2) %.4g, s_2 %.3g, z = (Gap(2) - Gap(1)) / s_2 = %.3g", gap.gap_1, gap.gap_2,
             gap.se_2, gap.z)
    gap_text = (f"gap statistic z = {gap.z:.3g} (how much more a split in two gains than on uniform data, in standard "
                f"errors; more than one population needs z > 1)")
    if gap.one_population:
        strength = "strong" if gap.z <= 0 else "weak"
        caution = None
        if strength == "weak":
            caution = (f"one population by the gap statistic's one-standard-error rule, but a split gains more than on "
                       f"uniform data ({gap.z:.3g} standard errors); a second population may be present: look at "
                       f"latent_scatter.png and try --k 2")
        return KSelection(k=1, criterion="silhouette", scores=scores, strength=strength, caution=caution,
                          evidence=f"{gap_text}; best split: {silhouette_text}", single_population=gap.record())
    caution = None
    if split_strength in ("weak", "none"):
        caution = (f"more than one population (gap statistic), but the clusters overlap ({silhouette_text}); treat the "
                   f"class boundaries, and k, as uncertain")
    return KSelection(k=best_split, criterion="silhouette", scores=scores, strength=split_strength,
                      evidence=f"{gap_text}; {silhouette_text}", caution=caution, single_population=gap.record())


# --------------------------------------------------------------------------- selection


def class_rows(particles: pd.DataFrame, classes, column: str = "rlnClassNumber") -> np.ndarray:
    """Boolean mask ``(N,)`` of the rows whose ``column`` is one of ``classes``.

    Raises:
        KeyError: the table has no ``column``.
        ValueError: a requested class does not occur in the table (the message lists those present).
    """
    if column not in particles.columns:
        raise KeyError(column)
    values = particles[column].to_numpy()
    try:
        values = values.astype(np.int64)
    except (TypeError, ValueError):
        raise ValueError(f"{column} holds values that are not class numbers") from None
    present = np.unique(values)
    wanted = np.asarray(list(classes), dtype=np.int64)
    missing = sorted(set(wanted.tolist()) - set(present.tolist()))
    if missing:
        shown = ", ".join(str(int(v)) for v in present[:20]) + (" ..." if len(present) > 20 else "")
        raise ValueError(f"no particle has {column} {', '.join(map(str, missing))} (present: {shown})")
    return np.isin(values, wanted)


def box_rows(particles: pd.DataFrame, columns, bounds) -> np.ndarray:
    """Boolean mask ``(N,)`` of the rows inside an axis-aligned box (bounds inclusive).

    Args:
        columns: ``D`` column names (e.g. ``["pvaeZ1", "pvaeZ2"]``).
        bounds: ``2 * D`` numbers ``min_1 max_1 min_2 max_2 ...`` in the columns' units.
    Raises:
        KeyError: a column is missing.
        ValueError: wrong number of bounds, a minimum above its maximum, or non-numeric values.
    """
    columns = list(columns)
    bounds = np.asarray(bounds, dtype=np.float64).reshape(-1)
    if bounds.size != 2 * len(columns):
        raise ValueError(f"{len(columns)} column(s) need {2 * len(columns)} bounds (min max per column), got {bounds.size}")
    mask = np.ones(len(particles), dtype=bool)
    for i, column in enumerate(columns):
        if column not in particles.columns:
            raise KeyError(column)
        low, high = bounds[2 * i], bounds[2 * i + 1]
        if low > high:
            raise ValueError(f"the range of {column} has its minimum {low:g} above its maximum {high:g}")
        try:
            values = particles[column].to_numpy(dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{column} is not numeric") from None
        mask &= (values >= low) & (values <= high)
    return mask


def score_clusters(z, labels, criterion: str, seed: int = 0, bic: float | None = None) -> float | None:
    """The criterion of :func:`suggest_k` for given clusters, for the record.

    ``"silhouette"``: mean silhouette coefficient of ``labels`` (``None`` unless
    ``2 <= clusters <= N - 1``); ``"bic"``: returns ``bic`` (the fitted
    mixture's, see :attr:`ClusterResult.info`).
    """
    if criterion == "bic":
        return bic
    z = _check_z(z)
    labels = np.asarray(labels)
    if not 2 <= len(np.unique(labels)) <= len(z) - 1:
        return None
    from sklearn.metrics import silhouette_score

    with _thread_limit(len(z)):
        sample = SILHOUETTE_SAMPLE if len(z) > SILHOUETTE_SAMPLE else None
        return float(silhouette_score(z, labels, sample_size=sample, random_state=seed))
