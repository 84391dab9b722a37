"""The versioned configuration of a run directory (``RUN/config.json``).

``config.json`` is a JSON object::

    {"schema_version": 1,
     "data": {...},          data settings (see particle_vae.engine.data)
     "train": {...},         every TrainSettings field
     "ctf": false,           whether the likelihood applied the particles' CTF
     "model": {"model": NAME, ...every field of that model's config class},
     "pixel_size": 3.0,      Angstrom per model pixel (null: unknown)
     "box": 16,              the model's image size, pixels
     "class_values": null}   the label values of a labelled run, in class order

Writing always stores :data:`SCHEMA_VERSION`. Reading (:meth:`RunConfig.read`)
migrates an older version step by step to the current one (:data:`MIGRATIONS`)
and then checks it: an unknown key (at the top level, among the training
settings or among the model settings), a missing one or an impossible model
setting is a :class:`~particle_vae.errors.InputFileError` whose one line names
the file, the key and what to do. A newer version than this program knows is
refused the same way (upgrade particle-vae).

Versions:

* 0 -- the file written before versioning, recognised by having no
  ``schema_version`` key. Its reader rebuilt the model with
  ``config_class(**settings)`` and the training settings with
  ``TrainSettings(**settings)``, so a field the file lacks meant the dataclass
  default; the migration to 1 writes those values out explicitly (except the
  fields of :data:`V0_PINNED`, for which the default has changed since: those get
  the value the run was trained with).
* 1 -- the same content plus ``schema_version``; every field written.
* 2 -- the training setting ``grad_clip_factor`` (gradient-spike clipping);
  runs of versions 0 and 1 were trained without it, so the migration writes 0
  (never clip), which a resumed run then keeps whatever the default becomes.

The rule for missing fields: in a file of the current version, every field of
the model's config class and of ``TrainSettings`` must be present. A missing
field means "use the dataclass default" only where a migration says so, because
the default of today may not be what an older run was trained with. So a change
to a model config class or to ``TrainSettings`` goes with a new version:

* a new field (it must have a default): bump :data:`SCHEMA_VERSION` and add a
  migration from the previous version that sets the field, in files that lack
  it, to the value that reproduces what older runs did (usually the old
  behaviour, not necessarily the new default); add it to the fields the older
  migrations pin if those migrations would otherwise fill in a changed default;
* a renamed field: bump and rename in the migration;
* a removed field: bump and drop it in the migration (after checking that the
  value it held is what the code now does);
* a changed default: bump and, in the migration, write the old default where
  older files relied on it (for version 0: add it to :data:`V0_PINNED`).

The data settings (``"data"``) are a free-form dict read by
:func:`particle_vae.engine.data.prepare_data` and are not checked here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from particle_vae.errors import InputFileError

#: the version every config.json is written with
SCHEMA_VERSION = 2

#: top-level keys of a current config.json, in the order they are written
CONFIG_KEYS = ("schema_version", "data", "train", "ctf", "model", "pixel_size", "box", "class_values")

#: model name -> {field: value} for version-0 files that lack the field: the value those runs were trained
#: with, where it is not (or may not stay) the dataclass default. Applied only to fields the model has.
V0_PINNED: dict[str, dict[str, object]] = {
    # the LeakyReLU slope became a setting after version 0; every network used 0.2 before
    "target-vae": {"leaky_relu_slope": 0.2},
}

#: training settings that version-0 files lack and whose value for those runs is not today's default
#: (the migration to version 2 writes the same value for version-1 files)
V0_TRAIN_PINNED: dict[str, object] = {"grad_clip_factor": 0.0}

_FIX_UNKNOWN = ("rename it to one of those (a hand edit or an old name) or remove it, or read this run with the "
                "particle-vae version that wrote it (a newer or modified one)")
_FIX_MISSING = "add it with the value the run was trained with, or train the run again"


def _dataclass_defaults(cls: type) -> dict[str, object]:
    """Field -> default value of a dataclass, for the fields that have one."""
    defaults = {}
    for item in dataclasses.fields(cls):
        if item.default is not dataclasses.MISSING:
            defaults[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            defaults[item.name] = item.default_factory()
    return defaults


def _train_settings_class() -> type:
    from particle_vae.engine.trainer import TrainSettings  # the trainer imports the run directory, which imports this

    return TrainSettings


def _models() -> dict:
    from particle_vae.models import MODELS

    return MODELS


def _migrate_0_to_1(config: dict) -> dict:
    """Version 0 (no ``schema_version``) -> 1: write out the defaults that the version-0 reader filled in."""
    config.setdefault("ctf", False)
    config.setdefault("pixel_size", None)
    config.setdefault("class_values", None)
    model = config.get("model")
    if isinstance(model, dict):
        if "box" not in config and "box" in model:
            config["box"] = model["box"]
        name = model.get("model")
        cls = _models().get(name) if isinstance(name, str) else None
        if cls is not None:
            fill = _dataclass_defaults(cls.config_class)
            fill.update({key: value for key, value in V0_PINNED.get(name, {}).items() if key in fill})
            names = [item.name for item in dataclasses.fields(cls.config_class)]
            ordered = {"model": name}  # the field order config_dict() writes; unknown keys stay (and are refused later)
            ordered.update({key: model[key] if key in model else fill[key] for key in names if key in model or key in fill})
            ordered.update({key: value for key, value in model.items() if key not in ordered})
            config["model"] = ordered
    train = config.get("train")
    if isinstance(train, dict):
        config["train"] = {**_dataclass_defaults(_train_settings_class()), **V0_TRAIN_PINNED, **train}
    config["schema_version"] = 1
    return config


def _migrate_1_to_2(config: dict) -> dict:
    """Version 1 -> 2: runs trained before gradient-spike clipping existed never clipped."""
    train = config.get("train")
    if isinstance(train, dict):
        train.setdefault("grad_clip_factor", 0.0)
    config["schema_version"] = 2
    return config


#: version v -> the function that turns a file of version v into one of version v + 1
MIGRATIONS: dict[int, Callable[[dict], dict]] = {0: _migrate_0_to_1, 1: _migrate_1_to_2}


@dataclass
class RunConfig:
    """The settings that rebuild a run's data pipeline, model and training (its config.json).

    Attributes:
        data: data settings (:func:`particle_vae.engine.data.prepare_data`).
        train: :class:`~particle_vae.engine.trainer.TrainSettings` fields.
        model: ``{"model": name, **fields}`` as :meth:`PoseVAE.config_dict` writes it.
        ctf: whether training applied the particles' CTF.
        pixel_size: Angstrom per model pixel (``None``: unknown).
        box: the model's image size, pixels.
        class_values: label values in class order (labelled runs), else ``None``.
        schema_version: always :data:`SCHEMA_VERSION` once read or built.
    """

    data: dict
    train: dict
    model: dict
    ctf: bool = False
    pixel_size: float | None = None
    box: int | None = None
    class_values: list | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        """The JSON content, keys in the written order (:data:`CONFIG_KEYS`), at :data:`SCHEMA_VERSION`."""
        values = dataclasses.asdict(self)
        values["schema_version"] = SCHEMA_VERSION
        return {key: values[key] for key in CONFIG_KEYS}

    def to_json(self) -> str:
        """The text of config.json."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, raw: object, path: str | Path, current: bool = False) -> RunConfig:
        """Migrate (unless ``current``) and check the content of a config.json.

        Args:
            raw: the parsed JSON (not modified).
            path: the file it came from (named in errors).
            current: ``raw`` is this program's own content at :data:`SCHEMA_VERSION`
                (being written), with or without the ``schema_version`` key: no migration.
        Raises:
            InputFileError: not an object, a version newer than :data:`SCHEMA_VERSION`,
                an unknown or missing key, impossible model settings.
        """
        if not isinstance(raw, Mapping):
            raise InputFileError(f"is not a run configuration (a JSON object), it holds a JSON {type(raw).__name__}", path,
                                 "restore it or train again with --overwrite")
        config = copy.deepcopy(dict(raw))
        version = SCHEMA_VERSION if current else config.get("schema_version", 0)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InputFileError(f"schema_version must be a whole number of at least 0, not {version!r}", path,
                                 f"set it to the version that wrote the file ({SCHEMA_VERSION} for this particle-vae)")
        if version > SCHEMA_VERSION:
            raise InputFileError(f"was written by a newer particle-vae (schema version {version}; this one reads versions up to "
                                 f"{SCHEMA_VERSION})", path, "upgrade particle-vae to read this run")
        while version < SCHEMA_VERSION:
            config = MIGRATIONS[version](config)
            version += 1
        config["schema_version"] = SCHEMA_VERSION
        _check(config, path)
        return cls(**{key: config[key] for key in CONFIG_KEYS})

    @classmethod
    def read(cls, path: str | Path) -> RunConfig:
        """Read, migrate and check ``path`` (a config.json).

        Raises:
            InputFileError: unreadable JSON, or any problem :meth:`from_dict` reports.
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputFileError(f"cannot be read as a run configuration ({type(exc).__name__})", path,
                                 "restore it or train again with --overwrite") from None
        return cls.from_dict(raw, path)


def _check(config: dict, path: str | Path) -> None:
    """One-line errors for unknown, missing or impossible keys of a migrated config."""
    _check_fields(config, CONFIG_KEYS, "key", path, known_text=f"a run configuration has {', '.join(CONFIG_KEYS)}")
    for key in ("data", "train", "model"):
        if not isinstance(config[key], dict):
            raise InputFileError(f"{key!r} must be a JSON object, not {type(config[key]).__name__}", path,
                                 "restore the file or train again with --overwrite")
    _check_fields(config["train"], _field_names(_train_settings_class()), "training setting", path, where='"train"')
    models = _models()
    name = config["model"].get("model")
    if name not in models:
        raise InputFileError(f"unknown model {name!r} in \"model\" (known: {', '.join(models)})", path,
                             "read this run with the particle-vae version that wrote it")
    settings = {key: value for key, value in config["model"].items() if key != "model"}
    config_class = models[name].config_class
    _check_fields(settings, _field_names(config_class), f"{name} model setting", path, where='"model"')
    try:
        model_config = config_class(**settings)
        if hasattr(model_config, "validate"):
            model_config.validate()
    except (TypeError, ValueError) as error:
        raise InputFileError(f"impossible {name} model settings in \"model\" ({error})", path,
                             "correct the value or train the run again") from None


def _field_names(cls: type) -> list[str]:
    """The field names of the dataclass ``cls``, in order."""
    return [item.name for item in dataclasses.fields(cls)]


def _check_fields(settings: Mapping, known: Sequence[str], what: str, path: str | Path, where: str | None = None,
                  known_text: str | None = None) -> None:
    """A one-line error for the first key of ``settings`` not in ``known``, else for the first of ``known``
    that ``settings`` lacks.

    Args:
        settings: the keys to check (a JSON object of the config, or the config itself).
        known: the keys it must hold, no more and no fewer.
        what: what a key is, in the errors (``"key"``, ``"training setting"``).
        path: the file, named in the errors.
        where: the config key that holds ``settings`` (``'"train"'``), said as ``in WHERE``; ``None``: the top level.
        known_text: what the error of an unknown key says in brackets (default: ``known: KEY, ...``).
    """
    place = f" in {where}" if where is not None else ""
    for key in settings:
        if key not in known:
            listing = known_text if known_text is not None else f"known: {', '.join(known)}"
            raise InputFileError(f"unknown {what} {key!r}{place} ({listing})", path, _FIX_UNKNOWN)
    for key in known:
        if key not in settings:
            raise InputFileError(f"lacks the {what} {key!r}{place}", path, _FIX_MISSING)
