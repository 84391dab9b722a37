"""Figures of an analysis, each written as a PNG together with the data drawn in it.

Every function takes the numbers to draw and output paths, writes the figure
(matplotlib's Agg renderer on a private ``Figure``, so the global pyplot state
and backend are never touched) and the data behind it (CSV or NPZ), and
returns the paths written. Files are written atomically. Images are shown with
``x`` to the right and ``y`` up (row 0 at the bottom, ``origin="lower"``), so a
counter-clockwise rotation in the conventions of
:mod:`particle_vae.conventions` looks counter-clockwise on screen; each image
is scaled to its own 1st-99th percentile range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from particle_vae.io.atomic import atomic_path

#: most points drawn in a scatter plot (a random subset beyond; the CSV has all)
MAX_SCATTER_POINTS = 100_000
#: most points embedded with t-SNE (a random subset beyond)
MAX_TSNE_POINTS = 5_000


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def save_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as CSV (no index) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def save_npz(path: str | Path, **arrays) -> Path:
    """Write arrays to an ``.npz`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def _colours(k: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "turbo"]
    return [cmap(i % cmap.N) if k <= 20 else cmap(i / max(k - 1, 1)) for i in range(k)]


def embed_latents(z, how: str = "pca", seed: int = 0, centres=None) -> tuple[np.ndarray, np.ndarray | None, list[str], np.ndarray]:
    """2D coordinates for a latent scatter plot.

    ``d == 1``: ``(z1, 0)`` (the scatter then spreads classes vertically); ``d == 2``: the latents themselves; ``d > 2``:
    the first two principal components (``how="pca"``). ``how="tsne"``:
    scikit-learn's t-SNE (perplexity ``min(30, (M - 1) / 3)``) on at most
    ``MAX_TSNE_POINTS`` particles.

    Args:
        z: ``(N, d)`` latent means; centres: optional ``(k, d)``.
    Returns:
        ``(coords (M, 2), centre coords (k, 2) or None, axis labels, rows (M,))``
        where ``rows`` are the particle rows embedded (all of them except for t-SNE
        on large sets). t-SNE centres are the mean embedding of each cluster's
        members and are returned as ``None`` here (see :func:`plot_latent_scatter`).
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    rows = np.arange(len(z))
    c = None if centres is None else np.asarray(centres, dtype=np.float64).reshape(-1, z.shape[1])
    if how == "tsne":
        from sklearn.manifold import TSNE

        if len(z) > MAX_TSNE_POINTS:
            rows = np.sort(np.random.default_rng(seed).choice(len(z), MAX_TSNE_POINTS, replace=False))
        from threadpoolctl import threadpool_limits

        perplexity = float(max(1.0, min(30.0, (len(rows) - 1) / 3)))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        # small sets: one thread (OpenMP start-up and contention cost more than they gain)
        with threadpool_limits(limits=1 if len(rows) <= 2000 else None):
            coords = tsne.fit_transform(z[rows])
        return coords, None, ["t-SNE 1", "t-SNE 2"], rows
    if how != "pca":
        raise ValueError(f"unknown embedding {how!r} (pca or tsne)")
    if z.shape[1] == 1:
        pad = lambda a: np.concatenate([a, np.zeros((len(a), 1))], axis=1)
        return pad(z), None if c is None else pad(c), ["pvaeZ1", ""], rows
    if z.shape[1] == 2:
        return z.copy(), c, ["pvaeZ1", "pvaeZ2"], rows
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=seed).fit(z)
    ratio = pca.explained_variance_ratio_
    labels = [f"PC{i + 1} ({100 * ratio[i]:.0f}% of variance)" for i in range(2)]
    return pca.transform(z), None if c is None else pca.transform(c), labels, rows


def plot_latent_scatter(z, labels, png: str | Path, csv: str | Path, centres=None, how: str = "pca", seed: int = 0,
                        title: str | None = None) -> list[Path]:
    """Scatter of latent means coloured by cluster (1-based class numbers in the legend).

    Args:
        z: ``(N, d)`` latent means; labels: ``(N,)`` cluster ids ``0..k-1``;
        centres: ``(k, d)`` cluster centres, drawn as crosses.
        how: ``"pca"`` or ``"tsne"`` (see :func:`embed_latents`).
    Writes:
        ``png`` and ``csv`` with columns ``row`` (0-based STAR row), ``x``, ``y``,
        ``rlnClassNumber``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    coords, centre_xy, axis_labels, rows = embed_latents(z, how, seed, centres)
    k = int(labels.max()) + 1 if centres is None else len(centres)
    if how != "tsne" and axis_labels[1] == "":
        # one latent dimension: spread the classes vertically (row = class number, slight jitter)
        jitter = np.random.default_rng(seed).uniform(-0.2, 0.2, len(rows))
        coords = np.stack([coords[:, 0], labels[rows] + 1 + jitter], axis=1)
        if centre_xy is not None:
            centre_xy = np.stack([centre_xy[:, 0], np.arange(1, len(centre_xy) + 1)], axis=1)
        axis_labels = [axis_labels[0], "class (jittered)"]
    if how == "tsne":
        centre_xy = np.array([coords[labels[rows] == j].mean(0) if (labels[rows] == j).any() else [np.nan, np.nan] for j in range(k)])
    frame = pd.DataFrame({"row": rows, "x": coords[:, 0], "y": coords[:, 1], "rlnClassNumber": labels[rows] + 1})
    shown = np.arange(len(rows))
    if len(shown) > MAX_SCATTER_POINTS:
        shown = np.sort(np.random.default_rng(seed).choice(len(shown), MAX_SCATTER_POINTS, replace=False))
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot()
    colours = _colours(k)
    size = float(np.clip(3000 / max(len(shown), 1), 1, 20))
    for j in range(k):
        member = shown[labels[rows][shown] == j]
        ax.scatter(coords[member, 0], coords[member, 1], s=size, color=colours[j], alpha=0.7, linewidths=0,
                   label=f"class {j + 1} ({int((labels == j).sum())})")
    if centre_xy is not None:
        ax.scatter(centre_xy[:, 0], centre_xy[:, 1], marker="X", s=120, c=[colours[j] for j in range(k)],
                   edgecolors="black", linewidths=1.0)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    if axis_labels[1] == "class (jittered)":
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    embedding = "t-SNE" if how == "tsne" else "PCA" if np.ndim(z) == 2 and np.shape(z)[1] > 2 else ""
    ax.set_title(title or f"latent means{f' ({embedding})' if embedding else ''} of {len(labels)} particles; x: cluster centres")
    ax.legend(loc="best", fontsize="small", markerscale=1.5, framealpha=0.8)
    return [save_figure(fig, png), save_csv(frame, csv)]


def _display_range(image: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(image, [1, 99])
    if not high > low:
        low, high = float(image.min()), float(image.max()) + 1e-12
    return float(low), float(high)


GREY_NOTE = "grey scale per image: 1st (black) to 99th (white) percentile; x right, y up"


def plot_image_grid(images, png: str | Path, row_labels=None, col_labels=None, title: str | None = None,
                    cell: float = 1.2, mark_centre: bool = False) -> Path:
    """Draw ``(R, C, N, N)`` images as a grid (each image scaled on its own).

    Args:
        images: ``(R, C, N, N)`` array.
        row_labels: ``R`` strings; col_labels: ``C`` strings (or ``None``).
        mark_centre: draw a small red ``+`` on the box centre (pixel ``N // 2``).
    A line under the grid states the grey scale (:data:`GREY_NOTE`).
    """
    images = np.asarray(images, dtype=np.float64)
    rows, cols = images.shape[:2]
    fig = _figure(max(cell * cols + (1.2 if row_labels is not None else 0.2), 4.6),
                  cell * rows + (0.6 if title else 0.2) + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            low, high = _display_range(images[r, c])
            ax.imshow(images[r, c], cmap="gray", origin="lower", vmin=low, vmax=high, interpolation="nearest")
            if mark_centre:
                centre = images.shape[-1] // 2
                ax.plot([centre], [centre], marker="+", color="red", markersize=7, alpha=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            if row_labels is not None and c == 0:
                ax.set_ylabel(str(row_labels[r]), fontsize="small")
            if col_labels is not None and r == 0:
                ax.set_title(str(col_labels[c]), fontsize="small")
    if title:
        fig.suptitle(title)
    fig.supxlabel(GREY_NOTE + ("; red +: box centre" if mark_centre else ""), fontsize="x-small", color="0.3")
    return save_figure(fig, png)


def plot_class_images(averages, counts, png: str | Path, centres_decoded=None) -> Path:
    """Class averages in a row (``(k, N, N)``), with the generator's images at
    the cluster centres (``(k, N, N)``) as a second row when given."""
    averages = np.asarray(averages)
    k = len(averages)
    total = max(int(np.sum(counts)), 1)
    grid = [averages]
    row_labels = ["aligned average"]
    if centres_decoded is not None:
        grid.append(np.asarray(centres_decoded))
        row_labels.append("decoded centre")
    col_labels = [f"class {j + 1}\n{100 * counts[j] / total:.1f}%" for j in range(k)]
    return plot_image_grid(np.stack(grid), png, row_labels=row_labels, col_labels=col_labels, mark_centre=True)


def plot_gallery(averages, gallery, gallery_index, png: str | Path, npz: str | Path, aligned: bool = True) -> list[Path]:
    """One row per class: its average, then its first particles.

    Args:
        averages: ``(k, N, N)``; gallery: ``(k, G, N, N)``; gallery_index:
            ``(k, G)`` STAR rows (``-1`` where a class has fewer than ``G``).
    Writes:
        ``png`` and ``npz`` (``averages``, ``gallery``, ``rows``, ``aligned``).
    """
    averages, gallery = np.asarray(averages), np.asarray(gallery)
    k, g = gallery.shape[:2]
    grid = np.concatenate([averages[:, None], gallery], axis=1)
    col_labels = ["average"] + [f"particle {i + 1}" for i in range(g)]
    row_labels = [f"class {j + 1}" for j in range(k)]
    what = "aligned particles (pose undone)" if aligned else "particles (no pose to undo)"
    paths = [plot_image_grid(grid, png, row_labels=row_labels, col_labels=col_labels, title=f"gallery: {what}")]
    paths.append(save_npz(npz, averages=averages, gallery=gallery, rows=np.asarray(gallery_index), aligned=np.bool_(aligned)))
    return paths


def plot_traversal(images, axes_values, dims, png: str | Path, npz: str | Path, grid=None) -> list[Path]:
    """A latent traversal decoded at pose zero.

    Args:
        images: ``(R, C, N, N)``; axes_values: ``(len(dims), steps)`` latent
            values along rows (``dims[0]``) and columns (``dims[1]``).
        dims: 0-based latent dimensions traversed.
        grid: ``(R, C, k)`` latent vectors (saved in the NPZ).
    """
    images = np.asarray(images)
    names = [f"pvaeZ{d + 1}" for d in dims]
    if len(dims) == 1:
        row_labels, col_labels = None, [f"{names[0]}={v:.2f}" for v in axes_values[0]]
    else:
        row_labels = [f"{names[0]}={v:.2f}" for v in axes_values[0]]
        col_labels = [f"{names[1]}={v:.2f}" for v in axes_values[1]]
    title = f"generator at pose zero: {' x '.join(names)} (other dimensions at the median)"
    paths = [plot_image_grid(images, png, row_labels=row_labels, col_labels=col_labels, title=title)]
    extra = {} if grid is None else {"z": np.asarray(grid)}
    paths.append(save_npz(npz, images=images, axes=np.asarray(axes_values), dims=np.asarray(dims), **extra))
    return paths


def plot_pose_histograms(psi_deg, origin_angst, png: str | Path, csv: str | Path, bins: int = 36) -> list[Path]:
    """Histograms of ``rlnAnglePsi`` (degrees, 10-degree bins by default) and of
    ``rlnOriginXAngst``, ``rlnOriginYAngst`` and the shift length (Angstrom).

    Writes:
        ``png`` and ``csv`` with columns ``quantity``, ``bin_left``, ``bin_right``, ``count``.
    """
    psi = np.asarray(psi_deg, dtype=np.float64)
    origin = np.asarray(origin_angst, dtype=np.float64).reshape(-1, 2)
    quantities = {
        "rlnAnglePsi": (psi, np.linspace(-180, 180, bins + 1)),
    }
    span = float(max(np.abs(origin).max(initial=0.0), 1e-6))
    shift_edges = np.linspace(-span, span, 31)
    quantities["rlnOriginXAngst"] = (origin[:, 0], shift_edges)
    quantities["rlnOriginYAngst"] = (origin[:, 1], shift_edges)
    length = np.hypot(origin[:, 0], origin[:, 1])
    quantities["shift_length_angst"] = (length, np.linspace(0, float(max(length.max(initial=0.0), 1e-6)), 31))
    records = []
    fig = _figure(12, 3.2)
    axes = fig.subplots(1, 3)
    counts = {}
    for name, (values, edges) in quantities.items():
        counts[name], _ = np.histogram(values, bins=edges)
        records += [{"quantity": name, "bin_left": float(a), "bin_right": float(b), "count": int(n)}
                    for a, b, n in zip(edges[:-1], edges[1:], counts[name])]
    edges = quantities["rlnAnglePsi"][1]
    axes[0].bar(edges[:-1], counts["rlnAnglePsi"], width=np.diff(edges), align="edge", color="tab:blue", edgecolor="white")
    axes[0].set_xlabel("rlnAnglePsi (degrees)")
    axes[0].set_xlim(-180, 180)
    axes[0].set_ylabel("particles")
    for name, colour in (("rlnOriginXAngst", "tab:orange"), ("rlnOriginYAngst", "tab:green")):
        axes[1].stairs(counts[name], shift_edges, label=name, color=colour, linewidth=1.5)
    axes[1].set_xlabel("origin (Angstrom)")
    axes[1].legend(fontsize="small")
    edges = quantities["shift_length_angst"][1]
    axes[2].bar(edges[:-1], counts["shift_length_angst"], width=np.diff(edges), align="edge", color="tab:purple", edgecolor="white")
    axes[2].set_xlabel("shift length (Angstrom)")
    fig.suptitle(f"poses of {len(psi)} particles")
    return [save_figure(fig, png), save_csv(pd.DataFrame.from_records(records), csv)]


#: what each logged KL term measures (the models' ``kl_*`` terms, docs/models.md), for the figure's legend
KL_TERMS = {
    "kl_pose": "pose cell (rotation channel, position) vs p(t, r)",
    "kl_theta": "rotation angle theta (TARGET-VAE: offset in its channel)",
    "kl_z": "semantic latent z vs N(0, I)",
    "kl_offset": "sub-pixel shift in the cell",
    "kl_t": "translation t",
    "kl_cluster": "cluster latent (mixture bound)",
    "kl_tau": "transformation tau",
    "kl_v": "latent v",
}


def plot_training_curves(rows: list[dict], png: str | Path, csv: str | Path) -> list[Path]:
    """ELBO (train and validation), KL terms and learning rate per epoch from ``metrics.jsonl`` rows.

    Epochs are counted from 1, as ``train.log`` counts them (``metrics.jsonl``'s
    0-based ``epoch`` + 1). ELBO and KL terms are nats per image.

    Writes:
        ``png`` and ``csv`` (one row per epoch, every numeric metric; ``epoch`` counted from 1).
    """
    fig, frame = training_curves_figure(rows)
    return [save_figure(fig, png), save_csv(frame, csv)]


def training_curves_figure(rows: list[dict]):
    """The figure of :func:`plot_training_curves` and its table (``epoch`` counted from 1)."""
    frame = pd.DataFrame(rows)
    if "epoch" in frame.columns:
        frame["epoch"] = frame["epoch"].astype(int) + 1
    else:
        frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    x = frame["epoch"].to_numpy()
    fig = _figure(14, 4.2)
    axes = fig.subplots(1, 3)
    for name, style, label in (("train_elbo", "-o", "training"), ("val_elbo", "--s", "validation")):
        if name in frame:
            axes[0].plot(x, frame[name], style, label=label, markersize=4)
    axes[0].set_ylabel("ELBO per image (nats; higher is better)")
    axes[0].set_title("ELBO = log-likelihood - sum of the KL terms", fontsize="small")
    kl = [c for c in frame.columns if c.startswith("train_kl_")]
    for name in kl:
        term = name[len("train_"):]
        meaning = KL_TERMS.get(term)
        axes[1].plot(x, frame[name], "-o", label=f"{term}: {meaning}" if meaning else term, markersize=3)
    axes[1].set_ylabel("KL per image (nats), training")
    axes[1].set_title("KL(posterior || prior) of each latent: the\ninformation the encoder puts in it", fontsize="small")
    if "lr" in frame:
        axes[2].plot(x, frame["lr"], "-o", markersize=3)
        axes[2].set_yscale("log")
    axes[2].set_ylabel("learning rate")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("epoch (from 1, as in train.log)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
    fig.suptitle(f"training curves ({len(frame)} epochs)")
    return fig, frame

