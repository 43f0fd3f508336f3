"""Names and defaults of minrr's choices, in one light module (no Numba, no SciPy).

The library takes them from here, and the command line lists them in ``--help`` without
importing the modules that compute (so ``minrr --help`` stays fast).
"""

from __future__ import annotations

__all__ = ["RADIUS_FORMS", "CERTIFICATES", "DEFAULT_CANDIDATES", "C3_FORMS", "CALIBRATION_METHODS",
           "DEFAULT_SIGMAS", "DEFAULT_SAMPLES", "DEFAULT_RADII"]

RADIUS_FORMS = ("phi", "linear")
"""Radius from a margin lower bound (:func:`minrr.certify.radius.certified_radius`); the first is the default."""
CERTIFICATES = ("halfspace", "retrievalguard")
"""Certificates of :func:`minrr.certify.certify`; the first is the default."""
DEFAULT_CANDIDATES = 5
"""Nearest relevant items tried as e+ by the halfspace certificate (REFERENCE section 1b measures 5)."""

C3_FORMS = ("soft", "hard", "soft-l1")
"""Forms of UMCD's criterion C3 (:func:`minrr.hashing.detect.inconsistency_criterion`); the first is the default."""
CALIBRATION_METHODS = ("joint", "bonferroni", "per-criterion")
"""How :class:`minrr.hashing.detect.Detector` shares its false-positive rate; the first is the default."""

DEFAULT_SIGMAS = (0.1, 0.25, 0.5, 1.0)
"""Noise levels of the bundled default job (:func:`minrr.bundled.run_bundled`)."""
DEFAULT_SAMPLES = 10_000
"""Noise draws per query of the bundled default job."""
DEFAULT_RADII = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
"""Radii of the bundled default job's table: absolute l2 radii in pixel units (images in [0, 1], 784 pixels)."""
