"""Repository-wide pytest set-up, for the core tests and the napari plugin's tests alike."""

from __future__ import annotations

import importlib.util
import logging
import numbers
from collections.abc import Mapping

import particle_vae

particle_vae.enable_huge_pages()  # before torch is imported: large tensors in huge pages, as on the command line


class _ArgsSafeLogRecord(logging.LogRecord):
    """napari's test plugin swaps in a LogRecord that turns every argument into a string (against reference
    leaks); it mangles a single mapping argument (``log.info("%s", some_dict)`` then fails) and numpy integers
    given to ``%d``. This keeps numbers and mappings as they are and stringifies the rest."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args and not isinstance(self.args, Mapping):
            self.args = tuple(arg if isinstance(arg, numbers.Number) else str(arg) for arg in self.args)


def _fix_napari_log_records() -> None:
    """Replace the record class napari's autouse session fixture installs (it looks it up when the session starts,
    after collection has imported this file), so the core's log messages format as without napari."""
    if importlib.util.find_spec("napari") is None:
        return
    try:
        import napari.utils._testsupport as support
    except Exception:  # noqa: BLE001 - napari without Qt: its test plugin is not active either
        return
    if hasattr(support, "LeakSafeLogRecord"):
        support.LeakSafeLogRecord = _ArgsSafeLogRecord


_fix_napari_log_records()
