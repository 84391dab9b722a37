"""napari plugin for particle-vae: open a trained run, explore its latent space, look at and export particles.

Contributions (see ``napari.yaml``): a reader for particle STAR files written
by ``particle-vae infer``/``analyze`` and for run folders, the latent-space
explorer dock widget, and a one-click simulated sample run. The Qt-free parts
(:mod:`~napari_particle_vae.run_data`, :mod:`~napari_particle_vae.scatter`,
:mod:`~napari_particle_vae.views`, :mod:`~napari_particle_vae.export`,
:mod:`~napari_particle_vae.sample_data`) can be used from scripts.
"""

__version__ = "0.1.0"
