"""Model zoo: one file per model, all behind :class:`particle_vae.models.base.PoseVAE`."""

from __future__ import annotations

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
    """Rebuild a model from :meth:`PoseVAE.config_dict` output."""
    settings = dict(config)
    name = settings.pop("model")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    cls = MODELS[name]
    return cls(cls.config_class(**settings))


__all__ = ["MODELS", "build_model", "PoseVAE", "LossTerms", "Readout", "TargetVAE", "TargetVAEConfig", "VAE", "VAEConfig", "BetaVAE", "BetaVAEConfig",
           "SpatialVAE", "SpatialVAEConfig", "MCEVAE", "MCEVAEConfig", "EquiVAE", "EquiVAEConfig"]
