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

``--k auto`` (:func:`suggest_k`) scores every k in a range: the Bayesian
information criterion of the Gaussian mixture for ``gmm`` (lower is better;
``k = 1`` allowed) and the mean silhouette coefficient for ``kmeans`` and
``ward`` (higher is better; ``k >= 2``), computed on at most
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
class KSelection:
    """Scores of each candidate number of clusters.

    Attributes:
        k: the suggested number of clusters.
        criterion: ``"bic"`` (lower is better) or ``"silhouette"`` (higher is better).
        scores: candidate k -> score.
    """

    k: int
    criterion: str
    scores: dict[int, float]


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


def default_k_range(method: str, n: int, k_max: int = DEFAULT_K_MAX) -> tuple[int, int]:
    """``(k_min, k_max)`` searched by :func:`suggest_k`: from 1 (``gmm``) or 2
    up to ``k_max``, capped by the number of particles (``N`` for BIC, ``N - 1``
    for the silhouette)."""
    if method == "gmm":
        return 1, max(1, min(k_max, n))
    return 2, max(2, min(k_max, n - 1))


def suggest_k(z, method: str = "kmeans", k_range: tuple[int, int] | None = None, seed: int = 0) -> KSelection:
    """Score every ``k`` in ``k_range`` (inclusive) and pick the best.

    ``gmm``: BIC of a full-covariance Gaussian mixture, lowest wins.
    ``kmeans`` / ``ward``: mean silhouette coefficient (Euclidean) of that
    method's clusters, highest wins (on at most ``SILHOUETTE_SAMPLE`` particles).

    Args:
        z: ``(N, d)`` latent means.
        k_range: ``(k_min, k_max)``; default :func:`default_k_range`.
    Returns:
        A :class:`KSelection`; ties go to the smaller k.
    Raises:
        ValueError: a range the criterion cannot score (silhouette needs
            ``2 <= k <= N - 1``, BIC ``1 <= k <= N``).
    """
    z = _check_z(z)
    with _thread_limit(len(z)):
        return _suggest_k(z, method, k_range, seed)


def _suggest_k(z: np.ndarray, method: str, k_range, seed: int) -> KSelection:
    n = len(z)
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r} (choose from {', '.join(METHODS)})")
    k_min, k_max = k_range if k_range is not None else default_k_range(method, n)
    criterion, larger_better = CRITERIA[method]
    low, high = (1, n) if criterion == "bic" else (2, n - 1)
    if k_min > k_max or k_min < low or k_max > high:
        raise ValueError(f"{criterion} can score k from {low} to {high} for {n} particles; got the range {k_min}..{k_max}")
    scores: dict[int, float] = {}
    if criterion == "bic":
        from sklearn.mixture import GaussianMixture

        for k in range(k_min, k_max + 1):
            model = GaussianMixture(n_components=k, covariance_type="full", n_init=3, random_state=seed, reg_covar=1e-6).fit(z)
            scores[k] = float(model.bic(z))
            log.info("k = %d: BIC %.6g", k, scores[k])
    else:
        from sklearn.metrics import silhouette_score

        sample = SILHOUETTE_SAMPLE if n > SILHOUETTE_SAMPLE else None
        tree = rows = None
        if method == "ward":
            tree, rows = _ward_tree(z, seed)
        for k in range(k_min, k_max + 1):
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
    sign = -1.0 if larger_better else 1.0
    best = min(scores, key=lambda key: (sign * scores[key], key))
    log.info("suggested k = %d (%s %s)", best, "highest" if larger_better else "lowest", criterion)
    return KSelection(k=int(best), criterion=criterion, scores=scores)


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
