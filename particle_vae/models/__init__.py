"""Model zoo: one file per model, all behind :class:`particle_vae.models.base.PoseVAE`."""

from __future__ import annotations

from dataclasses import MISSING, fields

from particle_vae.models.base import LossTerms, PoseVAE, Readout
from particle_vae.models.equivae import EquiVAE, EquiVAEConfig
from particle_vae.models.mce_vae import MCEVAE, MCEVAEConfig
from particle_vae.models.spatial_vae import SpatialVAE, SpatialVAEConfig
from particle_vae.models.target_vae import TargetVAE, TargetVAEConfig
from particle_vae.models.vae import VAE, BetaVAE, BetaVAEConfig, VAEConfig

#: model name -> class
MODELS: dict[str, type[PoseVAE]] = {TargetVAE.name: TargetVAE, VAE.name: VAE, BetaVAE.name: BetaVAE, SpatialVAE.name: SpatialVAE,
                                 MCEVAE.name: MCEVAE, EquiVAE.name: EquiVAE}


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


__all__ = ["MODELS", "build_model", "PoseVAE", "LossTerms", "Readout", "TargetVAE", "TargetVAEConfig", "VAE", "VAEConfig", "BetaVAE", "BetaVAEConfig",
           "SpatialVAE", "SpatialVAEConfig", "MCEVAE", "MCEVAEConfig", "EquiVAE", "EquiVAEConfig"]
