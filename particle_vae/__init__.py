"""particle-vae: pose-invariant representation learning for cryo-EM particles."""

__version__ = "0.1.0"
