"""The latent-space explorer dock widget (Qt).

Controls, top to bottom (docs/napari.md describes each):

* run: the ``<name> table`` layer opened by the reader;
* plot: two columns (any numeric STAR column, latents first), or a PCA or
  t-SNE projection of all latent dimensions (computed in a worker thread);
  colour by the cluster column or any other column;
* the scatter plot, with a lasso, rectangle or pick tool (pick: hovering
  shows the particle under the cursor, clicking also chooses the latent point
  for reconstruction); replace / add / remove selection modes;
* selection views: a random sample (seeded) of the selection, a page at a
  time ("show more" adds the next page), as montages of raw and aligned
  particles with each cell labelled (STAR row, cluster), and the average of
  every particle read (worker thread, with progress);
* generator: device, the latent point (selection mean or clicked point),
  reconstruction at pose zero, and a traversal between two stored points;
* export: the selection as a STAR subset, the selection as a new cluster id,
  and the whole table with its clusters.

Views are 2D images (montages for several particles) laid out side by side
to the right of the particle stack, each titled on the canvas, so that none
depends on napari's shared particle slider. Everything long runs in a worker
thread; the status line says what is being computed now (or the last result);
problems a user can fix are shown as one-line notifications. The methods used by the buttons are public
(:meth:`select_rectangle`, :meth:`show_selection`, :meth:`reconstruct`, ...)
so scripts and tests can drive the widget without a mouse.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_particle_vae import export, scatter
from napari_particle_vae.reader import METADATA_KEY, PARTICLE_AXIS_LABEL, ROLE_KEY
from napari_particle_vae.run_data import ParticleRun
from napari_particle_vae.views import (
    PAGE_SIZE,
    SAMPLE_SEED,
    ModelHandle,
    SelectionSample,
    cell_origins,
    montage,
    montage_columns,
)
from particle_vae.errors import ParticleVAEError

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

PROJECTION_LABELS = {"columns": "two columns", "pca": "PCA of the latents", "tsne": "t-SNE of the latents"}
TOOLS = ("lasso", "rectangle", "pick")
MODES = ("replace", "add", "remove")
#: the widget's views, left to right after the particle stack: layer role -> layer name after the run's name
VIEW_NAMES = {
    "selection_average": "selection average (aligned)",
    "selection_raw": "selection raw particles",
    "selection_aligned": "selection aligned particles",
    "reconstruction": "reconstruction (pose zero)",
    "traversal": "traversal (pose zero)",
}
#: names (after the run's name) of the text layers: a title above each view, a label in each montage cell
TITLES_NAME, CELL_LABELS_NAME = "view titles", "cell labels"
#: most particles read per "show more"
MAX_PAGE = 4096
#: traversals with at most this many steps are drawn as one row
MAX_TRAVERSAL_ROW = 12
#: canvas layout, in particle boxes: height of the title row above each view, font sizes, least width of a run's column
TITLE_ROW, TITLE_SIZE, CELL_LABEL_SIZE, MIN_COLUMN = 0.5, 0.22, 0.085, 8


@dataclass
class ViewPanel:
    """A view laid out on the canvas: one 2D image layer, its title and the labels of its cells.

    Attributes:
        base: name of the run it belongs to (the table layer's name without `` table``).
        run: the run it belongs to.
        role: key of :data:`VIEW_NAMES`.
        layer: the image layer.
        title: text drawn above the image.
        cells: ``(C, 2)`` top-left (y, x) of each cell relative to the image's corner, in Angstrom.
        cell_texts: ``C`` labels drawn in the cells.
    """

    base: str
    run: ParticleRun | None
    role: str
    layer: object
    title: str
    cells: np.ndarray
    cell_texts: list[str]


class LatentExplorerWidget(QWidget):
    """Dock widget: latent scatter plot, selection, particle views, generator and export.

    Args:
        napari_viewer: the viewer (napari passes it).
        max_points: points drawn individually in the plot before switching to
            a density image with a subset on top.
    Attributes:
        run: the :class:`~napari_particle_vae.run_data.ParticleRun` shown, or ``None``.
        embedding: the plot's :class:`~napari_particle_vae.scatter.Embedding`.
        selected: ``(N,)`` bool mask of selected STAR rows.
        chosen_point: ``(x, y)`` clicked in the plot with the pick tool, or ``None``.
        busy: number of worker threads running.
    """

    def __init__(self, napari_viewer: napari.Viewer, max_points: int = scatter.MAX_POINTS_DRAWN):
        super().__init__()
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg, NavigationToolbar2QT
        from matplotlib.figure import Figure

        self.viewer = napari_viewer
        self.run: ParticleRun | None = None
        self.table_layer = None
        self.embedding: scatter.Embedding | None = None
        self.colours: scatter.Colouring | None = None
        self.selected = np.zeros(0, dtype=bool)
        self.chosen_point: tuple[float, float] | None = None
        self.traversal_ends: list[np.ndarray | None] = [None, None]
        self.busy = 0
        self._workers: dict = {}  # worker -> task id of what it computes
        self._models: dict[tuple[str, str], ModelHandle] = {}
        self._hover_row: int | None = None
        self._embedding_token = 0
        self._embedding_task: int | None = None
        self._known_tables: list = []
        self._tasks: dict[int, str] = {}
        self._task_ids = itertools.count(1)
        self._last_message = ""
        self._panels: dict[str, ViewPanel] = {}
        self._new_panel = False
        self.sample: SelectionSample | None = None
        self._sample_mask: np.ndarray | None = None
        self._page_loading = False

        # -- controls -----------------------------------------------------------------
        self.run_combo = QComboBox()
        self.projection_combo = QComboBox()
        for key, label in PROJECTION_LABELS.items():
            self.projection_combo.addItem(label, key)
        self.x_combo, self.y_combo, self.colour_combo = QComboBox(), QComboBox(), QComboBox()
        self.tool_combo, self.mode_combo = QComboBox(), QComboBox()
        self.tool_combo.addItems(TOOLS)
        self.mode_combo.addItems(MODES)
        self.clear_button = QPushButton("clear")
        self.selection_label = QLabel("no selection")
        self.hover_label = QLabel("")
        self.hover_label.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        self.figure = Figure(figsize=(4.2, 3.6), dpi=100, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(320)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.toolbar = NavigationToolbar2QT(self.canvas, self)
        self.plot = scatter.ScatterPlot(self.figure, max_points=max_points)
        self._selector = None

        self.show_button = QPushButton("show selected particles (raw, aligned, average)")
        self.more_button = QPushButton("show more")
        self.more_button.setEnabled(False)
        self.page_spin = QSpinBox()
        self.page_spin.setRange(1, MAX_PAGE)
        self.page_spin.setValue(PAGE_SIZE)
        self.page_spin.setToolTip("particles read at first and by each 'show more' (a random sample of the selection)")
        self.device_combo = QComboBox()
        self.device_combo.addItems(_devices())
        self.point_combo = QComboBox()
        self.point_combo.addItem("selection mean", "selection")
        self.point_combo.addItem("clicked point (pick tool)", "point")
        self.reconstruct_button = QPushButton("reconstruct at pose zero")
        self.start_button = QPushButton("set start")
        self.end_button = QPushButton("set end")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(2, 64)
        self.steps_spin.setValue(9)
        self.traverse_button = QPushButton("traverse")
        self.export_button = QPushButton("export selection as STAR...")
        self.cluster_button = QPushButton("selection -> new cluster")
        self.export_all_button = QPushButton("export table with clusters...")

        # -- layout -------------------------------------------------------------------
        layout = QVBoxLayout(self)
        form = QFormLayout()
        form.addRow("run", self.run_combo)
        form.addRow("plot", self.projection_combo)
        axes_row = QHBoxLayout()
        axes_row.addWidget(QLabel("x"))
        axes_row.addWidget(self.x_combo, 1)
        axes_row.addWidget(QLabel("y"))
        axes_row.addWidget(self.y_combo, 1)
        form.addRow("axes", axes_row)
        form.addRow("colour by", self.colour_combo)
        tool_row = QHBoxLayout()
        tool_row.addWidget(self.tool_combo, 1)
        tool_row.addWidget(self.mode_combo, 1)
        tool_row.addWidget(self.clear_button)
        form.addRow("tool", tool_row)
        layout.addLayout(form)
        layout.addWidget(self.toolbar)
        layout.addWidget(self.canvas, 1)
        layout.addWidget(self.selection_label)
        layout.addWidget(self.hover_label)

        views_box = QGroupBox("selection views")
        views_layout = QVBoxLayout(views_box)
        views_layout.addWidget(self.show_button)
        more_row = QHBoxLayout()
        more_row.addWidget(self.more_button, 1)
        more_row.addWidget(QLabel("per click"))
        more_row.addWidget(self.page_spin)
        views_layout.addLayout(more_row)
        layout.addWidget(views_box)

        generator_box = QGroupBox("generator (pose zero)")
        generator_form = QFormLayout(generator_box)
        generator_form.addRow("device", self.device_combo)
        generator_form.addRow("latent point", self.point_combo)
        generator_form.addRow(self.reconstruct_button)
        traverse_row = QHBoxLayout()
        traverse_row.addWidget(self.start_button)
        traverse_row.addWidget(self.end_button)
        traverse_row.addWidget(QLabel("steps"))
        traverse_row.addWidget(self.steps_spin)
        traverse_row.addWidget(self.traverse_button)
        generator_form.addRow(traverse_row)
        layout.addWidget(generator_box)

        export_box = QGroupBox("export")
        export_layout = QVBoxLayout(export_box)
        export_layout.addWidget(self.export_button)
        export_row = QHBoxLayout()
        export_row.addWidget(self.cluster_button)
        export_row.addWidget(self.export_all_button)
        export_layout.addLayout(export_row)
        layout.addWidget(export_box)
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)

        # -- signals ------------------------------------------------------------------
        self.run_combo.currentIndexChanged.connect(self._on_run_changed)
        self.projection_combo.currentIndexChanged.connect(lambda _: self.update_plot())
        self.x_combo.currentIndexChanged.connect(lambda _: self._on_axes_changed())
        self.y_combo.currentIndexChanged.connect(lambda _: self._on_axes_changed())
        self.colour_combo.currentIndexChanged.connect(lambda _: self._on_colour_changed())
        self.tool_combo.currentIndexChanged.connect(lambda _: self._install_selector())
        self.clear_button.clicked.connect(self.clear_selection)
        self.show_button.clicked.connect(lambda: self.show_selection())
        self.more_button.clicked.connect(lambda: self.show_more())
        self.reconstruct_button.clicked.connect(lambda: self.reconstruct())
        self.start_button.clicked.connect(lambda: self.set_traversal_end(0))
        self.end_button.clicked.connect(lambda: self.set_traversal_end(1))
        self.traverse_button.clicked.connect(lambda: self.traverse())
        self.export_button.clicked.connect(self._export_dialog)
        self.cluster_button.clicked.connect(self.add_cluster)
        self.export_all_button.clicked.connect(self._export_all_dialog)
        self.canvas.mpl_connect("motion_notify_event", self._on_motion)
        self.canvas.mpl_connect("button_press_event", self._on_click)
        self.viewer.layers.events.inserted.connect(self._refresh_runs)
        self.viewer.layers.events.removed.connect(self._refresh_runs)
        self._refresh_runs()

    # =============================================================================== runs

    def _table_layers(self) -> list:
        return [layer for layer in self.viewer.layers
                if layer.metadata.get(ROLE_KEY) == "table" and isinstance(layer.metadata.get(METADATA_KEY), ParticleRun)]

    def _refresh_runs(self, *_):
        try:
            self.run_combo.count()
        except RuntimeError:  # the widget was deleted while the viewer lives on: stop listening
            self.viewer.layers.events.inserted.disconnect(self._refresh_runs)
            self.viewer.layers.events.removed.disconnect(self._refresh_runs)
            return
        layers = self._table_layers()
        current = self.table_layer
        self.run_combo.blockSignals(True)
        self.run_combo.clear()
        for layer in layers:
            self.run_combo.addItem(layer.name)
        self.run_combo.blockSignals(False)
        added = [layer for layer in layers if layer not in self._known_tables]
        self._known_tables = list(layers)
        if layers:
            # a newly opened run is shown at once; otherwise keep the current one
            index = layers.index(added[-1]) if added else layers.index(current) if current in layers else len(layers) - 1
            # silently: the combo's signal would switch (and reset) the run even when it is the current one
            self.run_combo.blockSignals(True)
            self.run_combo.setCurrentIndex(index)
            self.run_combo.blockSignals(False)
            if layers[index] is not current:
                self._on_run_changed(index)
        else:
            self._set_run(None, None)

    def _on_run_changed(self, index: int):
        layers = self._table_layers()
        if 0 <= index < len(layers):
            self._set_run(layers[index], layers[index].metadata[METADATA_KEY])

    def set_run_layer(self, layer) -> None:
        """Show the run of a ``<name> table`` layer opened by the reader."""
        names = [l.name for l in self._table_layers()]
        if layer.name not in names:
            raise ValueError(f"layer {layer.name!r} was not opened by napari-particle-vae")
        self.run_combo.setCurrentIndex(names.index(layer.name))

    def _set_run(self, layer, run: ParticleRun | None):
        self.table_layer, self.run = layer, run
        self.selected = np.zeros(0 if run is None else len(run), dtype=bool)
        self.sample, self._sample_mask = None, None
        self._update_more_button()
        self.chosen_point = None
        self.traversal_ends = [None, None]
        self.embedding = None
        self.hover_label.setText("")
        self._update_selection_label()
        for combo in (self.x_combo, self.y_combo, self.colour_combo):
            combo.blockSignals(True)
            combo.clear()
        if run is not None:
            columns = run.numeric_columns()
            self.x_combo.addItems(columns)
            self.y_combo.addItems(columns)
            if len(run.latent_columns) > 1:
                self.y_combo.setCurrentIndex(1)
            self.colour_combo.addItem("(none)", None)
            cluster = run.cluster_column()
            for column in ([cluster] if cluster else []) + [c for c in run.table.columns if c != cluster]:
                self.colour_combo.addItem(str(column), str(column))
            self.colour_combo.setCurrentIndex(1 if cluster else 0)
            default = "columns" if run.n_latents <= 2 else "pca"
            self.projection_combo.blockSignals(True)
            self.projection_combo.setCurrentIndex(list(PROJECTION_LABELS).index(default))
            self.projection_combo.blockSignals(False)
        for combo in (self.x_combo, self.y_combo, self.colour_combo):
            combo.blockSignals(False)
        self.update_plot()

    # =============================================================================== plot

    @property
    def projection(self) -> str:
        return self.projection_combo.currentData()

    def set_projection(self, kind: str, x: str | None = None, y: str | None = None):
        """Choose the plot: ``"columns"`` (with column names ``x``, ``y``), ``"pca"`` or ``"tsne"``.

        Returns:
            The worker computing a PCA/t-SNE (``None`` for columns, drawn at once).
        """
        if kind not in PROJECTION_LABELS:
            raise ValueError(f"unknown projection {kind!r}; choose one of {', '.join(PROJECTION_LABELS)}")
        for combo, name in ((self.x_combo, x), (self.y_combo, y)):
            if name is not None:
                index = combo.findText(name)
                if index < 0:
                    raise ValueError(f"no numeric column {name!r} in the table")
                combo.blockSignals(True)
                combo.setCurrentIndex(index)
                combo.blockSignals(False)
        self.projection_combo.blockSignals(True)
        self.projection_combo.setCurrentIndex(list(PROJECTION_LABELS).index(kind))
        self.projection_combo.blockSignals(False)
        return self.update_plot()

    def set_colour(self, column: str | None) -> None:
        """Colour the points by ``column`` (``None``: one colour)."""
        index = 0 if column is None else self.colour_combo.findData(column)
        if index < 0:
            raise ValueError(f"no column {column!r} in the table")
        self.colour_combo.setCurrentIndex(index)
        self._on_colour_changed()

    def _on_axes_changed(self):
        if self.projection == "columns":
            self.update_plot()

    def _on_colour_changed(self):
        if self.run is None or self.embedding is None:
            return
        self.colours = scatter.colouring(self.run.table, self.colour_combo.currentData(), self.embedding.rows)
        self._draw()

    def update_plot(self):
        """Recompute the plot's coordinates and redraw; PCA and t-SNE run in a worker (returned)."""
        self.x_combo.setEnabled(self.projection == "columns")
        self.y_combo.setEnabled(self.projection == "columns")
        if self.run is None:
            self.embedding = None
            self.plot.axes.clear()
            self.plot.axes.text(0.5, 0.5, "open a particle-vae STAR or run\n(File > Open, or File > Open Sample)",
                                ha="center", va="center", transform=self.plot.axes.transAxes)
            self.canvas.draw_idle()
            return None
        run, kind = self.run, self.projection
        self._embedding_token += 1
        token = self._embedding_token
        if self._embedding_task is not None:
            # a projection still computing is no longer wanted: the status line stops announcing it
            self._tasks.pop(self._embedding_task, None)
            self._embedding_task = None
            self._render_status()
        if kind == "columns":
            x, y = self.x_combo.currentText(), self.y_combo.currentText()
            if not x or not y:
                return None
            self._set_embedding(scatter.embed_columns(run.table, x, y, run.latent_columns), token)
            return None
        latents = run.latents()
        compute = scatter.embed_pca if kind == "pca" else scatter.embed_tsne
        count = min(len(latents), scatter.MAX_TSNE_POINTS) if kind == "tsne" else len(latents)

        worker = self._start(lambda: compute(latents), lambda embedding: self._set_embedding(embedding, token),
                             PROJECTION_LABELS[kind], f"computing the {PROJECTION_LABELS[kind]} of {count:,} particles...")
        self._embedding_task = self._workers[worker]
        return worker

    def _set_embedding(self, embedding: scatter.Embedding, token: int):
        if token != self._embedding_token or self.run is None:
            return  # a newer plot was asked for meanwhile
        self.embedding = embedding
        self.colours = scatter.colouring(self.run.table, self.colour_combo.currentData(), embedding.rows)
        self.chosen_point = None
        self._draw()
        self._status(f"plot: {_describe_embedding(embedding)}")

    def _draw(self):
        if self.embedding is None or self.colours is None:
            return
        self.plot.draw(self.embedding, self.colours, self.selected, title=self.run.star_path.name)
        self._install_selector()
        self.canvas.draw_idle()

    def _install_selector(self):
        from matplotlib.widgets import LassoSelector, RectangleSelector

        if self._selector is not None:
            self._selector.set_active(False)
            try:
                self._selector.disconnect_events()
            except (AttributeError, KeyError, ValueError):  # the axes may have been cleared already
                log.debug("selector already disconnected")
            self._selector = None
        tool = self.tool_combo.currentText()
        ax = self.plot.axes
        if tool == "lasso":
            self._selector = LassoSelector(ax, onselect=lambda verts: self.select_polygon(verts), useblit=True,
                                           props={"color": "red", "linewidth": 1.0})
        elif tool == "rectangle":
            self._selector = RectangleSelector(
                ax, lambda press, release: self.select_rectangle((press.xdata, release.xdata), (press.ydata, release.ydata)),
                useblit=True, interactive=False, props={"facecolor": "red", "alpha": 0.15, "edgecolor": "red"})

    # =============================================================================== selection

    @property
    def mode(self) -> str:
        return self.mode_combo.currentText()

    def _apply_selection(self, inside_points: np.ndarray, mode: str | None):
        if self.run is None or self.embedding is None:
            return
        new = np.zeros(len(self.run), dtype=bool)
        new[self.embedding.rows[inside_points]] = True
        self.selected = scatter.combine(self.selected, new, mode or self.mode)
        self.plot.set_selection(self.selected)
        self.canvas.draw_idle()
        self._update_selection_label()

    def select_polygon(self, vertices, mode: str | None = None) -> np.ndarray:
        """Select the points inside a polygon ``(V, 2)`` in plot coordinates (the lasso). Returns the ``(N,)`` mask."""
        if self.embedding is not None:
            self._apply_selection(scatter.points_in_polygon(self.embedding.coords, vertices), mode)
        return self.selected

    def select_rectangle(self, x_range, y_range, mode: str | None = None) -> np.ndarray:
        """Select the points with ``x`` in ``x_range`` and ``y`` in ``y_range`` (plot coordinates). Returns the mask."""
        if self.embedding is not None and None not in tuple(x_range) + tuple(y_range):
            self._apply_selection(scatter.points_in_rectangle(self.embedding.coords, x_range, y_range), mode)
        return self.selected

    def select_rows(self, rows, mode: str | None = None) -> np.ndarray:
        """Select STAR rows directly (``(S,)`` 0-based rows or an ``(N,)`` mask). Returns the mask."""
        if self.run is not None:
            new = export.selection_mask(rows, len(self.run))
            self.selected = scatter.combine(self.selected, new, mode or self.mode)
            self.plot.set_selection(self.selected)
            self.canvas.draw_idle()
            self._update_selection_label()
        return self.selected

    def clear_selection(self) -> None:
        """Select nothing."""
        if self.run is not None:
            self.select_rows(np.zeros(len(self.run), dtype=bool), mode="replace")

    def _update_selection_label(self):
        self._update_more_button()
        count = int(self.selected.sum())
        total = 0 if self.run is None else len(self.run)
        self.selection_label.setText(f"{count:,} of {total:,} particles selected" if count else "no selection")

    # -- pick / hover ---------------------------------------------------------------------

    def _on_motion(self, event):
        if self.tool_combo.currentText() != "pick" or event.inaxes is not self.plot.axes or self.embedding is None:
            return
        index = scatter.nearest_point(self.embedding.coords, (event.xdata, event.ydata))
        if index is not None and index != self._hover_row:
            self._hover_row = index
            self.show_particle(int(self.embedding.rows[index]))

    def _on_click(self, event):
        if self.tool_combo.currentText() != "pick" or event.inaxes is not self.plot.axes or event.button != 1:
            return
        if self.canvas.widgetlock.locked():  # the toolbar's zoom or pan is active
            return
        self.pick_point(event.xdata, event.ydata)

    def pick_point(self, x: float, y: float) -> int | None:
        """Choose the latent point at plot coordinates ``(x, y)`` and show the nearest particle.

        Returns:
            The STAR row of the nearest particle (``None`` if no point is near).
        """
        if self.embedding is None:
            return None
        self.chosen_point = (float(x), float(y))
        self.plot.mark(self.chosen_point)
        self.canvas.draw_idle()
        index = scatter.nearest_point(self.embedding.coords, (x, y))
        row = None if index is None else int(self.embedding.rows[index])
        if row is not None:
            self.show_particle(row)
        return row

    def show_particle(self, row: int) -> None:
        """Move the viewer to particle ``row`` (0-based STAR row) and describe it under the plot."""
        run = self.run
        if run is None:
            return
        values = run.table.iloc[row]
        parts = [f"row {row}"]
        from particle_vae.analysis.averages import pose_psi_column

        psi_column = pose_psi_column(run.table)
        for column in ([run.cluster_column()] if run.cluster_column() else []) + run.latent_columns[:4] + ([psi_column] if psi_column else []):
            if column in values.index:
                value = values[column]
                parts.append(f"{column} {value:.3g}" if isinstance(value, (float, np.floating)) else f"{column} {value}")
        self.hover_label.setText(", ".join(parts))
        if self._particles_layer() is not None:
            self.viewer.dims.set_point(0, row)  # world coordinate of axis 0 = STAR row (scale 1 on that axis)

    def _particles_layer(self):
        return self._particles_layer_of(self.run)

    # =============================================================================== views

    def _base_name(self) -> str:
        """The run's name for its view layers: the table layer's name without `` table`` (napari's `` [n]`` kept)."""
        name = self.table_layer.name if self.table_layer is not None else "particle-vae"
        match = re.fullmatch(r"(.*) table( \[\d+\])?", name)
        return match.group(1) + (match.group(2) or "") if match else name

    def view_layer(self, role: str):
        """The current run's view layer of ``role`` (a key of :data:`VIEW_NAMES`), or ``None``."""
        return _layer_named(self.viewer, f"{self._base_name()} {VIEW_NAMES[role]}")

    def _show_view(self, role: str, image: np.ndarray, pixel_size: float | None, title: str,
                   cells_px: np.ndarray | None = None, cell_texts: list[str] | None = None, reset_contrast: bool = True,
                   metadata: dict | None = None, layout: bool = True):
        """Add or update the 2D view layer ``role`` (``image`` ``(H, W)``) and lay every view out again.

        Args:
            cells_px: ``(C, 2)`` top-left pixel (row, column) of each cell of a montage.
            cell_texts: ``C`` labels drawn in the cells.
            reset_contrast: set the display range from the new image (else keep the user's).
            layout: lay the views out now (``False`` when more views follow at once).
        """
        base = self._base_name()
        name = f"{base} {VIEW_NAMES[role]}"
        apix = 1.0 if pixel_size is None else float(pixel_size)
        scale = (apix, apix)
        metadata = {METADATA_KEY: self.run, ROLE_KEY: role, **(metadata or {})}
        new_panel = name not in self._panels or name not in self.viewer.layers
        if name in self.viewer.layers and self.viewer.layers[name].ndim == 2:
            layer = self.viewer.layers[name]
            layer.data = image
            layer.scale = scale
            layer.metadata = metadata
            if reset_contrast:
                layer.contrast_limits = _display_range(image)
        else:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            layer = self.viewer.add_image(image, name=name, scale=scale, colormap="gray",
                                          contrast_limits=_display_range(image), metadata=metadata)
        cells = np.zeros((0, 2)) if cells_px is None else np.asarray(cells_px, dtype=np.float64) * apix
        self._panels[name] = ViewPanel(base=base, run=self.run, role=role, layer=layer, title=title, cells=cells,
                                       cell_texts=list(cell_texts or []))
        self._new_panel = self._new_panel or new_panel
        if layout:
            self._layout_views()
        return layer

    def _layout_views(self) -> None:
        """Stack every view of a run in a column to the right of its particle stack, and redraw titles and cell labels.

        Views are 2D, so they show at every position of the particle slider.
        Lengths are in units of the run's particle box (Angstrom): a title
        row of :data:`TITLE_ROW` boxes above each view, so that titles never
        run into each other; text scales with the zoom like the images (at
        :data:`TITLE_SIZE` and :data:`CELL_LABEL_SIZE` boxes), so cell labels
        stay inside their cells however far one zooms out. Runs (when several
        are explored) get columns side by side.
        """
        panels = [panel for panel in self._panels.values() if panel.layer in self.viewer.layers]
        self._panels = {panel.layer.name: panel for panel in panels}
        order = list(VIEW_NAMES)
        column_left = 0.0
        for base in dict.fromkeys(panel.base for panel in panels):
            column = sorted((p for p in panels if p.base == base), key=lambda p: order.index(p.role))
            particles = self._particles_layer_of(column[0].run)
            unit = _extent(particles)[1] if particles is not None else _extent(column[0].layer)[1]
            titles, title_texts, cells, cell_texts = [], [], [], []
            if particles is not None and column_left == 0.0:  # every run's stack lies at the origin: one title
                titles.append((-0.05 * unit, 0.0))
                title_texts.append(f"all {particles.data.shape[0]:,} particles (slider: {PARTICLE_AXIS_LABEL})")
            left = column_left + (1.5 * unit if particles is not None else 0.0)
            top, width = TITLE_ROW * unit, 0.0
            for panel in column:
                panel.layer.translate = (top, left)
                titles.append((top - 0.05 * unit, left))
                title_texts.append(panel.title)
                cells.extend((top + y, left + x) for y, x in panel.cells)
                cell_texts.extend(panel.cell_texts)
                height, panel_width = _extent(panel.layer)
                top += height + TITLE_ROW * unit
                width = max(width, panel_width)
            # napari draws the y axis downwards, so "upper" anchors put the text above the point and "lower" below it
            self._set_text_layer(base, TITLES_NAME, titles, title_texts, anchor="upper_left", size=TITLE_SIZE * unit,
                                 colour="white")
            self._set_text_layer(base, CELL_LABELS_NAME, cells, cell_texts, anchor="lower_left",
                                 size=CELL_LABEL_SIZE * unit, colour="yellow")
            column_left = left + max(width, MIN_COLUMN * unit) + unit
        if self._new_panel:
            self._new_panel = False
            self.viewer.reset_view()

    def _set_text_layer(self, base: str, suffix: str, coords, texts: list[str], anchor: str, size: float, colour: str):
        """A points layer that draws only ``texts`` at ``coords`` ``(T, 2)`` (Angstrom), kept above the images.

        ``size`` is the font size in Angstrom where napari scales text with the
        zoom (napari >= 0.5), else in screen points (then at most 10).
        """
        name = f"{base} {suffix}"
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        text = {"string": "{label}", "anchor": anchor, "color": colour, **_text_size(size)}
        features = pd.DataFrame({"label": pd.Series(list(texts), dtype=object)})
        layer = _layer_named(self.viewer, name)
        if layer is not None and layer.ndim == 2:
            # updated in place: removing a layer makes napari run a full garbage collection (seconds with large runs)
            layer.data = coords
            layer.features = features
            layer.text = text
        else:
            active = self.viewer.layers.selection.active
            layer = self.viewer.add_points(coords, name=name, features=features, text=text, size=1.0, face_color="transparent",
                                           border_width=0, opacity=1.0, metadata={METADATA_KEY: self.run, ROLE_KEY: suffix})
            if active is not None:  # the text is no layer to work on: keep the user's (or the new view's) layer active
                self.viewer.layers.selection.active = active
        index = self.viewer.layers.index(layer)
        if index != len(self.viewer.layers) - 1:  # drawn over the views added after it (move inserts before dest)
            self.viewer.layers.move(index, len(self.viewer.layers))

    def _particles_layer_of(self, run: ParticleRun | None):
        """The reader's particle stack of ``run`` (found by its metadata: napari may have renamed it), or ``None``."""
        for layer in self.viewer.layers:
            if layer.metadata.get(ROLE_KEY) == "particles" and layer.metadata.get(METADATA_KEY) is run:
                return layer
        return None

    def show_selection(self, count: int | None = None, seed: int = SAMPLE_SEED):
        """Show a random sample of the selection: ``count`` particles (default: the "per click" box) of the
        selection in a random order drawn with ``seed``.

        Adds or updates the layers ``... selection raw particles`` and ``... selection
        aligned particles`` (montages, one labelled cell per particle: STAR row and
        cluster) and ``... selection average (aligned)`` (the mean of every particle
        read so far). :meth:`show_more` adds the next particles. Runs in a worker (returned).
        """
        run = self.run
        if not self._check_selection():
            return None
        if run.image_error is not None:
            self._error(run.image_error)
            return None
        if self._page_loading:
            self._status("still reading the previous particles; try again when they are shown")
            return None
        try:
            sample = SelectionSample(run, self.selected, seed=seed)
        except ParticleVAEError as error:
            self._error(str(error))
            return None
        self.sample, self._sample_mask = sample, self.selected.copy()
        return self._load_page(sample, count, first=True)

    def show_more(self, count: int | None = None):
        """Read the next ``count`` particles (default: the "per click" box) of the shown selection's random order,
        add them to the montages (while they have room) and to the average. Runs in a worker (returned)."""
        sample = self.sample
        if sample is None or sample.run is not self.run:
            self._error("no selection is shown; press 'show selected particles' first")
            return None
        if self._page_loading:
            self._status("still reading the previous particles; try again when they are shown")
            return None
        if not np.array_equal(self._sample_mask, self.selected):
            self._error("the selection changed since it was shown; press 'show selected particles' to show the new one")
            return None
        if sample.remaining == 0:
            self._status(f"all {sample.n_selected:,} selected particles are read already")
            return None
        return self._load_page(sample, count, first=False)

    def _load_page(self, sample: SelectionSample, count: int | None, first: bool):
        rows = sample.take(count or self.page_spin.value())
        self._page_loading = True
        self._update_more_button()

        def job():
            steps = sample.iter_read(rows)
            while True:
                try:
                    done, total = next(steps)
                except StopIteration as finished:
                    return finished.value
                yield ("progress", done, total)

        def done(page):
            self._page_loading = False
            if sample is not self.sample:
                self._update_more_button()
                return  # a newer selection is shown
            sample.add(page)
            self._show_sample(sample, reset_contrast=first)

        def failed(_error):
            self._page_loading = False
            sample.release()
            self._update_more_button()

        doing = (f"reading {rows.size:,} of {sample.n_selected:,} selected particles (random sample)..." if first else
                 f"reading {rows.size:,} more of {sample.n_selected:,} selected particles...")
        return self._start(job, done, "selection views", doing, on_error=failed)

    def _show_sample(self, sample: SelectionSample, reset_contrast: bool) -> None:
        """Draw a :class:`SelectionSample`: montages of raw and aligned particles with labelled cells, and the average."""
        apix = sample.run.pixel_size
        rows, columns = sample.rows, sample.columns
        cells = cell_origins(len(rows), columns, sample.box)
        texts = self._cell_texts(rows)
        raw, aligned = sample.raw, sample.aligned
        raw_layer, aligned_layer = self.view_layer("selection_raw"), self.view_layer("selection_aligned")
        fill_raw = None if reset_contrast or raw_layer is None else float(raw_layer.contrast_limits[0])
        fill_aligned = None if reset_contrast or aligned_layer is None else float(aligned_layer.contrast_limits[0])
        shown = f"{len(rows):,} of {sample.n_selected:,} selected" + (
            f" (random sample, seed {sample.seed})" if len(rows) < sample.n_selected else "")
        pose_note = "STAR pose undone" if sample.aligned_with_pose else "no rlnAnglePsi or pvaeAnglePsi in the STAR: not aligned"
        metadata = {"particle_vae_rows": rows}
        self._show_view("selection_average", sample.average, apix, f"average of {sample.n_read:,} aligned ({pose_note})",
                        layout=False)
        self._show_view("selection_raw", montage(raw, columns, fill=fill_raw), apix, f"raw: {shown}", cells, texts,
                        reset_contrast=reset_contrast, metadata={**metadata, "particle_vae_cells": raw}, layout=False)
        self._show_view("selection_aligned", montage(aligned, columns, fill=fill_aligned), apix,
                        f"aligned ({pose_note}): same cells", cells, texts, reset_contrast=reset_contrast,
                        metadata={**metadata, "particle_vae_cells": aligned})
        self._update_more_button()
        if sample.remaining == 0:
            more = "all selected particles are read"
        elif sample.montage_full:
            more = f"the montages are full ({sample.max_cells:,} cells at this box); 'show more' refines the average"
        else:
            more = f"'show more' adds {min(self.page_spin.value(), sample.remaining):,}"
        self._status(f"showing {shown}, average of {sample.n_read:,}; {more}")

    def _cell_texts(self, rows: np.ndarray) -> list[str]:
        """Labels of particles' cells: ``#row`` (the STAR row, the particle slider's position) and ``c<cluster>``."""
        run = self.run
        cluster = run.cluster_column() if run is not None else None
        clusters = None
        if cluster is not None and np.issubdtype(run.table[cluster].dtype, np.number):
            clusters = run.table[cluster].to_numpy(dtype=np.float64)[rows]
        texts = []
        for index, row in enumerate(rows):
            text = f"#{int(row)}"
            if clusters is not None and np.isfinite(clusters[index]):
                text += f" c{int(clusters[index])}"
            texts.append(text)
        return texts

    def _update_more_button(self) -> None:
        """'show more' works while the shown selection is the current one, has unread particles and no page is loading."""
        sample = self.sample
        current = sample is not None and self._sample_mask is not None and np.array_equal(self._sample_mask, self.selected)
        self.more_button.setEnabled(current and sample.remaining > 0 and not self._page_loading)

    def _check_selection(self) -> bool:
        if self.run is None:
            self._error("open a particle-vae STAR or run first (File > Open)")
            return False
        if not self.selected.any():
            self._error("nothing is selected; draw a lasso or rectangle on the latent plot first")
            return False
        return True

    def _model(self, device: str) -> ModelHandle:
        """The run's model on ``device`` (loaded once; call from a worker thread)."""
        run = self.run
        if run is None or run.run_dir is None:
            raise ParticleVAEError(f"{run.star_path if run else 'this STAR'}: no run directory found beside the STAR, so there is no "
                                   "generator to draw with; open the run directory (the folder with config.json) instead")
        key = (str(run.run_dir), device)
        if key not in self._models:
            self._models[key] = ModelHandle(run.run_dir, device=device)
        return self._models[key]

    def current_latent(self, source: str | None = None) -> np.ndarray:
        """The latent point ``(k,)`` chosen for the generator.

        Args:
            source: ``"selection"`` (mean latent of the selected particles) or
                ``"point"`` (the point clicked with the pick tool); default: the combo box.
        Raises:
            ParticleVAEError: nothing selected / no point clicked.
        """
        run = self.run
        source = source or self.point_combo.currentData()
        if run is None:
            raise ParticleVAEError("open a particle-vae STAR or run first (File > Open)")
        if source == "selection":
            if not self.selected.any():
                raise ParticleVAEError("nothing is selected; draw a lasso or rectangle on the latent plot first")
            return run.latents()[self.selected].mean(axis=0)
        if self.chosen_point is None or self.embedding is None:
            raise ParticleVAEError("no latent point chosen; click in the plot with the pick tool first")
        return scatter.latent_at(self.embedding, self.chosen_point, run.latents())

    def reconstruct(self, z=None, source: str | None = None):
        """Decode the generator at pose zero for latent ``z`` ``(k,)`` (default :meth:`current_latent`).

        Adds or updates the layer ``... reconstruction`` ``(box, box)`` (the model's box). Runs in a worker (returned).
        """
        try:
            z = self.current_latent(source) if z is None else np.asarray(z, dtype=np.float64).reshape(-1)
        except ParticleVAEError as error:
            self._error(str(error))
            return None
        device = self.device_combo.currentText()

        def job():
            model = self._model(device)
            return model.decode(z)[0], model.pixel_size

        point = "z = (" + ", ".join(f"{v:.3g}" for v in z) + ")"

        def done(result):
            image, apix = result
            self._show_view("reconstruction", image, apix, f"generator at {point}, pose zero")
            self._status(f"reconstruction at {point}, pose zero")

        return self._start(job, done, "reconstruction", f"loading the model on {device} and decoding {point}...")

    def set_traversal_end(self, which: int, z=None) -> np.ndarray | None:
        """Store the traversal's start (``which=0``) or end (``1``): ``z`` or :meth:`current_latent`."""
        try:
            value = self.current_latent() if z is None else np.asarray(z, dtype=np.float64).reshape(-1)
        except ParticleVAEError as error:
            self._error(str(error))
            return None
        self.traversal_ends[which] = value
        self._status(f"traversal {'start' if which == 0 else 'end'}: z = (" + ", ".join(f"{v:.3g}" for v in value) + ")")
        return value

    def traverse(self, steps: int | None = None, z_start=None, z_end=None):
        """Decode ``steps`` points from the start to the end latent (pose zero) into the layer
        ``... traversal`` ``(steps, box, box)``. Runs in a worker (returned)."""
        start = self.traversal_ends[0] if z_start is None else np.asarray(z_start, dtype=np.float64)
        end = self.traversal_ends[1] if z_end is None else np.asarray(z_end, dtype=np.float64)
        if start is None or end is None:
            self._error("set the traversal's start and end first (choose a point, then 'set start' / 'set end')")
            return None
        steps = int(steps or self.steps_spin.value())
        device = self.device_combo.currentText()

        def job():
            model = self._model(device)
            images, _ = model.traverse(start, end, steps)
            return images, model.pixel_size

        def done(result):
            images, apix = result
            columns = steps if steps <= MAX_TRAVERSAL_ROW else montage_columns(steps)
            cells = cell_origins(steps, columns, images.shape[-1])
            texts = [f"{i + 1}/{steps}" for i in range(steps)]
            self._show_view("traversal", montage(images, columns), apix,
                            f"traversal: {steps} steps from start to end, pose zero", cells, texts,
                            metadata={"particle_vae_cells": images})
            self._status(f"traversal of {steps} steps, start to end, left to right")

        return self._start(job, done, "traversal", f"loading the model on {device} and decoding {steps} points...")

    # =============================================================================== export

    def export_selection(self, path: str | Path, overwrite: bool = False, project_dir: str | Path | None = None) -> Path | None:
        """Write the selected particles as a STAR subset (all columns, optics; ``rlnImageName`` resolves from
        ``project_dir``, default the current folder, as RELION run there resolves it). Returns the path, ``None`` on error."""
        if not self._check_selection():
            return None
        try:
            written = export.write_subset(self.run, self.selected, path, overwrite=overwrite, project_dir=project_dir)
        except ParticleVAEError as error:
            self._error(str(error))
            return None
        self._status(f"wrote {written} ({int(self.selected.sum()):,} particles)")
        return written

    def export_table(self, path: str | Path, overwrite: bool = False, project_dir: str | Path | None = None) -> Path | None:
        """Write every particle (with the clusters added here) as a new STAR (``project_dir``: see
        :meth:`export_selection`). Returns the path, ``None`` on error."""
        if self.run is None:
            self._error("open a particle-vae STAR or run first (File > Open)")
            return None
        try:
            written = export.write_all(self.run, path, overwrite=overwrite, project_dir=project_dir)
        except ParticleVAEError as error:
            self._error(str(error))
            return None
        self._status(f"wrote {written} ({len(self.run):,} particles)")
        return written

    def add_cluster(self) -> int | None:
        """Give the selection a new ``rlnClassNumber``; updates the table layer's features and the colours."""
        if not self._check_selection():
            return None
        try:
            new_id = export.add_cluster(self.run, self.selected)
        except ParticleVAEError as error:
            self._error(str(error))
            return None
        column = export.CLUSTER_COLUMN
        if self.table_layer is not None:
            self.table_layer.features = self.run.table
        if self.colour_combo.findData(column) < 0:
            self.colour_combo.blockSignals(True)
            self.colour_combo.insertItem(1, column, column)
            self.colour_combo.blockSignals(False)
        self.set_colour(column)
        self._status(f"{int(self.selected.sum()):,} particles are now {column} {new_id}; "
                     "'export table with clusters' writes them")
        return new_id

    def _export_dialog(self):
        path, _ = QFileDialog.getSaveFileName(self, "Export selection as STAR", str(self._suggested_path("selection")),
                                              "STAR files (*.star)")
        if path:
            self.export_selection(path, overwrite=Path(path).exists())

    def _export_all_dialog(self):
        path, _ = QFileDialog.getSaveFileName(self, "Export table with clusters", str(self._suggested_path("clusters")),
                                              "STAR files (*.star)")
        if path:
            self.export_table(path, overwrite=Path(path).exists())

    def _suggested_path(self, suffix: str) -> Path:
        if self.run is None:
            return Path.cwd() / f"{suffix}.star"
        return self.run.star_path.with_name(f"{self.run.star_path.stem}_{suffix}.star")

    # =============================================================================== workers

    def _start(self, job: Callable, on_done: Callable, what: str, doing: str, on_error: Callable | None = None):
        """Run ``job`` in a thread and show ``doing`` in the status line while it runs.

        ``job`` is a function returning the result, or a generator yielding
        ``("progress", done, total)`` / ``("status", text)`` (a new ``doing``)
        and returning it; ``on_done(result)`` runs in the GUI thread,
        ``on_error(exception)`` too when the job fails (after the one-line
        notification). Returns the worker.
        """
        from superqt.utils import create_worker

        worker = create_worker(job, _start_thread=False, _ignore_errors=True)
        task = next(self._task_ids)
        self._tasks[task] = doing
        if hasattr(worker, "yielded"):
            worker.yielded.connect(lambda message: self._on_yield(task, message))
        worker.returned.connect(on_done)

        def failed(error):
            self._tasks.pop(task, None)
            self._error(_one_line(error, what))
            if on_error is not None:
                on_error(error)

        worker.errored.connect(failed)
        worker.finished.connect(lambda: self._finished(worker))
        self._workers[worker] = task
        self.busy += 1
        self.progress.setRange(0, 0)  # busy indicator until a progress value arrives
        self._render_status()
        worker.start()
        return worker

    def _on_yield(self, task: int, message):
        if message[0] == "status" and task in self._tasks:
            self._tasks[task] = message[1]
            self._render_status()
        elif message[0] == "progress":
            self.progress.setRange(0, int(message[2]))
            self.progress.setValue(int(message[1]))

    def _finished(self, worker):
        task = self._workers.pop(worker, None)
        self._tasks.pop(task, None)
        if task == self._embedding_task:
            self._embedding_task = None
        self.busy = max(0, self.busy - 1)
        if self.busy == 0:
            self.progress.setRange(0, 1)
            self.progress.setValue(1)
        self._render_status()

    @property
    def computing(self) -> list[str]:
        """What the worker threads whose results are still wanted are computing now (the status line while busy)."""
        return list(self._tasks.values())

    def _status(self, text: str):
        """Record a result or message; the status line shows it once nothing is being computed."""
        self._last_message = text
        self._render_status()

    def _render_status(self):
        self.status_label.setText("; ".join(self._tasks.values()) if self._tasks else self._last_message)

    def _error(self, text: str):
        from napari.utils.notifications import show_error

        self._status(text)
        show_error(f"particle-vae: {text}")

    def closeEvent(self, event):
        for worker in list(self._workers):
            worker.quit()
        super().closeEvent(event)


def _describe_embedding(embedding: scatter.Embedding) -> str:
    """What the plot shows, for the status line."""
    count = f"{len(embedding):,} particles"
    if embedding.kind == "pca":
        return f"PCA of the latents, {embedding.labels[0]} against {embedding.labels[1]}, {count}"
    if embedding.kind == "tsne":
        return f"t-SNE of the latents of {count}"
    x, y = embedding.labels
    return f"{y} against {x}, {count}" if y else f"{x}, {count}"


def _display_range(image: np.ndarray) -> tuple[float, float]:
    """Contrast limits: the 0.5th and 99.5th percentiles of ``image`` (a flat image gets a range of 1)."""
    finite = np.asarray(image)[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    return (low, high) if high > low else (low, low + 1.0)


def _text_size(size: float) -> dict:
    """Text settings for a font ``size`` in data units: scaled with the zoom where napari can, else a fixed size."""
    from napari.layers.utils.text_manager import TextManager

    fields = getattr(TextManager, "model_fields", None) or getattr(TextManager, "__fields__", {})
    if "scaling" in fields:
        return {"size": float(size), "scaling": True}
    return {"size": float(min(size, 10.0))}


def _layer_named(viewer, name: str):
    """The viewer's layer called ``name``, or ``None`` (napari's layer list has no ``get``)."""
    return next((layer for layer in viewer.layers if layer.name == name), None)


def _extent(layer) -> tuple[float, float]:
    """``(height, width)`` of a layer's last two axes in world units (Angstrom): pixels times scale."""
    shape = layer.data.shape
    scale = layer.scale
    return float(shape[-2] * scale[-2]), float(shape[-1] * scale[-1])


def _one_line(error: BaseException, what: str) -> str:
    if isinstance(error, ParticleVAEError):
        return str(error)
    log.error("%s failed", what, exc_info=error)
    return f"{what} failed: {type(error).__name__}: {error}".splitlines()[0]


def _devices() -> list[str]:
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA set-up must not stop the widget
        count = 0
    return ["cpu"] + (["cuda"] if count == 1 else [f"cuda:{i}" for i in range(count)])
