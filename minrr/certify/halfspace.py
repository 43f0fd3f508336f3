"""The halfspace certificate (REFERENCE section 1b): one linear condition per gallery pair.

For a relevant item e+ and a non-relevant item e-, "e+ strictly closer to g
than e-" is ``u.g < c`` with ``u = (e- - e+) / ||e- - e+||`` and
``c = (||e-||^2 - ||e+||^2) / (2 ||e- - e+||)``. With ``||h|| <= F``,
``p(x) = (u.g(x) + F) / (2F)`` is the smoothing of a [0, 1]-valued function,
so ``Phi^-1(p)`` is 1/sigma-Lipschitz (Salman et al. 2019, Lemma 2). On the
event ``||g_hat - g|| <= eps`` (one event for every u), the pair holds for
every ``||delta|| < r_j``::

    r_j = sigma (Phi^-1(t_j) - Phi^-1(p_j)),  t_j = (c_j + F) / (2F),
    p_j = min(1, (u_j.g_hat + eps + F) / (2F)),

(``inf`` when ``t_j >= 1``). Recall@k holds within the k-th smallest
``r_j`` over the non-relevant items, for any fixed e+; the certificate is the
best over the ``candidates`` nearest relevant items. Gallery estimates with
their own error ``eps_j`` (Monte-Carlo or leave-one-out galleries, and the
float32 cast of an exact gallery) shift the threshold ``c`` by
``(eps+ + eps-) (2F + ||e+|| + ||e-||) / (2 ||e- - e+||)``. The float32 GEMM's
rounding is bounded (Higham) and taken off ``t_j`` and added to ``p_j``.

Cost: one GEMM of the queries with the gallery, blocked over the gallery
(so memory does not depend on its size) and reduced while each block is in
cache; ``||e- - e+||`` needs ``e+.e-`` only for the pairs that pass the
screens below, so it is a dot product per such pair, not a second GEMM.
The RetrievalGuard margins of :mod:`minrr.certify.margin` come out of the same pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from ..labels import label_keys, same_label
from .margin import (GALLERY_CHUNK, QUERY_BLOCK, BlockState, Margins, cast_error, check_inputs, distance_allowance,
                     fold_distance, gamma, in_threads, load_rows, query_blocks, scale_and_norms, thread_count,
                     underflow_allowance)

__all__ = ["HalfspaceRadii", "halfspace_radii", "pair_radius", "ndtri"]

UNIT64 = 2.0 ** -53
SCREEN_RUN = 128
"""Items whose distances are screened together, in one SIMD loop, before any is looked at alone."""
NDTRI_ERROR = 4e-15
"""Bound on ``|ndtri(p) - Phi^-1(p)| / (1 + |Phi^-1(p)|)`` (measured 4.4e-16 against scipy), taken off each radius."""


@dataclass(frozen=True)
class HalfspaceRadii:
    """Halfspace certificates of N queries, all ``(N,)``.

    radius : certified l2 radius (0 = not certified, inf = no perturbation changes Recall@k).
    positive : the relevant item e+ that gave the radius (-1 when none certified).
    margins : RetrievalGuard's margins from the same pass (see :func:`minrr.certify.margin.margins`,
        with the gallery errors as ``gallery_slack``).
    """

    radius: np.ndarray
    positive: np.ndarray
    margins: Margins


@numba.njit(cache=True)
def _ndtri_lower(p):
    """Phi^-1(p) for 0 < p <= 1/2: Acklam's rational approximation and one Halley step on erfc."""
    if p < 0.02425:
        q = math.sqrt(-2.0 * math.log(p))
        x = ((((((-7.784894002430293e-03 * q - 3.223964580411365e-01) * q - 2.400758277161838e+00) * q
                - 2.549732539343734e+00) * q + 4.374664141464968e+00) * q + 2.938163982698783e+00)
             / ((((7.784695709041462e-03 * q + 3.224671290700398e-01) * q + 2.445134137142996e+00) * q
                 + 3.754408661907416e+00) * q + 1.0))
    else:
        q = p - 0.5
        r = q * q
        x = ((((((-3.969683028665376e+01 * r + 2.209460984245205e+02) * r - 2.759285104469687e+02) * r
                + 1.383577518672690e+02) * r - 3.066479806614716e+01) * r + 2.506628277459239e+00) * q
             / (((((-5.447609879822406e+01 * r + 1.615858368580409e+02) * r - 1.556989798598866e+02) * r
                  + 6.680131188771972e+01) * r - 1.328068155288572e+01) * r + 1.0))
    e = 0.5 * math.erfc(-x / math.sqrt(2.0)) - p
    u = e * math.sqrt(2.0 * math.pi) * math.exp(0.5 * x * x)
    return x - u / (1.0 + 0.5 * x * u)


@numba.njit(cache=True)
def ndtri(p):
    """Phi^-1(p), the standard normal quantile, to about 1e-15 relative (``1 - p`` is exact for p >= 1/2)."""
    if p <= 0.0:
        return -np.inf
    if p >= 1.0:
        return np.inf
    if p > 0.5:
        return -_ndtri_lower(1.0 - p)
    if p == 0.5:
        return 0.0
    return _ndtri_lower(p)


@numba.njit(cache=True)
def pair_radius(t, p, sigma):
    """``sigma (Phi^-1(t) - Phi^-1(p))`` for the lower bound ``t`` and upper bound ``p``; <= 0 is 0.

    ``t >= 1``: the condition holds for every input (``u.g <= ||g|| <= F``), so ``inf``.
    """
    if t >= 1.0 and p < 1.0:
        return np.inf
    if p >= t:
        return 0.0
    a, b = ndtri(t), ndtri(p)
    return max(0.0, sigma * (a - b - NDTRI_ERROR * (2.0 + abs(a) + abs(b))))


@numba.njit(cache=True, fastmath={"reassoc", "contract"})
def _dot(x, y):
    """``x.y`` of two vectors, summed in float64 in any order (SIMD).

    The products of float32 values are exact in float64, and any summation
    order stays within Higham's ``gamma_dim`` of the exact value, the
    allowance :func:`_pair_bounds` takes for a GEMM's product.
    """
    total = 0.0
    for d in range(x.shape[0]):
        total += np.float64(x[d]) * np.float64(y[d])
    return total


@numba.njit(cache=True)
def _pair_bounds(dot_qe, dot_pe, qs, qn, ps, pn, w_qp, gs, gn, eps_pair, eps_q, f, gam, tiny, gam64):
    """``(t_low, p_high)`` of one pair from float32 (or float64) products, all rounding taken off.

    dot_qe = q.e- from the GEMM, dot_pe = e+.e- (:func:`_dot`); qs, ps, gs squared norms and
    qn, pn, gn norms of q, e+, e-; w_qp = q.e+ in float64; eps_pair =
    eps+ + eps- (gallery errors); eps_q the query's; f = F; gam, tiny the
    GEMM's relative and underflow allowances; gam64 that of the float64
    products (q.e+ and the squared norms).
    Returns ``(-inf, inf)`` when ``||e- - e+||`` cannot be bounded away from 0.
    """
    d = ps + gs - 2.0 * dot_pe  # ||e- - e+||^2
    err_d = 2.0 * (gam * pn * gn + tiny * (1.0 + pn + gn)) + (gam64 + 4.0 * UNIT64) * (ps + gs + 2.0 * abs(dot_pe))
    if d - 2.0 * err_d <= 0.0:
        return -np.inf, np.inf
    inv = 1.0 / math.sqrt(d)
    rel = err_d / d + 8.0 * UNIT64  # 1 / ||e- - e+|| lies in [inv (1 - rel / 2), inv (1 + rel)]
    shift = 0.5 * eps_pair * (2.0 * f + pn + gn)
    nc = 0.5 * (gs - ps) - shift
    nc_low = nc - (gam64 + 4.0 * UNIT64) * (0.5 * (gs + ps) + shift)  # the squared norms' own rounding too
    c_low = nc_low * inv * ((1.0 - 0.5 * rel) if nc_low >= 0.0 else (1.0 + rel))
    nu_high = (dot_qe - w_qp) + gam * qn * gn + tiny * (1.0 + qn + gn) + gam64 * qn * pn \
        + 4.0 * UNIT64 * (abs(dot_qe) + abs(w_qp))
    uq_high = nu_high * inv * ((1.0 + rel) if nu_high >= 0.0 else (1.0 - 0.5 * rel))
    t_low = (c_low + f) / (2.0 * f) - 2.0 ** -50
    p_high = min(1.0, (uq_high + eps_q + f) / (2.0 * f) + 2.0 ** -50)
    return t_low, p_high


@numba.njit(nogil=True, cache=True)
def _nearest_relevant_chunk(dots, q_sq, g_sq, q_rows, g_rows, q_keys, g_keys, multi, check_labels, exclude_self,
                            best_sq, best_idx):
    """Keep, per query row, the ``c`` smallest squared distances to relevant items (ascending, index order ties)."""
    bq, mc = dots.shape
    c = best_sq.shape[1]
    for r in range(bq):
        row = q_rows[r]
        for col in range(mc):
            j = g_rows[col]
            if exclude_self and j == row:
                continue
            if check_labels and not same_label(q_keys[r], g_keys[col], multi):
                continue
            s = q_sq[r] + g_sq[col] - 2.0 * dots[r, col]
            if s < best_sq[r, c - 1]:
                pos = c - 1
                while pos > 0 and best_sq[r, pos - 1] > s:
                    best_sq[r, pos] = best_sq[r, pos - 1]
                    best_idx[r, pos] = best_idx[r, pos - 1]
                    pos -= 1
                best_sq[r, pos] = s
                best_idx[r, pos] = j


@numba.njit(cache=True)
def _distance_screen(gap, f, eps_q, eps_shift, near, allowance):
    """Squared distance beyond which a non-relevant item's pair gap ``w = t - p`` exceeds ``gap``.

    With ``Delta = ||q - e-|| - ||q - e+|| > 0``, the triangle inequality gives
    ``c - u.q >= Delta / 2`` and ``||e- - e+|| >= Delta``, so
    ``w >= (Delta / 2 - E / (2 Delta) - eps_q) / (2F)``, ``E`` bounding
    ``(eps+ + eps-) (2F + ||e+|| + ||e-||)`` (``eps_shift``). ``near`` bounds
    ``||q - e+||`` and ``allowance`` the rounding of the squared distance.
    """
    if not gap < np.inf:
        return np.inf
    if gap <= 0.0:  # the k-th radius is 0: no pair can lower it
        return -np.inf
    target = 2.0 * f * (gap + 2.0 ** -48) + eps_q
    delta = (target + math.sqrt(target * target + eps_shift)) * (1.0 + 1e-9)
    return (near + delta) ** 2 * (1.0 + 1e-9) + allowance


@numba.njit(inline="always", cache=True)
def _count_within(dots, g_sq, q_sq, limit):
    """How many of the squared distances ``q_sq + g_sq - 2 dots`` are at most ``limit`` (a SIMD loop)."""
    count = 0
    for col in range(dots.shape[0]):
        count += (q_sq + g_sq[col] - 2.0 * dots[col]) <= limit
    return count


@numba.njit(inline="always", cache=True)
def _skip_limit(r, with_slack, same_sq, other_sq, screen):
    """Squared distance above which an item changes nothing for query row ``r`` (inf with per-item slack)."""
    if with_slack:
        return np.inf
    limit = max(same_sq[r], other_sq[r, other_sq.shape[1] - 1])
    for c in range(screen.shape[1]):
        limit = max(limit, screen[r, c])
    return limit


@numba.njit(nogil=True, cache=True)
def _halfspace_chunk(dots, g_chunk, cand_vec, q_sq, q_norm, eps_q, q_keys, q_start, cand_sq, cand_norm, cand_dot,
                     cand_eps, cand_near, cand_shift, g_sq, g_norm, g_err, g_slack, g_keys, multi, g_start,
                     exclude_self, f, sigma, gam, tiny, gam64, with_slack, allowance, radii, gap, screen, same_sq,
                     same_idx, other_sq, other_idx, same_hi, other_lo):
    """Fold one gallery chunk into the margins and the k smallest pair radii of every (query, candidate).

    ``dots`` is the ``(bq, mc)`` GEMM of the query block with ``g_chunk``
    (``(mc, dim)``, as the GEMM saw it); ``cand_vec`` ``(bq, c, dim)`` holds
    each row's candidates e+. ``radii[r, i]`` holds the k smallest ``r_j``
    so far, R. A pair whose gap ``w = t - p`` exceeds
    ``gap[r, i] = 2 Phi(R / 2 sigma) - 1`` has ``r_j >= 2 sigma Phi^-1((1 + w) / 2) > R``
    (the bound behind the dominance over RetrievalGuard) and is skipped; so is an
    item farther than ``screen[r, i]`` (squared distance, :func:`_distance_screen`).
    Runs of ``SCREEN_RUN`` items are first screened together (:func:`_count_within`).
    """
    bq, mc = dots.shape
    n_cand = cand_sq.shape[1]
    k = radii.shape[2]
    for r in range(bq):
        i = q_start + r
        qs = q_sq[r]
        limit = _skip_limit(r, with_slack, same_sq, other_sq, screen)
        for start in range(0, mc, SCREEN_RUN):
            run, run_sq = dots[r, start:start + SCREEN_RUN], g_sq[start:start + SCREEN_RUN]
            if _count_within(run, run_sq, qs, limit) == 0:
                continue
            for pos in range(run.shape[0]):
                s = qs + run_sq[pos] - 2.0 * run[pos]
                if s > limit:  # changes neither the margins nor any pair radius
                    continue
                col = start + pos
                j = g_start + col
                if not (exclude_self and i == j):
                    relevant = same_label(q_keys[r], g_keys[col], multi)
                    fold_distance(r, j, s, relevant, with_slack, g_slack[col], allowance[r], same_sq, same_idx,
                                  other_sq, other_idx, same_hi, other_lo)
                    if not relevant:
                        for c in range(n_cand):
                            if s <= screen[r, c] and radii[r, c, k - 1] > 0.0:  # near, with an e+ still certifying
                                _fold_pair(r, c, col, dots[r, col], _dot(cand_vec[r, c], g_chunk[col]), q_sq,
                                           q_norm, eps_q, cand_sq, cand_norm, cand_dot, cand_eps, cand_near,
                                           cand_shift, g_sq, g_norm, g_err, f, sigma, gam, tiny, gam64, allowance,
                                           radii, gap, screen)
                limit = _skip_limit(r, with_slack, same_sq, other_sq, screen)


@numba.njit(cache=True)
def _fold_pair(r, c, col, dot_qe, dot_pe, q_sq, q_norm, eps_q, cand_sq, cand_norm, cand_dot, cand_eps, cand_near,
               cand_shift, g_sq, g_norm, g_err, f, sigma, gam, tiny, gam64, allowance, radii, gap, screen):
    """Fold the pair (candidate ``c`` of row ``r``, non-relevant item ``col``) into the k smallest radii.

    ``dot_qe = q.e-`` and ``dot_pe = e+.e-``, see :func:`_pair_bounds`.
    """
    k = radii.shape[2]
    t_low, p_high = _pair_bounds(dot_qe, dot_pe, q_sq[r], q_norm[r], cand_sq[r, c],
                                 cand_norm[r, c], cand_dot[r, c], g_sq[col], g_norm[col], cand_eps[r, c] + g_err[col],
                                 eps_q[r], f, gam, tiny, gam64)
    if t_low - p_high > gap[r, c]:  # r_j >= 2 sigma Phi^-1((1 + t - p) / 2) > the k-th smallest
        return
    rj = pair_radius(t_low, p_high, sigma)
    if rj < radii[r, c, k - 1]:
        pos = k - 1
        while pos > 0 and radii[r, c, pos - 1] > rj:
            radii[r, c, pos] = radii[r, c, pos - 1]
            pos -= 1
        radii[r, c, pos] = rj
        top = radii[r, c, k - 1]
        gap[r, c] = math.erf(top / (2.0 * sigma * math.sqrt(2.0))) * (1.0 + 1e-12) if top < np.inf else np.inf
        screen[r, c] = _distance_screen(gap[r, c], f, eps_q[r], cand_shift[r, c], cand_near[r, c], allowance[r])


def _candidates(queries, gallery, g_sq, q_labels, g_labels, scale, dtype, count, exclude_self, query_block,
                gallery_chunk):
    """(N, count) indices of each query's nearest relevant items (-1 where fewer exist); ``g_sq`` are the
    gallery's :func:`~minrr.certify.margin.squared_norms`.

    Single labels visit only each label's own items (a product of about
    ``N M / classes`` entries): queries are taken in label order, one label
    per block. Multi-hot labels go over the whole gallery. Blocks run on
    threads (:func:`minrr.certify.margin.in_threads`).
    """
    n, m = len(queries), len(gallery)
    best_sq = np.full((n, count), np.inf)
    best_idx = np.full((n, count), -1, dtype=np.int64)
    single = q_labels.ndim == 1
    if single:
        q_order, g_order = np.argsort(q_labels, kind="stable"), np.argsort(g_labels, kind="stable")
        q_sorted, g_sorted = q_labels[q_order], g_labels[g_order]
        edges = np.concatenate([[0], np.flatnonzero(np.diff(q_sorted)) + 1, [n]])
        blocks = [(a, min(a + query_block, stop)) for start, stop in zip(edges[:-1], edges[1:])
                  for a in range(start, stop, query_block)]
        no_keys = np.zeros((1, 1), dtype=np.int64)
    else:
        q_keys, multi = label_keys(q_labels)
        g_keys, _ = label_keys(g_labels)
        blocks = [(a, min(a + query_block, n)) for a in range(0, n, query_block)]

    def block_candidates(start, stop):
        if single:  # one label: the queries q_order[start:stop] against that label's items
            rows = q_order[start:stop]
            first, last = np.searchsorted(g_sorted, q_sorted[start], "left"), np.searchsorted(g_sorted, q_sorted[start],
                                                                                             "right")
            items = g_order[first:last]
        else:
            rows, items = np.arange(start, stop), np.arange(m)
        q_block = load_rows(queries, rows, dtype, scale)
        q_sq = np.einsum("ij,ij->i", q_block.astype(np.float64), q_block.astype(np.float64))
        sub_sq, sub_idx = best_sq[rows], best_idx[rows]
        for gs in range(0, len(items), gallery_chunk):
            cols = items[gs:gs + gallery_chunk]
            dots = q_block @ load_rows(gallery, cols if single else slice(gs, gs + gallery_chunk), dtype, scale).T
            if single:
                _nearest_relevant_chunk(dots, q_sq, g_sq[cols], rows, cols, no_keys, no_keys, False, False,
                                        exclude_self, sub_sq, sub_idx)
            else:
                _nearest_relevant_chunk(dots, q_sq, g_sq[cols], rows, cols, q_keys[rows], g_keys[cols], multi, True,
                                        exclude_self, sub_sq, sub_idx)
        best_sq[rows], best_idx[rows] = sub_sq, sub_idx

    pairs = n * m // (len(np.unique(q_labels)) if single else 1)
    in_threads(block_candidates, blocks, thread_count(pairs))
    return best_idx


def halfspace_radii(queries, query_eps, gallery, query_labels, gallery_labels, *, sigma: float, norm_bound: float,
                    k: int = 1, candidates: int = 1, gallery_eps=None, exclude_self: bool = False,
                    precision: str = "float32", query_block: int = QUERY_BLOCK,
                    gallery_chunk: int = GALLERY_CHUNK) -> HalfspaceRadii:
    """Halfspace certificates of Recall@k, and RetrievalGuard's margins, in one blocked pass.

    Parameters
    ----------
    queries : (N, dim) float, g_hat of each query.
    query_eps : (N,) float >= 0, eps with ``||g_hat - g|| <= eps`` on the certificate's event.
    gallery : (M, dim) float, exact embeddings or estimates (may be a memory map).
    query_labels, gallery_labels : (N,) / (M,) int, or (N, C) / (M, C) multi-hot.
    sigma : noise level of the smoothing.
    norm_bound : F, with ``||h|| <= F`` (so ``||g|| <= F``).
    k : certify Recall@k.
    candidates : how many of the nearest relevant items are tried as e+.
    gallery_eps : (M,) float >= 0, each gallery estimate's error bound (None: exact points).
    exclude_self : leave-one-out, the queries are the gallery.
    precision : "float32" (default) or "float64", the GEMM's precision.
    query_block, gallery_chunk : queries per block and gallery items per chunk; peak memory is about
        ``query_block * gallery_chunk`` products per thread plus O(N + M) per-item state.
    """
    queries, gallery, q_labels, g_labels, dtype = check_inputs(queries, gallery, query_labels, gallery_labels,
                                                               k=k, exclude_self=exclude_self, precision=precision)
    n, dim = queries.shape
    m = len(gallery)
    if int(candidates) != candidates or candidates < 1:
        raise ValueError(f"candidates: expected a whole number >= 1, got {candidates}")
    candidates = int(candidates)
    eps_q = np.asarray(query_eps, dtype=np.float64)
    if eps_q.shape != (n,) or np.any(~(eps_q >= 0)):
        raise ValueError(f"query_eps: expected ({n},) non-negative numbers")
    with_slack = gallery_eps is not None
    g_eps = np.zeros(m) if not with_slack else np.asarray(gallery_eps, dtype=np.float64)
    if g_eps.shape != (m,) or np.any(~(g_eps >= 0)):
        raise ValueError(f"gallery_eps: expected ({m},) non-negative numbers")

    scale, g_sq = scale_and_norms(queries, gallery, dtype, gallery_chunk)
    f = float(norm_bound) / scale
    unit = np.finfo(dtype).eps / 2.0 if dtype == np.float32 else 0.0
    g_norm = np.sqrt(g_sq)
    g_norm_max = float(g_norm.max())
    # Each gallery item's distance from the point the GEMM sees: its own error, and the float32 cast.
    g_slack = g_eps / scale  # RetrievalGuard's floor takes the cast off on its own
    g_err = g_slack + unit * g_norm
    q_keys, multi = label_keys(q_labels)
    g_keys, _ = label_keys(g_labels)
    gam, gam64 = gamma(dim, dtype), gamma(dim, np.float64)
    tiny = float(underflow_allowance(dim, dtype, 0.0, 0.0))  # times (1 + |x| + |y|) per dot product

    cand = _candidates(queries, gallery, g_sq, q_labels, g_labels, scale, dtype, candidates, exclude_self,
                       QUERY_BLOCK, GALLERY_CHUNK)
    radius = np.zeros(n)
    positive = np.full(n, -1, dtype=np.int64)
    margin, floor, nearest = np.empty(n), np.empty(n), np.empty(n, dtype=np.int64)

    def block_radii(q_start, q_stop):
        block = slice(q_start, q_stop)
        q_block = load_rows(queries, block, dtype, scale)
        bq = len(q_block)
        q64 = q_block.astype(np.float64)
        q_sq = np.einsum("ij,ij->i", q64, q64)
        q_norm = np.sqrt(q_sq)
        idx = cand[block]
        have = idx >= 0
        cand_vec = np.zeros((bq, candidates, dim), dtype=dtype)  # each row's e+, as the GEMM would see them
        cand_sq = np.zeros((bq, candidates))
        cand_dot = np.zeros((bq, candidates))
        for c in range(candidates):
            rows = np.flatnonzero(have[:, c])
            e_plus = load_rows(gallery, idx[rows, c], dtype, scale)
            cand_vec[rows, c] = e_plus
            e64 = e_plus.astype(np.float64)
            cand_sq[rows, c] = np.einsum("ij,ij->i", e64, e64)
            cand_dot[rows, c] = np.einsum("ij,ij->i", q64[rows], e64)
        cand_norm = np.sqrt(cand_sq)
        cand_err = np.where(have, g_err[np.maximum(idx, 0)], 0.0)
        # ||q - e+|| from above (float64 products of the cast values), and the largest threshold shift numerator.
        near_sq = q_sq[:, None] + cand_sq - 2.0 * cand_dot + 2.0 * gam64 * q_norm[:, None] * cand_norm \
            + 4.0 * UNIT64 * (q_sq[:, None] + cand_sq)
        cand_near = np.sqrt(np.maximum(near_sq, 0.0))
        cand_shift = (cand_err + g_err.max()) * (2.0 * f + cand_norm + g_norm_max)
        eps_block = eps_q[block] / scale + unit * q_norm
        radii = np.full((bq, candidates, k), np.inf)
        radii[~have] = 0.0
        gap = np.full((bq, candidates), np.inf)
        screen = np.full((bq, candidates), np.inf)
        state = BlockState(bq, k)
        allowance = distance_allowance(dim, dtype, q_norm, g_norm_max)
        buffer = np.empty(bq * min(gallery_chunk, m), dtype=dtype)
        for g_start in range(0, m, gallery_chunk):
            g_chunk = np.ascontiguousarray(load_rows(gallery, slice(g_start, g_start + gallery_chunk), dtype, scale))
            mc = len(g_chunk)
            dots = buffer[:bq * mc].reshape(bq, mc)
            np.matmul(q_block, g_chunk.T, out=dots)
            part = slice(g_start, g_start + mc)
            _halfspace_chunk(dots, g_chunk, cand_vec, q_sq, q_norm, eps_block, q_keys[block], q_start, cand_sq,
                             cand_norm, cand_dot, cand_err, cand_near, cand_shift, g_sq[part], g_norm[part],
                             g_err[part], g_slack[part], g_keys[part], multi, g_start, exclude_self, f, float(sigma),
                             gam, tiny, gam64, with_slack, allowance, radii, gap, screen, state.same_sq,
                             state.same_idx, state.other_sq, state.other_idx, state.same_hi, state.other_lo)
        kth = radii[:, :, k - 1]
        best = np.argmax(kth, axis=1)
        radius[block] = kth[np.arange(bq), best]
        positive[block] = np.where(radius[block] > 0, idx[np.arange(bq), best], -1)
        margin[block], floor[block], nearest[block] = state.finish(allowance, cast_error(dtype, q_norm, g_norm_max),
                                                                   with_slack)

    in_threads(block_radii, *query_blocks(n, m, query_block))
    return HalfspaceRadii(radius=radius, positive=positive,
                          margins=Margins(margin=margin * scale, margin_floor=floor * scale, nearest=nearest))
