"""Certified l2 radius from a lower bound on the retrieval margin.

The smoothed embedding g of a base model with ``||h|| <= F`` under noise
N(0, sigma^2 I) satisfies ``||g(x) - g(x')|| <= 2F (2 Phi(||x - x'|| / (2 sigma)) - 1)``
(RetrievalGuard, Lipschitz lemma). The retrieved label cannot change while
that is below ``d / 2``, which gives the radii below for a margin lower
bound ``d_low``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erfinv, ndtr

from ..options import RADIUS_FORMS

__all__ = ["RADIUS_FORMS", "certified_radius", "lipschitz_bound"]


def certified_radius(margin_lower, sigma: float, norm_bound: float, form: str = "phi") -> np.ndarray:
    """Certified radius r for each margin lower bound ``d_low``.

    ``phi`` (default, RetrievalGuard's Theorem): ``r = 2 sigma Phi^-1(1/2 + d_low / (8F))``;
    ``inf`` once ``d_low >= 4F`` (no perturbation can move g that far).
    ``linear``: ``r = d_low sigma sqrt(pi / 2) / (2F)`` from the Lipschitz constant
    ``F sqrt(2 / (pi sigma^2))``; never larger than the ``phi`` form.
    ``d_low <= 0`` (including NaN) is not certified: r = 0.
    """
    d = np.asarray(margin_lower, dtype=np.float64)
    if form not in RADIUS_FORMS:
        raise ValueError(f"form: expected one of {', '.join(RADIUS_FORMS)}, got {form!r}")
    with np.errstate(invalid="ignore", divide="ignore"):
        if form == "phi":  # Phi^-1(1/2 + t) = sqrt(2) erfinv(2t), accurate for small t
            r = 2.0 * sigma * np.sqrt(2.0) * erfinv(np.minimum(d / (4.0 * norm_bound), 1.0))
        else:
            r = d * sigma * np.sqrt(np.pi / 2.0) / (2.0 * norm_bound)
    return np.where(d > 0, r, 0.0)


def lipschitz_bound(distance, sigma: float, norm_bound: float) -> np.ndarray:
    """Upper bound on ``||g(x) - g(x')||`` at input distance ``||x - x'||``: ``2F (2 Phi(t / 2 sigma) - 1)``."""
    return 2.0 * norm_bound * (2.0 * ndtr(np.asarray(distance, float) / (2.0 * sigma)) - 1.0)
