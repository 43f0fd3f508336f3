"""minrr: provably robust and adversarially aware image retrieval.

The core is NumPy in, NumPy out, with Numba kernels; it never imports torch.
"""

__version__ = "0.1.0"
