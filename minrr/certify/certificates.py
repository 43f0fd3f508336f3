"""Certification pipeline: Monte-Carlo smoothed embeddings -> error bounds -> certificate -> radius.

With probability at least ``1 - alpha`` over the query's (and, for a
Monte-Carlo gallery, the gallery's) noise draws, each reported radius r is
certified: for every ``||delta|| < r`` the smoothed model's Recall@k on
``x + delta`` is 1. A query that cannot be certified is reported with
radius 0 (the analogue of Cohen et al.'s abstain).

Certificates (``certificate=``), both on the same event ``||g_hat - g|| <= eps``:

* ``"halfspace"`` (default, :mod:`minrr.certify.halfspace`): one linear condition per
  pair of a relevant and a non-relevant gallery item, each with its own
  radius; never smaller than RetrievalGuard's (REFERENCE section 1b), and
  the larger of the two is reported, so rounding cannot make it lose.
* ``"retrievalguard"``: the margin lower bound ``d_low`` turned into a radius
  by the Lipschitz bound of g (:mod:`minrr.certify.radius`). With ``bound="paper"``
  this is the paper's certificate.

Gallery kinds:

* exact (default when a gallery is given): fixed ``(M, dim)`` points; only the
  query's error counts: ``d_low = d(g_hat) - 2 eps_q`` with ``eps_q`` at
  ``delta = alpha``.
* Monte-Carlo: smoothed gallery estimates, and leave-one-out when the queries
  are their own gallery. ``eps_q`` at ``alpha / 2`` and each gallery item's own
  ``eps_j`` at ``alpha / (2 M)`` (union bound); ``d_low`` takes each item's
  error off its own distance, which is never looser than ``2 max_j eps_j``.
* ``bound="paper"`` reproduces RetrievalGuard's printed expression,
  ``d_low = d(g_hat) - 4 eps_paper`` (d with the GEMM's rounding taken
  off), against an exact gallery only: it charges two gallery errors at the
  query's n, which does not cover a gallery of estimates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import bounds
from ..io import check_positive, check_probability
from ..labels import check_label_pair, check_labels
from .halfspace import halfspace_radii
from .margin import margins
from ..options import CERTIFICATES, DEFAULT_CANDIDATES
from .radius import certified_radius
from .smoothing import SmoothedEstimate, from_means, from_samples

__all__ = ["CERTIFICATES", "CertifyResult", "certify", "certify_model", "error_bound", "certified_recall",
           "summarize", "default_radii"]

UNIT_NORM_TOLERANCE = 1e-4


@dataclass(frozen=True)
class CertifyResult:
    """Per-query certificates, all ``(N,)`` unless noted.

    label : the query's label, (N,) int or (N, C) bool.
    nearest : index of the gallery item nearest to g_hat.
    nearest_label : that item's label.
    correct : Recall@k of the smoothed model is 1 (margin > 0).
    margin : d_k(g_hat), the margin of the Monte-Carlo estimate.
    margin_lower : d_low, lower confidence bound on the smoothed model's margin
        (RetrievalGuard's; the halfspace certificate can certify where it is <= 0).
    radius : certified l2 radius in input units (0 = not certified).
    settings : how the result was made (certificate, bound, sigma, alpha, n, ...).
    """

    label: np.ndarray
    nearest: np.ndarray
    nearest_label: np.ndarray
    correct: np.ndarray
    margin: np.ndarray
    margin_lower: np.ndarray
    radius: np.ndarray
    settings: dict = field(default_factory=dict)

    @property
    def certified(self) -> np.ndarray:
        return self.radius > 0


def _as_estimate(x, n_samples, name) -> SmoothedEstimate:
    if isinstance(x, SmoothedEstimate):
        return x
    arr = np.asarray(x)
    if arr.ndim == 3:
        if n_samples is not None and n_samples != arr.shape[1]:
            raise ValueError(f"n_samples: {name} holds {arr.shape[1]} draws per item, not {n_samples}")
        if arr.shape[1] < 2:
            raise ValueError(f"{name}: need at least 2 noisy samples per item, got {arr.shape[1]}")
        return from_samples(arr, name=name)
    if arr.ndim == 2:
        if n_samples is None:
            raise ValueError(f"n_samples: required when {name} are (N, dim) Monte-Carlo means")
        return from_means(arr, n_samples)
    raise ValueError(f"{name}: expected (N, n, dim) samples or (N, dim) means, got shape {arr.shape}")


def _check_estimate(est: SmoothedEstimate, name: str):
    if est.mean.shape[0] == 0:
        raise ValueError(f"{name}: no items")
    if not np.all(np.isfinite(est.mean)):
        raise ValueError(f"{name}: contains NaN or infinity")


def _norm_bound(norm_bound, estimates) -> float:
    """F from the user, or 1 when every sample has unit norm; checked against the samples.

    Norms up to ``1 + 1e-4`` times F are taken as rounding and F is raised to
    cover them, so the bounds stay valid for the draws actually seen.
    """
    with_norms = [e for e in estimates if e.norm_max is not None]
    if norm_bound is None:
        if len(with_norms) < len(estimates):
            raise ValueError("norm_bound: required when embeddings are given as Monte-Carlo means "
                             "(their norms do not show the bound F on ||h||)")
        low = min(float(e.norm_min.min()) for e in with_norms)
        high = max(float(e.norm_max.max()) for e in with_norms)
        if abs(low - 1.0) > UNIT_NORM_TOLERANCE or abs(high - 1.0) > UNIT_NORM_TOLERANCE:
            raise ValueError(f"norm_bound: required unless every embedding has norm 1 within "
                             f"{UNIT_NORM_TOLERANCE:g} (norms range from {low:.6g} to {high:.6g})")
        return max(1.0, high)  # rounding above 1 is tolerated, and covered
    f = check_positive(norm_bound, name="norm_bound")
    top = max((float(e.norm_max.max()) for e in with_norms), default=0.0)
    if top > f * (1.0 + UNIT_NORM_TOLERANCE):
        raise ValueError(f"norm_bound: an embedding has norm {top:.6g}, above the bound F = {f:g}")
    return max(f, top)


def error_bound(est: SmoothedEstimate, bound: str, delta: float, f: float) -> np.ndarray:
    """(N,) eps with ``P(||g_hat - g|| > eps) <= delta`` for each item, under ``bound``.

    ``empirical-bernstein`` bounds the second moment ``E||h||^2`` by ``F^2``
    for items whose draws all had one norm (exact for a normalising model,
    valid for any), by Maurer and Pontil's bound otherwise, and falls back to
    ``bernstein`` (v = F^2) when only means are known.
    ``paper`` is not a per-item bound; see :func:`minrr.certify.bounds.paper_eps`.
    """
    if bound not in bounds.BOUNDS or bound == "paper":
        raise ValueError(f"bound: expected one of {', '.join(bounds.BOUNDS[:-1])}, got {bound!r}")
    n, count, dim = est.n_samples, est.mean.shape[0], est.mean.shape[1]
    if bound == "hoeffding":
        eps = bounds.hoeffding(n, delta, f)
    elif bound == "bernstein" or (bound == "empirical-bernstein" and not est.has_sample_statistics):
        eps = bounds.bernstein(n, delta, f)
    elif bound == "matrix-bernstein":
        eps = bounds.matrix_bernstein(n, delta, f, dim)
    else:
        mean_norm = np.linalg.norm(est.mean, axis=1)
        exact = bounds.empirical_bernstein(n, delta, f, mean_norm, second_moment=f * f)
        estimated = bounds.empirical_bernstein(n, delta, f, mean_norm, sq_norm_mean=est.sq_norm_mean,
                                               sq_norm_var=est.sq_norm_var)
        eps = np.where(est.constant_norm(), exact, estimated)
    return np.broadcast_to(np.asarray(eps, dtype=np.float64), (count,))


def certify(queries, query_labels, *, sigma: float, gallery=None, gallery_labels=None,
            n_samples: int | None = None, norm_bound: float | None = None, alpha: float = 1e-3,
            bound: str = "empirical-bernstein", top_k: int = 1, radius_form: str = "phi",
            precision: str = "float32", certificate: str = "halfspace",
            candidates: int = DEFAULT_CANDIDATES) -> CertifyResult:
    """Certify Recall@k of a Gaussian-smoothed embedding model for every query.

    Parameters
    ----------
    queries : (N, n, dim) noisy embeddings h(x + z), (N, dim) Monte-Carlo means
        (then ``n_samples`` is required), or a :class:`SmoothedEstimate`.
    query_labels : (N,) int or (N, C) multi-hot.
    sigma : noise level of the smoothing, in input units (radii are too).
    gallery : None (leave-one-out over the queries' estimates), (M, dim) exact
        embeddings, or (M, n, dim) samples / :class:`SmoothedEstimate` (a
        Monte-Carlo gallery).
    gallery_labels : labels of the gallery (required with a gallery).
    norm_bound : F with ``||h|| <= F``; may be omitted when every sample has
        norm 1 within 1e-4.
    alpha : failure probability of each certificate.
    bound : one of :data:`minrr.certify.bounds.BOUNDS`; the default is the tightest valid one.
    top_k : certify Recall@k instead of Recall@1.
    radius_form : "phi" (default) or "linear", see :func:`minrr.certify.radius.certified_radius`
        (RetrievalGuard's radius; the halfspace radius always uses Phi^-1).
    precision : GEMM precision of the margins, see :func:`minrr.certify.margin.margins`.
    certificate : "halfspace" (default) or "retrievalguard", see the module docstring.
    candidates : halfspace only: how many of the nearest relevant items are tried as e+.
    """
    sigma = check_positive(sigma, name="sigma")
    alpha = check_probability(alpha, name="alpha")
    if bound not in bounds.BOUNDS:
        raise ValueError(f"bound: expected one of {', '.join(bounds.BOUNDS)}, got {bound!r}")
    if certificate not in CERTIFICATES:
        raise ValueError(f"certificate: expected one of {', '.join(CERTIFICATES)}, got {certificate!r}")
    q_est = _as_estimate(queries, n_samples, "queries")
    _check_estimate(q_est, "queries")
    n_queries, dim = q_est.mean.shape
    q_labels = check_labels(query_labels, n_queries, name="query_labels")

    leave_one_out = gallery is None
    if leave_one_out:
        if gallery_labels is not None:
            raise ValueError("gallery_labels: given without a gallery")
        if n_queries < 2:
            raise ValueError("queries: leave-one-out certification needs at least 2 queries")
        g_est, g_labels, exact_points = q_est, q_labels, None
    else:
        if gallery_labels is None:
            raise ValueError("gallery_labels: required with a gallery")
        garr = gallery if isinstance(gallery, SmoothedEstimate) else np.asarray(gallery)
        if isinstance(garr, np.ndarray) and garr.ndim == 2:
            g_est, exact_points = None, garr
            if garr.shape[0] == 0:
                raise ValueError("gallery: is empty")
            if not np.all(np.isfinite(garr)):
                raise ValueError("gallery: contains NaN or infinity")
        else:
            g_est, exact_points = _as_estimate(garr, None, "gallery"), None
            _check_estimate(g_est, "gallery")
        m = len(exact_points) if exact_points is not None else g_est.mean.shape[0]
        g_labels = check_labels(gallery_labels, m, name="gallery_labels")
        check_label_pair(q_labels, g_labels, names=("query_labels", "gallery_labels"))
    f = _norm_bound(norm_bound, [q_est] if g_est is None else [q_est, g_est])
    n = q_est.n_samples
    if bound == "paper" and n < bounds.paper_min_samples(alpha, dim):
        raise ValueError(f"n_samples: the paper's bound needs n >= {bounds.paper_min_samples(alpha, dim)} "
                         f"at alpha = {alpha:g} and dim = {dim} (got {n})")
    if bound == "paper" and exact_points is None:
        raise ValueError("bound: 'paper' charges the gallery's error at the query's n for two items only, which "
                         "does not cover a Monte-Carlo or leave-one-out gallery; give an exact gallery or "
                         "another bound")

    if exact_points is not None:
        points, slack, eps_q = exact_points, None, _query_eps(q_est, bound, alpha, f, dim)
    else:
        m_eff = g_est.mean.shape[0] - (1 if leave_one_out else 0)
        points, slack = g_est.mean, error_bound(g_est, bound, alpha / (2.0 * m_eff), f)
        eps_q = error_bound(q_est, bound, alpha / 2.0, f)
    if certificate == "halfspace":
        hs = halfspace_radii(q_est.mean, eps_q, points, q_labels, g_labels, sigma=sigma, norm_bound=f, k=top_k,
                             candidates=candidates, gallery_eps=slack, exclude_self=leave_one_out,
                             precision=precision)
        found = hs.margins
    else:
        found = margins(q_est.mean, points, q_labels, g_labels, k=top_k, exclude_self=leave_one_out,
                        gallery_slack=slack, precision=precision)
    lonely = np.flatnonzero(np.isneginf(found.margin))
    if lonely.size:
        raise ValueError(f"query_labels: query {lonely[0]} has no same-label item in the gallery "
                         f"({lonely.size} such queries); its Recall@k is 0 whatever the input")

    # The paper subtracts four errors (query twice, two gallery points), each at alpha / 4.
    margin_lower = found.margin_floor - (4.0 if bound == "paper" else 2.0) * eps_q
    radius = certified_radius(margin_lower, sigma, f, radius_form)
    if certificate == "halfspace":  # both hold on the same event; the larger is certified
        radius = np.maximum(radius, hs.radius)
    settings = {
        "certificate": certificate, "bound": bound, "sigma": sigma, "alpha": alpha, "n": n, "top_k": int(top_k),
        "norm_bound": f, "radius_form": radius_form,
        "gallery": "leave-one-out" if leave_one_out else ("exact" if exact_points is not None else "monte-carlo"),
    }
    if certificate == "halfspace":
        settings["candidates"] = int(candidates)
    return CertifyResult(
        label=q_labels,
        nearest=found.nearest,
        nearest_label=g_labels[found.nearest],
        correct=found.margin > 0,
        margin=found.margin,
        margin_lower=margin_lower,
        radius=radius,
        settings=settings,
    )


def _query_eps(est: SmoothedEstimate, bound: str, alpha: float, f: float, dim: int) -> np.ndarray:
    """(N,) eps_q against an exact gallery: the bound at ``alpha``, or the paper's error at ``alpha / 4``."""
    if bound == "paper":
        return np.full(est.mean.shape[0], float(bounds.paper_eps(est.n_samples, alpha, f, dim)))
    return error_bound(est, bound, alpha, f)


def certify_model(model, images, labels, *, sigma: float, n_samples: int, gallery=None, gallery_labels=None,
                  seed: int = 0, device=None, batch_size: int = 1000, progress: bool = False,
                  **options) -> CertifyResult:
    """Certify Recall@k of a model's smoothed embedding straight from images, in one call.

    Each query's ``n_samples`` noisy copies go through the model on its backend
    (:meth:`~minrr.backends.base.Backend.sample_noisy`: a torch ``nn.Module`` on ``device``,
    by default the device its weights are on; any other callable through NumPy), then
    :func:`certify` takes over.

    Parameters
    ----------
    model : torch ``nn.Module`` or NumPy callable mapping (b, *shape) images to (b, dim).
    images : (N, *shape) uint8 or floats in [0, 1], the queries.
    labels : (N,) int or (N, C) multi-hot.
    sigma, n_samples : noise level (input units) and draws per query.
    gallery : None (leave-one-out over the queries' smoothed embeddings), or (M, *shape)
        gallery images, embedded exactly by the model (fixed points).
    gallery_labels : labels of the gallery.
    seed : noise seed; query i draws from its own stream, so results do not depend on
        ``batch_size``.
    **options : the other arguments of :func:`certify` (alpha, bound, top_k, norm_bound, ...).
        ``norm_bound`` defaults to the model's ``spec.norm_bound`` when it has one (models of
        :mod:`minrr.backends.models`), else to 1 for unit-norm embeddings.
    """
    from minrr.backends import backend_for

    backend = backend_for(model, device=device)
    spec = getattr(model, "spec", None)
    if options.get("norm_bound") is None and getattr(spec, "norm_bound", None) is not None:
        options["norm_bound"] = spec.norm_bound
    if (gallery is None) != (gallery_labels is None):
        raise ValueError("gallery_labels: gallery and gallery_labels go together")
    estimate = backend.sample_noisy(model, images, sigma, n_samples, seed=seed, batch_size=batch_size,
                                    progress=progress)
    embedded = None if gallery is None else backend.embed(model, gallery, batch_size=batch_size, progress=progress)
    return certify(estimate, labels, sigma=sigma, gallery=embedded, gallery_labels=gallery_labels, **options)


def certified_recall(result: CertifyResult, radii) -> np.ndarray:
    """Certified Recall@k at each radius: the share of queries certified with radius >= r."""
    radii = np.atleast_1d(np.asarray(radii, dtype=np.float64))
    ok = result.certified[None, :] & (result.radius[None, :] >= radii[:, None])
    return ok.mean(axis=1)


def default_radii(sigma: float) -> np.ndarray:
    """The radius grid of the summary: 0 to 3 sigma.

    RetrievalGuard's radius stops at 1.349 sigma (d <= 2F); the halfspace certificate can go beyond.
    """
    return sigma * np.array([0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0])


def summarize(result: CertifyResult, radii=None) -> dict:
    """JSON-ready summary: clean and certified Recall@k, share not certified, median radius, settings."""
    radii = default_radii(result.settings["sigma"]) if radii is None else np.asarray(radii, dtype=np.float64)
    return {
        "queries": int(result.margin.shape[0]),
        "clean_recall": float(result.correct.mean()),
        "certified_recall": [
            {"radius": float(r), "recall": float(v)} for r, v in zip(radii, certified_recall(result, radii))
        ],
        "not_certified": float(1.0 - result.certified.mean()),
        "median_radius": float(np.median(result.radius)),
        "settings": dict(result.settings),
    }
