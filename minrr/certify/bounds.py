"""Concentration bounds on the Monte-Carlo error of a smoothed embedding.

Setting: ``h_1, ..., h_n`` are i.i.d. draws of ``h(x + z)`` with
``||h|| <= F`` (``norm_bound``), ``g = E h`` and ``g_hat`` their mean. Every
function returns ``eps`` with ``P(||g_hat - g|| > eps) <= delta``. They are
vectorised: array arguments broadcast, so one call serves every query.

``v = E ||h - g||^2 = E ||h||^2 - ||g||^2 <= F^2`` is the variance; where
nothing better is known, ``v = F^2``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BOUNDS",
    "hoeffding",
    "bernstein",
    "matrix_bernstein",
    "empirical_bernstein",
    "paper_eps",
    "paper_min_samples",
    "second_moment_upper",
]

BOUNDS = ("empirical-bernstein", "bernstein", "matrix-bernstein", "hoeffding", "paper")
"""Names accepted by :func:`minrr.certify.certify`; the first is the default."""


def hoeffding(n, delta, norm_bound):
    """Dimension-free bound from McDiarmid's bounded-differences inequality.

    ``eps = (F / sqrt(n)) (1 + sqrt(2 ln(1 / delta)))``. Replacing one sample
    moves ``||g_hat - g||`` by at most ``2F / n``, and its mean is at most
    ``sqrt(v / n) <= F / sqrt(n)``. Assumes only ``||h|| <= F``.
    """
    n, delta, f = np.asarray(n, float), np.asarray(delta, float), np.asarray(norm_bound, float)
    return f / np.sqrt(n) * (1.0 + np.sqrt(2.0 * np.log(1.0 / delta)))


def _bernstein_eps(n, log_term, norm_bound, variance):
    """Solve ``n t^2 = L (2 v + 2 (2F) t / 3)`` for ``t``: ``c + sqrt(c^2 + 2 v L / n)``."""
    c = 2.0 * norm_bound * log_term / (3.0 * n)
    return c + np.sqrt(c * c + 2.0 * variance * log_term / n)


def bernstein(n, delta, norm_bound, variance=None):
    """Bernstein's inequality for sums in a Hilbert space (Pinelis 1994).

    ``P(||sum X_i|| >= t) <= 2 exp(-t^2 / (2 sigma^2 + 2 b t / 3))`` with
    ``||X_i|| <= b``. Here ``X_i = (h_i - g) / n``, ``b = 2F / n``,
    ``sigma^2 = v / n``, so ``eps = c + sqrt(c^2 + 2 v L / n)`` with
    ``c = 2 F L / (3 n)`` and ``L = ln(2 / delta)``. Dimension-free.
    ``variance`` is ``v`` (default ``F^2``); it must be a valid upper bound.
    """
    n, delta, f = np.asarray(n, float), np.asarray(delta, float), np.asarray(norm_bound, float)
    v = f * f if variance is None else np.asarray(variance, float)
    return _bernstein_eps(n, np.log(2.0 / delta), f, v)


def matrix_bernstein(n, delta, norm_bound, dim, variance=None):
    """Tropp's (2012, Thm 1.6) rectangular matrix Bernstein for a ``dim x 1`` vector.

    Same form as :func:`bernstein` with ``L = ln((dim + 1) / delta)``; always
    looser than it for ``dim >= 2``, kept for comparison with RetrievalGuard.
    """
    n, delta, f = np.asarray(n, float), np.asarray(delta, float), np.asarray(norm_bound, float)
    v = f * f if variance is None else np.asarray(variance, float)
    return _bernstein_eps(n, np.log((np.asarray(dim, float) + 1.0) / delta), f, v)


def second_moment_upper(n, delta, norm_bound, sq_norm_mean, sq_norm_var):
    """Upper confidence bound ``U`` on ``E ||h||^2`` (Maurer & Pontil 2009, Thm 4).

    For ``X_i = ||h_i||^2 / F^2`` in [0, 1] with sample mean ``m`` and unbiased
    sample variance ``V``: ``E X <= m + sqrt(2 V ln(2/delta) / n) +
    7 ln(2/delta) / (3 (n - 1))`` with probability ``>= 1 - delta``. Returned
    in the units of ``||h||^2`` and capped at ``F^2``.
    """
    n, delta, f = np.asarray(n, float), np.asarray(delta, float), np.asarray(norm_bound, float)
    scale = f * f
    log_term = np.log(2.0 / delta)
    m = np.asarray(sq_norm_mean, float) / scale
    var = np.asarray(sq_norm_var, float) / (scale * scale)
    upper = m + np.sqrt(2.0 * var * log_term / n) + 7.0 * log_term / (3.0 * (n - 1.0))
    return np.minimum(upper, 1.0) * scale


def empirical_bernstein(n, delta, norm_bound, mean_norm, second_moment=None, *,
                        sq_norm_mean=None, sq_norm_var=None, iterations=60):
    """Variance-adaptive Bernstein bound with ``v`` replaced by a valid upper bound ``v_bar``.

    On the event of :func:`bernstein`, ``||g|| >= ||g_hat|| - phi(v)``, so
    ``v = E||h||^2 - ||g||^2 <= S - max(0, ||g_hat|| - phi(v))^2`` where
    ``S >= E||h||^2``. ``v_bar`` is the largest ``w`` in ``[0, S]`` with
    ``w <= S - max(0, ||g_hat|| - phi(w))^2``; the right side is concave and
    increasing in ``w``, so the feasible set is an interval ``[0, v_bar]``
    found by bisection. Since ``phi`` increases, ``eps = phi(v_bar) >= phi(v)``.

    ``S`` is known exactly (``second_moment``) when every draw has the same
    norm (normalised embeddings, ``S = F^2``): then ``eps`` holds at
    ``delta``. Otherwise pass the draws' ``sq_norm_mean`` and unbiased
    ``sq_norm_var``: ``S`` becomes :func:`second_moment_upper` and delta is
    split evenly between the two events.

    Parameters
    ----------
    n : int, number of draws per estimate.
    delta : float, failure probability.
    norm_bound : float, F.
    mean_norm : (N,) array, ``||g_hat||``.
    second_moment : (N,) array or float, exact ``E ||h||^2`` when known.
    """
    n, f = float(n), float(norm_bound)
    mean_norm = np.asarray(mean_norm, float)
    if second_moment is not None:
        moment, phi_delta = np.broadcast_to(np.asarray(second_moment, float), mean_norm.shape), delta
    else:
        if sq_norm_mean is None or sq_norm_var is None:
            raise ValueError("empirical_bernstein: give second_moment, or sq_norm_mean and sq_norm_var")
        moment = second_moment_upper(n, delta / 2.0, f, sq_norm_mean, sq_norm_var)
        phi_delta = delta / 2.0
    moment = np.minimum(moment, f * f)
    log_term = np.log(2.0 / phi_delta)

    def slack(w):  # >= 0 exactly on the feasible set [0, v_bar]
        shrunk = np.maximum(0.0, mean_norm - _bernstein_eps(n, log_term, f, w))
        return moment - shrunk * shrunk - w

    # Bisection keeps lo feasible and hi at or above v_bar; hi is the conservative answer.
    lo, hi = np.zeros_like(mean_norm), moment.copy()
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        ok = slack(mid) >= 0
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid)
    return _bernstein_eps(n, log_term, f, hi)


def paper_eps(n, alpha, norm_bound, dim):
    """RetrievalGuard's printed per-embedding error ``sqrt(8 F^2 ln((k+1)/(alpha/4)) / (3 n))``.

    The paper subtracts four of these from the margin (query twice, two
    gallery points, each at ``alpha / 4``). It comes from Tropp's matrix
    Bernstein with ``v <= F^2`` and ``t <= F / 2``, which is self-consistent
    only for ``n >= paper_min_samples(alpha, dim)``.
    """
    n, alpha, f = np.asarray(n, float), np.asarray(alpha, float), np.asarray(norm_bound, float)
    return np.sqrt(8.0 * f * f * np.log((np.asarray(dim, float) + 1.0) / (alpha / 4.0)) / (3.0 * n))


def paper_min_samples(alpha, dim) -> int:
    """Smallest ``n`` for which the paper's bound is valid: ``(32/3) ln(4 (k + 1) / alpha)``."""
    return int(np.ceil(32.0 / 3.0 * np.log(4.0 * (dim + 1.0) / alpha)))
