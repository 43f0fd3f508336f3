"""minrr: provably robust and adversarially aware image retrieval.

The core is NumPy in, NumPy out, with Numba kernels; it never imports torch.
"""

import os

__version__ = "0.1.0"

# Numba's parallel kernels (OpenMP layer) and torch each keep a pool of OpenMP threads, and
# libgomp's threads spin after each parallel region by default. On a small machine the two
# pools then steal each other's cores: torch training after a Numba kernel ran 4-30x slower
# on 2 cores. Passive waiting costs a few microseconds per region and removes that; a value
# the user set is kept. It takes effect for every OpenMP runtime loaded after this import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name: str):
    """``minrr.certify_model``, the one-call certification (:func:`minrr.certify.certify_model`), imported
    when first used, so that ``import minrr`` itself stays light."""
    if name == "certify_model":
        from .certify import certify_model

        return certify_model
    raise AttributeError(f"module 'minrr' has no attribute {name!r}")
