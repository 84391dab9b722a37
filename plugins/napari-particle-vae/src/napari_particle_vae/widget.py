"""The latent-space explorer dock widget (Qt).

Controls, top to bottom (docs/napari.md describes each):

* run: the ``<name> table`` layer opened by the reader;
* plot: two columns (any numeric STAR column, latents first), or a PCA or
  t-SNE projection of all latent dimensions (computed in a worker thread);
  colour by the cluster column or any other column;
* the scatter plot, with a lasso, rectangle or pick tool (pick: hovering
  shows the particle under the cursor, clicking also chooses the latent point
  for reconstruction); replace / add / remove selection modes;
* selection views: raw and aligned particles of the selection and their
  average (worker thread, with progress);
* generator: device, the latent point (selection mean or clicked point),
  reconstruction at pose zero, and a traversal between two stored points;
* export: the selection as a STAR subset, the selection as a new cluster id,
  and the whole table with its clusters.

Everything long runs in a worker thread; problems a user can fix are shown as
one-line notifications. The methods used by the buttons are public
(:meth:`select_rectangle`, :meth:`show_selection`, :meth:`reconstruct`, ...)
so scripts and tests can drive the widget without a mouse.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
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
from napari_particle_vae.reader import METADATA_KEY, ROLE_KEY
from napari_particle_vae.run_data import ParticleRun
from napari_particle_vae.views import ModelHandle, iter_selection_views
from particle_vae.errors import ParticleVAEError

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

PROJECTION_LABELS = {"columns": "two columns", "pca": "PCA of the latents", "tsne": "t-SNE of the latents"}
TOOLS = ("lasso", "rectangle", "pick")
MODES = ("replace", "add", "remove")


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
        self._workers: set = set()
        self._models: dict[tuple[str, str], ModelHandle] = {}
        self._hover_row: int | None = None
        self._embedding_token = 0
        self._grid_done = False
        self._known_tables: list = []

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
        self.show_button.clicked.connect(self.show_selection)
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
            self.run_combo.setCurrentIndex(index)
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
        if kind == "columns":
            x, y = self.x_combo.currentText(), self.y_combo.currentText()
            if not x or not y:
                return None
            self._set_embedding(scatter.embed_columns(run.table, x, y, run.latent_columns), token)
            return None
        latents = run.latents()
        compute = scatter.embed_pca if kind == "pca" else scatter.embed_tsne

        def job():
            yield ("status", f"computing the {PROJECTION_LABELS[kind]} of {len(latents):,} particles...")
            return compute(latents)

        return self._start(job, lambda embedding: self._set_embedding(embedding, token), f"{PROJECTION_LABELS[kind]}")

    def _set_embedding(self, embedding: scatter.Embedding, token: int):
        if token != self._embedding_token or self.run is None:
            return  # a newer plot was asked for meanwhile
        self.embedding = embedding
        self.colours = scatter.colouring(self.run.table, self.colour_combo.currentData(), embedding.rows)
        self.chosen_point = None
        self._draw()

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
        for column in ([run.cluster_column()] if run.cluster_column() else []) + run.latent_columns[:4] + ["rlnAnglePsi"]:
            if column in values.index:
                value = values[column]
                parts.append(f"{column} {value:.3g}" if isinstance(value, (float, np.floating)) else f"{column} {value}")
        self.hover_label.setText(", ".join(parts))
        if self._particles_layer() is not None:
            self.viewer.dims.set_point(0, row)  # world coordinate of axis 0 = STAR row (scale 1 on that axis)

    def _particles_layer(self):
        for layer in self.viewer.layers:
            if layer.metadata.get(ROLE_KEY) == "particles" and layer.metadata.get(METADATA_KEY) is self.run:
                return layer
        return None

    # =============================================================================== views

    def _base_name(self) -> str:
        name = self.table_layer.name if self.table_layer is not None else "particle-vae"
        return name.removesuffix(" table")

    def _scale(self, pixel_size: float | None, ndim: int) -> tuple:
        apix = 1.0 if pixel_size is None else float(pixel_size)
        return (1.0,) * (ndim - 2) + (apix, apix)

    def _set_layer(self, name: str, data: np.ndarray, pixel_size: float | None, **kwargs):
        kwargs = {"colormap": "gray", **kwargs}
        scale = self._scale(pixel_size, data.ndim)
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if layer.data.shape == data.shape and tuple(layer.scale) == scale:
                layer.data = data
                layer.reset_contrast_limits()
                return layer
            self.viewer.layers.remove(name)
        return self.viewer.add_image(data, name=name, scale=scale, **kwargs)

    def _show_in_grid(self):
        """Lay the layers out side by side (napari's grid mode) the first time a view is added."""
        if not self._grid_done:
            self._grid_done = True
            canvas = getattr(self.viewer, "canvas", None)  # napari >= 0.9 moved the grid to viewer.canvas
            grid = canvas.grid if canvas is not None and hasattr(canvas, "grid") else self.viewer.grid
            grid.enabled = True
        self.viewer.reset_view()

    def show_selection(self):
        """Add (or update) layers ``... selection raw`` ``(S, N, N)``, ``... selection aligned`` ``(S, N, N)``
        and ``... selection average`` ``(N, N)``; runs in a worker (returned)."""
        run = self.run
        if not self._check_selection():
            return None
        if run.image_error is not None:
            self._error(run.image_error)
            return None
        selected = self.selected.copy()

        def job():
            yield ("status", f"reading {int(selected.sum()):,} selected particles...")
            steps = iter_selection_views(run, selected)
            while True:
                try:
                    done, total = next(steps)
                except StopIteration as finished:
                    return finished.value
                yield ("progress", done, total)

        def done(result):
            base, apix = self._base_name(), run.pixel_size
            note = "" if result.aligned_with_pose else " (no rlnAnglePsi in the STAR: not aligned)"
            self._set_layer(f"{base} selection raw", result.raw, apix)
            self._set_layer(f"{base} selection aligned", result.aligned, apix)
            self._set_layer(f"{base} selection average", result.average, apix)
            self._show_in_grid()
            self._status(f"{len(result.rows)} particles shown, {len(result.averaged_rows)} averaged{note}")

        return self._start(job, done, "selection views")

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
            yield ("status", f"loading the model on {device} and decoding...")
            model = self._model(device)
            return model.decode(z)[0], model.pixel_size

        def done(result):
            image, apix = result
            self._set_layer(f"{self._base_name()} reconstruction", image, apix)
            self._show_in_grid()
            self._status("reconstruction at z = (" + ", ".join(f"{v:.3g}" for v in z) + "), pose zero")

        return self._start(job, done, "reconstruction")

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
            yield ("status", f"decoding {steps} points on {device}...")
            model = self._model(device)
            images, _ = model.traverse(start, end, steps)
            return images, model.pixel_size

        def done(result):
            images, apix = result
            self._set_layer(f"{self._base_name()} traversal", images, apix)
            self._show_in_grid()
            self._status(f"traversal of {steps} steps (slide the first axis)")

        return self._start(job, done, "traversal")

    # =============================================================================== export

    def export_selection(self, path: str | Path, overwrite: bool = False) -> Path | None:
        """Write the selected particles as a STAR subset (all columns, optics). Returns the path, ``None`` on error."""
        if not self._check_selection():
            return None
        try:
            written = export.write_subset(self.run, self.selected, path, overwrite=overwrite)
        except ParticleVAEError as error:
            self._error(str(error))
            return None
        self._status(f"wrote {written} ({int(self.selected.sum()):,} particles)")
        return written

    def export_table(self, path: str | Path, overwrite: bool = False) -> Path | None:
        """Write every particle (with the clusters added here) as a new STAR. Returns the path, ``None`` on error."""
        if self.run is None:
            self._error("open a particle-vae STAR or run first (File > Open)")
            return None
        try:
            written = export.write_all(self.run, path, overwrite=overwrite)
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

    def _start(self, job: Callable, on_done: Callable, what: str):
        """Run generator ``job`` in a thread; it yields ``("status", text)`` / ``("progress", done, total)`` and returns a result."""
        from superqt.utils import create_worker

        worker = create_worker(job, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_yield)
        worker.returned.connect(on_done)
        worker.errored.connect(lambda error: self._error(_one_line(error, what)))
        worker.finished.connect(lambda: self._finished(worker))
        self._workers.add(worker)
        self.busy += 1
        self.progress.setRange(0, 0)  # busy indicator until a progress value arrives
        worker.start()
        return worker

    def _on_yield(self, message):
        if message[0] == "status":
            self._status(message[1])
        elif message[0] == "progress":
            self.progress.setRange(0, int(message[2]))
            self.progress.setValue(int(message[1]))

    def _finished(self, worker):
        self._workers.discard(worker)
        self.busy = max(0, self.busy - 1)
        if self.busy == 0:
            self.progress.setRange(0, 1)
            self.progress.setValue(1)

    def _status(self, text: str):
        self.status_label.setText(text)

    def _error(self, text: str):
        from napari.utils.notifications import show_error

        self.status_label.setText(text)
        show_error(f"particle-vae: {text}")

    def closeEvent(self, event):
        for worker in list(self._workers):
            worker.quit()
        super().closeEvent(event)


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
