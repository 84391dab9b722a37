"""particle-vae: pose-invariant representation learning for cryo-EM particles."""

import os
import sys

__version__ = "0.1.0"


def enable_huge_pages() -> None:
    """Ask PyTorch to put its large CPU tensors in transparent huge pages.

    Sets ``THP_MEM_ALLOC_ENABLE=1`` unless the variable is set already
    (``THP_MEM_ALLOC_ENABLE=0`` turns huge pages off). PyTorch (2.3 and later)
    reads the variable once, at its first allocation, so this must run before
    ``torch`` is imported; once ``torch`` is imported it does nothing, leaving the
    environment of this process (and of the programs it starts) as it is. Without
    huge pages, the page faults on the fresh activations of every step (hundreds
    of MB) cost a large share of a CPU training step (docs/performance.md).
    The command line calls it at start; scripts that want it call it before
    importing ``torch``.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
