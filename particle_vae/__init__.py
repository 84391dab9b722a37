"""particle-vae: pose-invariant representation learning for cryo-EM particles."""

import os

__version__ = "0.1.0"

# Large CPU tensors in transparent huge pages (PyTorch >= 2.3 reads this variable once, at its first
# allocation, so it only takes effect when particle_vae is imported before torch, as the command line
# does). Without it, the page faults on the fresh activations of every step (hundreds of MB) cost a
# large share of a CPU training step (see docs/performance.md for the measurement). Set
# THP_MEM_ALLOC_ENABLE=0 to turn it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
