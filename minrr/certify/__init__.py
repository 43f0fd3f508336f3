"""RetrievalGuard's certification: smoothing estimates, concentration bounds, margins and radii.

``smoothing`` (Monte-Carlo estimates of the smoothed embedding), ``bounds`` (the error bounds
on them), ``margin`` (the retrieval margin over the gallery, blocked GEMMs), ``halfspace``
(the halfspace form of the certificate), ``radius`` (margin to certified l2 radius) and
``certificates`` (certified Recall@k from all of them), whose public names are this package's:
``from minrr.certify import certify``. They are imported when first used, so that importing
one light module (``minrr.certify.bounds``) does not compile the certificates' kernels.
"""

import importlib

__all__ = ["CERTIFICATES", "CertifyResult", "certify", "certify_model", "error_bound", "certified_recall",
           "summarize", "default_radii"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".certificates", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
