"""The latent-space scatter plot without Qt: coordinates, colours, drawing and selection geometry.

The plot shows one point per particle (``M`` points, ``M = N`` except for
t-SNE on large sets). For large ``M`` it stays fast by drawing

* the density of *all* points as a 2D histogram image (log counts, grey), and
* a fixed random subset of at most ``max_points`` points on top, coloured,

while selections (lasso polygon, rectangle, nearest point) are computed on
all ``M`` points with vectorised numpy (``matplotlib.path.Path.contains_points``
for the lasso). Drawing uses a plain matplotlib ``Figure``, so the same code
renders into the Qt canvas of the widget and into an Agg canvas in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from napari_particle_vae.run_data import MAX_CATEGORIES

#: points drawn individually; beyond this a density image of all points is drawn under a random subset
MAX_POINTS_DRAWN = 20_000
#: bins per axis of the density image
DENSITY_BINS = 256
#: t-SNE embeds at most this many particles (a random subset beyond; its cost grows as M log M per iteration)
MAX_TSNE_POINTS = 5000
#: projections offered besides "two columns"
PROJECTIONS = ("columns", "pca", "tsne")


@dataclass
class Embedding:
    """2D coordinates of particles in the plot.

    Attributes:
        coords: ``(M, 2)`` float64 plot coordinates.
        rows: ``(M,)`` int64 STAR row of each point.
        labels: axis labels ``(x, y)``.
        kind: ``"columns"``, ``"pca"`` or ``"tsne"``.
        latent_dims: for ``"columns"``: 0-based latent dimension of each axis
            (``None`` where an axis is not a latent column).
        pca: for ``"pca"``: the fitted scikit-learn PCA (to map plot points back to latents).
    """

    coords: np.ndarray
    rows: np.ndarray
    labels: tuple[str, str]
    kind: str
    latent_dims: tuple[int | None, int | None] = (None, None)
    pca: object = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def embed_columns(table: pd.DataFrame, x_column: str, y_column: str, latent_columns: list[str]) -> Embedding:
    """Plot two columns of the table against each other (rows with NaN in either are left out)."""
    for name in (x_column, y_column):
        if name not in table.columns:
            raise KeyError(f"no column {name}")
    coords = table[[x_column, y_column]].to_numpy(dtype=np.float64)
    finite = np.isfinite(coords).all(axis=1)
    rows = np.flatnonzero(finite).astype(np.int64)
    dims = tuple(latent_columns.index(c) if c in latent_columns else None for c in (x_column, y_column))
    return Embedding(coords=coords[finite], rows=rows, labels=(x_column, y_column), kind="columns", latent_dims=dims)


def embed_pca(latents: np.ndarray, seed: int = 0) -> Embedding:
    """First two principal components of the ``(N, k)`` latents (axis labels give the explained variance).

    With ``k == 1`` the single latent is plotted against zero; with ``k == 2`` the
    components are a rotation of the latents.
    """
    from sklearn.decomposition import PCA

    latents = np.asarray(latents, dtype=np.float64)
    rows = np.arange(len(latents), dtype=np.int64)
    if latents.shape[1] == 1:
        coords = np.concatenate([latents, np.zeros_like(latents)], axis=1)
        return Embedding(coords=coords, rows=rows, labels=("pvaeZ1", ""), kind="columns", latent_dims=(0, None))
    pca = PCA(n_components=2, random_state=seed).fit(latents)
    ratio = pca.explained_variance_ratio_
    labels = (f"PC1 ({100 * ratio[0]:.0f}% of variance)", f"PC2 ({100 * ratio[1]:.0f}% of variance)")
    return Embedding(coords=pca.transform(latents), rows=rows, labels=labels, kind="pca", pca=pca)


def embed_tsne(latents: np.ndarray, seed: int = 0, max_points: int = MAX_TSNE_POINTS) -> Embedding:
    """t-SNE of the latents (scikit-learn, perplexity ``min(30, (M - 1) / 3)``, PCA initialisation).

    At most ``max_points`` particles are embedded (a random subset with ``seed``
    beyond); the other particles are not in the plot and cannot be selected in it.
    """
    from sklearn.manifold import TSNE

    latents = np.asarray(latents, dtype=np.float64)
    rows = np.arange(len(latents), dtype=np.int64)
    if len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_points, replace=False))
    if len(rows) < 5:
        raise ValueError(f"t-SNE needs at least 5 particles, got {len(rows)}")
    perplexity = float(max(1.0, min(30.0, (len(rows) - 1) / 3)))
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(latents[rows])
    return Embedding(coords=np.asarray(coords, dtype=np.float64), rows=rows, labels=("t-SNE 1", "t-SNE 2"), kind="tsne")


def latent_at(embedding: Embedding, point, latents: np.ndarray, neighbours: int = 20) -> np.ndarray:
    """The latent vector ``(k,)`` that a point ``(x, y)`` of the plot stands for.

    * axes that are latent columns: those dimensions take the point's
      coordinates, the others the median of all particles;
    * PCA: the inverse transform of the point;
    * otherwise (t-SNE, non-latent columns): the mean latent of the
      ``neighbours`` particles nearest to the point in the plot.
    """
    latents = np.asarray(latents, dtype=np.float64)
    x, y = float(point[0]), float(point[1])
    if embedding.kind == "pca" and embedding.pca is not None:
        return embedding.pca.inverse_transform(np.array([[x, y]]))[0]
    dims = embedding.latent_dims
    if embedding.kind == "columns" and dims[0] is not None and (dims[1] is not None or latents.shape[1] == 1):
        z = np.median(latents, axis=0)
        z[dims[0]] = x
        if dims[1] is not None:
            z[dims[1]] = y
        return z
    scale = _axis_scale(embedding.coords)
    distance = (((embedding.coords - [x, y]) / scale) ** 2).sum(axis=1)
    nearest = np.argsort(distance)[: max(1, min(neighbours, len(distance)))]
    return latents[embedding.rows[nearest]].mean(axis=0)


# ----------------------------------------------------------------------------- colours


@dataclass
class Colouring:
    """Colour of each plotted point.

    Attributes:
        column: the table column, or ``None`` (one colour).
        categorical: classes (integer values, at most ``MAX_CATEGORIES``) or a continuous scale.
        values: ``(M,)`` the column's values at the embedding's rows.
        categories: sorted distinct values when categorical.
    """

    column: str | None
    categorical: bool
    values: np.ndarray
    categories: np.ndarray = field(default_factory=lambda: np.zeros(0))


def colouring(table: pd.DataFrame, column: str | None, rows: np.ndarray) -> Colouring:
    """Colours for the points at STAR ``rows``: categorical for integer-like columns with few values."""
    if column is None or column not in table.columns:
        return Colouring(column=None, categorical=False, values=np.zeros(len(rows)))
    values = table[column].to_numpy()[rows]
    numeric = pd.api.types.is_numeric_dtype(table[column])
    if numeric:
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        integer_like = finite.size > 0 and np.all(np.round(finite) == finite)
        distinct = np.unique(finite)
        if integer_like and distinct.size <= MAX_CATEGORIES:
            return Colouring(column=column, categorical=True, values=values, categories=distinct)
        return Colouring(column=column, categorical=False, values=values)
    distinct = pd.unique(pd.Series(values))
    if len(distinct) <= MAX_CATEGORIES:
        return Colouring(column=column, categorical=True, values=values.astype(object), categories=np.asarray(sorted(map(str, distinct)), dtype=object))
    return Colouring(column=None, categorical=False, values=np.zeros(len(rows)))


def category_colours(count: int) -> np.ndarray:
    """``(count, 4)`` RGBA colours: tab10 up to 10 classes, tab20 up to 20, then a sampled turbo map."""
    from matplotlib import colormaps

    if count <= 10:
        return np.asarray([colormaps["tab10"](i) for i in range(count)])
    if count <= 20:
        return np.asarray([colormaps["tab20"](i) for i in range(count)])
    return colormaps["turbo"](np.linspace(0, 1, count))


# ----------------------------------------------------------------------------- selection geometry


def points_in_polygon(coords: np.ndarray, vertices) -> np.ndarray:
    """``(M,)`` bool: which of the ``(M, 2)`` points lie inside the polygon ``(V, 2)`` (lasso)."""
    from matplotlib.path import Path as PolygonPath

    vertices = np.asarray(vertices, dtype=np.float64).reshape(-1, 2)
    if len(vertices) < 3:
        return np.zeros(len(coords), dtype=bool)
    return PolygonPath(vertices).contains_points(np.asarray(coords, dtype=np.float64))


def points_in_rectangle(coords: np.ndarray, x_range, y_range) -> np.ndarray:
    """``(M,)`` bool: points with ``x`` in ``x_range`` and ``y`` in ``y_range`` (inclusive, any order of the bounds)."""
    coords = np.asarray(coords, dtype=np.float64)
    x0, x1 = sorted(map(float, x_range))
    y0, y1 = sorted(map(float, y_range))
    x, y = coords[:, 0], coords[:, 1]
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def _axis_scale(coords: np.ndarray) -> np.ndarray:
    span = np.ptp(coords, axis=0) if len(coords) else np.ones(2)
    return np.where(span > 0, span, 1.0)


def nearest_point(coords: np.ndarray, point, max_distance: float = 0.02) -> int | None:
    """Index of the point nearest to ``point`` in axis-normalised units, or ``None`` if farther than ``max_distance``.

    Distances are measured after dividing each axis by the data's range, so
    ``max_distance = 0.02`` means 2% of the plot's width or height.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if len(coords) == 0:
        return None
    scale = _axis_scale(coords)
    distance = (((coords - np.asarray(point, dtype=np.float64)) / scale) ** 2).sum(axis=1)
    best = int(np.argmin(distance))
    return best if distance[best] <= max_distance ** 2 else None


def combine(previous: np.ndarray, new: np.ndarray, mode: str = "replace") -> np.ndarray:
    """Combine boolean masks: ``replace`` (new), ``add`` (union) or ``remove`` (previous minus new)."""
    if mode == "replace":
        return new.copy()
    if mode == "add":
        return previous | new
    if mode == "remove":
        return previous & ~new
    raise ValueError(f"unknown selection mode {mode!r} (replace, add or remove)")


def draw_subset(count: int, max_points: int = MAX_POINTS_DRAWN, seed: int = 0) -> np.ndarray:
    """Indices of the points drawn individually: all when ``count <= max_points``, else a fixed random subset."""
    if count <= max_points:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, max_points, replace=False))


def density_image(coords: np.ndarray, bins: int = DENSITY_BINS) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """2D histogram of all points: ``(counts (bins, bins) indexed [y, x], extent (x0, x1, y0, y1))``."""
    coords = np.asarray(coords, dtype=np.float64)
    x0, y0 = coords.min(axis=0)
    x1, y1 = coords.max(axis=0)
    if x1 <= x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 <= y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    counts, _, _ = np.histogram2d(coords[:, 1], coords[:, 0], bins=bins, range=[[y0, y1], [x0, x1]])
    return counts, (float(x0), float(x1), float(y0), float(y1))


# ----------------------------------------------------------------------------- drawing


class ScatterPlot:
    """Draws an :class:`Embedding` with a :class:`Colouring` and a selection into a matplotlib figure.

    Args:
        figure: a ``matplotlib.figure.Figure`` (Qt canvas or Agg).
        max_points: points drawn individually (see the module docstring).
    Attributes:
        axes: the plot's axes; drawn: ``(D,)`` indices of the individually drawn points.
        density: whether the density image was drawn (``M > max_points``).
    """

    def __init__(self, figure, max_points: int = MAX_POINTS_DRAWN):
        self.figure = figure
        self.max_points = int(max_points)
        self.axes = figure.add_subplot(111)
        self.drawn = np.zeros(0, dtype=np.int64)
        self.density = False
        self._embedding: Embedding | None = None
        self._selection_artist = None
        self._marker_artist = None
        self._colorbar = None
        self.on_redraw: Callable[[], None] | None = None

    def draw(self, embedding: Embedding, colours: Colouring, selected_rows: np.ndarray | None = None,
             title: str | None = None) -> None:
        """Redraw everything. ``selected_rows``: ``(N,)`` bool mask over STAR rows, or ``None``."""
        fig, ax = self.figure, self.axes
        if self._colorbar is not None:
            self._colorbar.remove()
            self._colorbar = None
        ax.clear()
        self._embedding = embedding
        self._selection_artist = self._marker_artist = None
        coords = embedding.coords
        self.drawn = draw_subset(len(coords), self.max_points)
        self.density = len(coords) > self.max_points
        if len(coords) == 0:
            ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes)
            return
        if self.density:
            counts, extent = density_image(coords)
            ax.imshow(np.log1p(counts), origin="lower", extent=extent, aspect="auto", cmap="Greys", interpolation="nearest",
                      alpha=0.9, zorder=0)
        shown = coords[self.drawn]
        size = 12 if len(shown) < 2000 else 4 if len(shown) < 10000 else 1.5
        alpha = 0.9 if len(shown) < 2000 else 0.5
        if colours.column is None:
            ax.scatter(shown[:, 0], shown[:, 1], s=size, c="tab:blue", alpha=alpha, linewidths=0, zorder=1, rasterized=True)
        elif colours.categorical:
            palette = category_colours(len(colours.categories))
            values = colours.values[self.drawn]
            all_values = colours.values
            for i, category in enumerate(colours.categories):
                inside = _equal(values, category)
                count = int(_equal(all_values, category).sum())
                label = f"{_format_category(category)} ({count})"
                ax.scatter(shown[inside, 0], shown[inside, 1], s=size, color=palette[i], alpha=alpha, linewidths=0,
                           label=label, zorder=1, rasterized=True)
            ax.legend(title=colours.column, fontsize=7, title_fontsize=7, markerscale=max(1.0, 6 / size), loc="best",
                      framealpha=0.8)
        else:
            artist = ax.scatter(shown[:, 0], shown[:, 1], s=size, c=colours.values[self.drawn], cmap="viridis", alpha=alpha,
                                linewidths=0, zorder=1, rasterized=True)
            self._colorbar = fig.colorbar(artist, ax=ax, fraction=0.05, pad=0.02)
            self._colorbar.set_label(colours.column, fontsize=7)
            self._colorbar.ax.tick_params(labelsize=7)
        ax.set_xlabel(embedding.labels[0], fontsize=8)
        ax.set_ylabel(embedding.labels[1], fontsize=8)
        ax.tick_params(labelsize=7)
        note = f"{len(coords):,} particles" + (f" ({len(self.drawn):,} drawn over their density)" if self.density else "")
        ax.set_title(note if title is None else f"{title}\n{note}", fontsize=8)
        self.set_selection(selected_rows)

    def set_selection(self, selected_rows: np.ndarray | None) -> None:
        """Outline the selected points (at most ``max_points`` of them, a fixed subset) without a full redraw."""
        if self._selection_artist is not None:
            self._selection_artist.remove()
            self._selection_artist = None
        embedding = self._embedding
        if embedding is None or selected_rows is None or not np.any(selected_rows):
            return
        inside = np.flatnonzero(np.asarray(selected_rows)[embedding.rows])
        if inside.size > self.max_points:
            inside = inside[draw_subset(inside.size, self.max_points)]
        points = embedding.coords[inside]
        size = 22 if len(points) < 2000 else 6
        self._selection_artist = self.axes.scatter(points[:, 0], points[:, 1], s=size, facecolors="none", edgecolors="red",
                                                   linewidths=0.8, zorder=3, rasterized=True)

    def mark(self, point) -> None:
        """Show a cross at ``point`` ``(x, y)`` (the chosen latent point), or remove it with ``None``."""
        if self._marker_artist is not None:
            self._marker_artist.remove()
            self._marker_artist = None
        if point is not None:
            (self._marker_artist,) = self.axes.plot([point[0]], [point[1]], marker="X", color="black", markersize=10,
                                                    markeredgecolor="white", zorder=4)


def _equal(values: np.ndarray, category) -> np.ndarray:
    if values.dtype == object:
        return values.astype(str) == str(category)
    return values == category


def _format_category(value) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)
