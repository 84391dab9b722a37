"""Model zoo: one file per model, all behind :class:`particle_vae.models.base.PoseVAE`.

A model's file holds its class: its config dataclass (extending
:class:`~particle_vae.models.base.ModelConfig`), its command-line options
(:attr:`PoseVAE.options`) and whether it trains with labels
(:attr:`PoseVAE.supports_labels`). Adding one is that file plus its line in
:data:`MODELS`; ``train``, ``infer``, run directories and analysis need no change.
"""

from __future__ import annotations

from dataclasses import MISSING, fields

from particle_vae.models.base import LossTerms, ModelConfig, ModelOption, PoseVAE, Readout
from particle_vae.models.equivae import EquiVAE, EquiVAEConfig
from particle_vae.models.mce_vae import MCEVAE, MCEVAEConfig
from particle_vae.models.spatial_vae import SpatialVAE, SpatialVAEConfig
from particle_vae.models.target_vae import TargetVAE, TargetVAEConfig
from particle_vae.models.vae import VAE, BetaVAE, BetaVAEConfig, VAEConfig

#: model name (``train --model NAME``, the ``"model"`` of a run's config.json) -> class; one line per model
MODELS: dict[str, type[PoseVAE]] = {
    "target-vae": TargetVAE,
    "vae": VAE,
    "beta-vae": BetaVAE,
    "spatial-vae": SpatialVAE,
    "mce-vae": MCEVAE,
    "equivae": EquiVAE,
}


def build_model(config: dict) -> PoseVAE:
    """Rebuild a model from :meth:`PoseVAE.config_dict` output.

    Settings left out take the config class's defaults (this is the library call; a run's
    config.json is checked, and migrated from older versions, by
    :class:`particle_vae.engine.run_config.RunConfig` before it gets here).

    Raises:
        ValueError: an unknown model or setting, a missing setting without a default, or
            impossible settings (the config class's ``validate``).
    """
    settings = dict(config)
    name = settings.pop("model")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    cls = MODELS[name]
    known = [item.name for item in fields(cls.config_class)]
    unknown = [key for key in settings if key not in known]
    if unknown:
        raise ValueError(f"unknown {name} setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    required = [item.name for item in fields(cls.config_class)
                if item.default is MISSING and item.default_factory is MISSING and item.name not in settings]
    if required:
        raise ValueError(f"the {name} setting(s) {', '.join(map(repr, required))} must be given")
    return cls(cls.config_class(**settings))


__all__ = ["MODELS", "build_model", "PoseVAE", "ModelConfig", "ModelOption", "LossTerms", "Readout", "TargetVAE", "TargetVAEConfig", "VAE", "VAEConfig", "BetaVAE", "BetaVAEConfig",
           "SpatialVAE", "SpatialVAEConfig", "MCEVAE", "MCEVAEConfig", "EquiVAE", "EquiVAEConfig"]
