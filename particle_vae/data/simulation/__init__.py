"""Simulated cryo-EM particle stacks with known poses, classes, CTF and noise.

Modules: :mod:`.config` (settings), :mod:`.presets`, :mod:`.poses` (SO(3)/view and shift
sampling), :mod:`.projection` (the projector), :mod:`.validation`, :mod:`.simulator`
(ground truth and rendering) and :mod:`.writer` (:func:`run_simulation`: the MRC/STAR/JSON
outputs); the public names are re-exported here.

Image formation, per particle (see ``docs/simulator.md``):

1. pose: RELION Euler angles ``(rot, tilt, psi)`` in degrees, uniform on SO(3)
   (Haar measure: ``rot, psi`` uniform, ``cos(tilt)`` uniform) or a limited
   view set; the projection of a density ``V`` indexed ``[z, y, x]`` and
   centred on voxel ``box // 2`` is
   ``P(x, y) = sum_z V(A^T (x, y, z))`` with ``A = euler_to_matrix(rot, tilt, psi)``,
   evaluated with trilinear interpolation (``torch.nn.functional.grid_sample``)
   at unit steps along ``z`` (:class:`Projector`);
2. optional Fourier-crop downsampling to the output box (the centre pixel
   stays at ``box // 2``; the pixel size grows by ``box / output box``);
3. shift: the particle centre is moved to ``d`` (pixels of the output box) with
   an exact Fourier phase ramp, so RELION's origin is ``o = -d``
   (``rlnOriginXAngst, rlnOriginYAngst = -d * pixel_size``) and the image obeys
   RELION's forward model ``obs(x) = P_{rot,tilt,0}(R(psi)(x + o))``;
4. CTF (:mod:`particle_vae.data.ctf`, RELION convention) by Fourier
   multiplication in the box;
5. white Gaussian noise at a requested SNR, where
   ``SNR = var(noise-free image over the whole box) / var(noise)``, either for
   the dataset (one noise level for all particles: the mean image variance of
   the first ``min(n, 256)`` particles divided by the SNR) or per particle;
6. optionally (``ctf_premultiplied``, RELION 5's ``rlnCtfDataAreCtfPremultiplied = 1``)
   the recorded image of steps 4-5 is multiplied once more by its own CTF, as
   RELION's premultiplied extraction does: the stored particle is
   ``CTF * (CTF * projection + noise)``. The SNR of step 5 is that of the
   recorded image before this multiplication (the microscope's SNR; the noise
   level, and with it the noise drawn for each particle, is the same as without
   premultiplication). The multiplication leaves the ratio at each Fourier
   component unchanged (signal and noise are both multiplied by the CTF) but
   colours the noise, so the variance ratio of the stored image over the box
   differs from the requested SNR. Noise-free, the stored particle is the
   inverse transform of ``CTF**2 * FT(projection)`` (exactly so in an odd box;
   in an even box the self-mirrored Nyquist column of the ``rfft2`` grid can
   only carry the CTF averaged over ``ky`` and ``-ky``, so there the square of
   that average is applied).

:func:`run_simulation` streams batches into ``particles.mrcs`` (and optionally
``clean.mrcs``, the noise-free particles as stored (premultiplied when the
particles are), and ``centred.mrcs``, the projections
with ``psi = 0`` and no shift before the CTF), then writes ``particles.star``
and ``simulation.json``.
"""

from particle_vae.data.simulation.config import SHIFT_DISTRIBUTIONS, SNR_MODES, VIEWS, SimulationConfig, StructureSpec
from particle_vae.data.simulation.poses import sample_rotations, sample_shifts
from particle_vae.data.simulation.presets import SIMULATION_PRESETS, preset_config
from particle_vae.data.simulation.projection import Projector, project_volume
from particle_vae.data.simulation.simulator import ParticleParameters, Simulator
from particle_vae.data.simulation.validation import validate_config
from particle_vae.data.simulation.writer import SimulationResult, run_simulation

__all__ = [
    "VIEWS",
    "SHIFT_DISTRIBUTIONS",
    "SNR_MODES",
    "SIMULATION_PRESETS",
    "StructureSpec",
    "SimulationConfig",
    "ParticleParameters",
    "SimulationResult",
    "Simulator",
    "Projector",
    "project_volume",
    "sample_rotations",
    "sample_shifts",
    "preset_config",
    "validate_config",
    "run_simulation",
]
