"""Retrieval margins of query embeddings against a labelled gallery.

The margin for Recall@k (k = 1 is RetrievalGuard's minimum margin d(x; h)) is

    d_k(q) = (k-th smallest distance to an other-label item)
             - (smallest distance to a same-label item),

so Recall@k is 1 iff ``d_k > 0``, and moving ``q`` by less than ``d_k / 2``
keeps a same-label item inside the top k. An item whose label shares no class
with the query's is "other-label"; fewer than k of them gives ``d_k = inf``.

Distances come from one GEMM per (query block, gallery chunk) followed by a
Numba reduction, so peak memory is set by the block sizes, not by the
gallery size. The GEMM runs in float32 by default; :func:`margins` also returns
``margin_floor``, a value that provably does not exceed the margin computed in
exact arithmetic, with the rounding of the GEMM (Higham's ``gamma_dim``
bound) and any per-item gallery error (``gallery_slack``) taken off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from .labels import check_label_pair, check_labels, label_keys, same_label

__all__ = ["Margins", "margins"]

QUERY_BLOCK = 2048
GALLERY_CHUNK = 4096


@dataclass(frozen=True)
class Margins:
    """Per-query margins, all ``(n_queries,)``.

    margin : d_k computed from the given embeddings (float64).
    margin_floor : lower bound on d_k of the exact embeddings, given that each
        gallery item is within ``gallery_slack`` of its exact embedding and
        allowing for floating-point rounding.
    nearest : index of the nearest gallery item (ties to the smaller index).
    """

    margin: np.ndarray
    margin_floor: np.ndarray
    nearest: np.ndarray


@numba.njit(cache=True)
def _insert(values, value):
    """Insert ``value`` into an ascending buffer of fixed length, dropping the largest.

    Equal values go after the ones already there, so items visited in index
    order keep ties broken by the smaller index.
    """
    pos = values.shape[0] - 1
    while pos > 0 and values[pos - 1] > value:
        values[pos] = values[pos - 1]
        pos -= 1
    values[pos] = value


LANES = 8
# Float flags that let LLVM vectorise the minimum searches; "ninf" is left out on purpose
# (infinity marks "nothing found yet") and so is "contract", so every path rounds alike.
_VECTOR_MATH = {"reassoc", "nnan", "nsz"}


@numba.njit(cache=True, fastmath=_VECTOR_MATH)
def _row_minima(row, g_sq, g_labels, label, qs, skip):
    """Nearest same-label and other-label entries of one row (single-label keys).

    Returns ``(s_same, col_same, s_other, col_other)`` with ``s = qs + g_sq - 2 row``
    (``inf`` and -1 where there is none); column ``skip`` is left out (-1: none).
    Ties go to the smaller column. Runs in ``LANES`` independent lanes so the
    loop vectorises.
    """
    n = row.shape[0]
    lane_same = np.full(LANES, np.inf)
    lane_other = np.full(LANES, np.inf)
    col_same = np.full(LANES, -1, dtype=np.int64)
    col_other = np.full(LANES, -1, dtype=np.int64)
    for c0 in range(0, n - n % LANES, LANES):
        for j in range(LANES):
            c = c0 + j
            s = qs + g_sq[c] - 2.0 * row[c]
            same = g_labels[c] == label and c != skip
            other = g_labels[c] != label and c != skip
            take_same = same and s < lane_same[j]
            take_other = other and s < lane_other[j]
            lane_same[j] = s if take_same else lane_same[j]
            col_same[j] = c if take_same else col_same[j]
            lane_other[j] = s if take_other else lane_other[j]
            col_other[j] = c if take_other else col_other[j]
    best_same, best_same_col = np.inf, -1
    best_other, best_other_col = np.inf, -1
    for j in range(LANES):
        if lane_same[j] < best_same or (lane_same[j] == best_same and col_same[j] < best_same_col):
            best_same, best_same_col = lane_same[j], col_same[j]
        if lane_other[j] < best_other or (lane_other[j] == best_other and col_other[j] < best_other_col):
            best_other, best_other_col = lane_other[j], col_other[j]
    for c in range(n - n % LANES, n):
        if c == skip:
            continue
        s = qs + g_sq[c] - 2.0 * row[c]
        if g_labels[c] == label:
            if s < best_same:
                best_same, best_same_col = s, c
        elif s < best_other:
            best_other, best_other_col = s, c
    return best_same, best_same_col, best_other, best_other_col


@numba.njit(cache=True)
def _scan_row(row, qs, g_sq, q_key, g_keys, multi, i, g_start, exclude_self, slack, e_sq,
              same_sq, same_idx, other_sq, other_idx, same_hi, other_lo):
    """Fold one row entry by entry into query state (``same_sq`` etc. are 0-d/1-d views).

    The general path: multi-label keys, any k, and slack-adjusted distances
    ``sqrt(s + E) + slack`` (same label, minimum in ``same_hi``) and
    ``sqrt(max(0, s - E)) - slack`` (other label, k smallest in ``other_lo``).
    """
    k = other_sq.shape[0]
    with_slack = slack.shape[0] > 0
    for c in range(row.shape[0]):
        s = qs + g_sq[c] - 2.0 * row[c]
        if not with_slack and s >= same_sq[0] and s >= other_sq[k - 1]:
            continue
        j = g_start + c
        if exclude_self and i == j:
            continue
        if same_label(q_key, g_keys[c], multi):
            if s < same_sq[0]:
                same_sq[0] = s
                same_idx[0] = j
            if with_slack:
                same_hi[0] = min(same_hi[0], np.sqrt(max(s + e_sq, 0.0)) + slack[c])
        else:
            if s < other_sq[0]:
                other_idx[0] = j
            if s < other_sq[k - 1]:
                _insert(other_sq, s)
            if with_slack:
                lo = np.sqrt(max(s - e_sq, 0.0)) - slack[c]
                if lo < other_lo[k - 1]:
                    _insert(other_lo, lo)


@numba.njit(parallel=True, cache=True)
def _reduce_chunk(dots, q_sq, g_sq, q_keys, g_keys, g_labels, multi, q_start, g_start, exclude_self,
                  slack, allowance, same_sq, same_idx, other_sq, other_idx, same_hi, other_lo):
    """Fold one ``(bq, mc)`` block of dot products into the running per-query state.

    ``g_labels`` is ``g_keys[:, 0]`` made contiguous (single-label keys).

    Squared distances ``s = |q|^2 + |e|^2 - 2 q.e`` are reduced in squared
    form: ``same_sq``/``same_idx`` hold the nearest same-label item,
    ``other_sq`` the k smallest other-label ``s`` and ``other_idx`` the index
    of the nearest one; ``same_hi``/``other_lo`` the slack-adjusted
    distances (see :func:`_scan_row`). Single labels without slack take the
    vectorised :func:`_row_minima`, and a row goes entry by entry only when
    it can change the k smallest other-label distances for k > 1.
    """
    bq, mc = dots.shape
    k = other_sq.shape[1]
    fast = not multi and slack.shape[0] == 0
    for r in numba.prange(bq):
        i = q_start + r
        if fast:
            skip = i - g_start if exclude_self and 0 <= i - g_start < mc else -1
            s_same, c_same, s_other, c_other = _row_minima(dots[r], g_sq, g_labels, q_keys[r, 0], q_sq[r], skip)
            if s_same < same_sq[r]:
                same_sq[r] = s_same
                same_idx[r] = g_start + c_same
            if s_other >= other_sq[r, k - 1]:
                continue
            if k == 1:
                other_sq[r, 0] = s_other
                other_idx[r] = g_start + c_other
                continue
        _scan_row(dots[r], q_sq[r], g_sq, q_keys[r], g_keys, multi, i, g_start, exclude_self, slack,
                  allowance[r], same_sq[r:r + 1], same_idx[r:r + 1], other_sq[r], other_idx[r:r + 1],
                  same_hi[r:r + 1], other_lo[r])


def _check_embeddings(x, name):
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n, dim) array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: is empty")
    return arr


def margins(queries, gallery, query_labels, gallery_labels, *, k: int = 1,
            exclude_self: bool = False, gallery_slack=None, precision: str = "float32",
            query_block: int = QUERY_BLOCK, gallery_chunk: int = GALLERY_CHUNK) -> Margins:
    """Margins d_k of every query against a labelled gallery.

    Parameters
    ----------
    queries : (N, dim) float, query embeddings.
    gallery : (M, dim) float, gallery embeddings (may be a memory map).
    query_labels, gallery_labels : (N,) / (M,) int, or (N, C) / (M, C) multi-hot.
    k : the margin for Recall@k (1 = RetrievalGuard's d(x; h)).
    exclude_self : the queries are the gallery (N = M); query i skips item i.
    gallery_slack : (M,) float >= 0, bound on each gallery item's distance
        from its exact embedding; taken off ``margin_floor`` item by item.
    precision : "float32" (default) or "float64", the GEMM's precision.
    query_block, gallery_chunk : block sizes; peak memory is about
        ``query_block * gallery_chunk * 8`` bytes plus O(N + M) per-item state.
    """
    queries = _check_embeddings(queries, "queries")
    gallery = _check_embeddings(gallery, "gallery")
    n, dim = queries.shape
    m = gallery.shape[0]
    if gallery.shape[1] != dim:
        raise ValueError(f"gallery: dimension {gallery.shape[1]} does not match the queries' {dim}")
    q_labels = check_labels(query_labels, n, name="query labels")
    g_labels = check_labels(gallery_labels, m, name="gallery labels")
    check_label_pair(q_labels, g_labels, names=("query labels", "gallery labels"))
    if int(k) != k or k < 1:
        raise ValueError(f"k: expected a whole number >= 1, got {k}")
    if exclude_self and n != m:
        raise ValueError(f"exclude_self: the queries ({n}) must be the gallery ({m})")
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision: expected 'float32' or 'float64', got {precision!r}")
    dtype = np.dtype(precision)
    with_slack = gallery_slack is not None
    slack = np.zeros(0) if not with_slack else np.asarray(gallery_slack, dtype=np.float64)
    if with_slack and (slack.shape != (m,) or np.any(~(slack >= 0))):
        raise ValueError(f"gallery_slack: expected ({m},) non-negative numbers")

    q_keys, multi = label_keys(q_labels)
    g_keys, _ = label_keys(g_labels)
    g_first_key = np.ascontiguousarray(g_keys[:, 0])
    g_cast_sq = np.empty(m)
    for start in range(0, m, gallery_chunk):
        chunk = np.asarray(gallery[start:start + gallery_chunk], dtype=dtype).astype(np.float64)
        g_cast_sq[start:start + len(chunk)] = np.einsum("ij,ij->i", chunk, chunk)
    g_norm_max = float(np.sqrt(g_cast_sq.max()))

    unit = np.finfo(dtype).eps / 2.0
    gamma = dim * unit / (1.0 - dim * unit)  # Higham's gamma_dim for a dot product
    margin = np.empty(n)
    floor = np.empty(n)
    nearest = np.empty(n, dtype=np.int64)
    buffer = np.empty(min(query_block, n) * min(gallery_chunk, m), dtype=dtype)
    for q_start in range(0, n, query_block):
        q_block = np.asarray(queries[q_start:q_start + query_block], dtype=dtype)
        bq = len(q_block)
        q_sq = np.einsum("ij,ij->i", q_block.astype(np.float64), q_block.astype(np.float64))
        q_norm = np.sqrt(q_sq)
        # |s' - s| <= 2 gamma |q||e| for the GEMM, plus float64 rounding of the sum.
        allowance = 2.0 * gamma * q_norm * g_norm_max + 4e-16 * (q_norm + g_norm_max) ** 2
        cast_error = (unit * (q_norm + g_norm_max)) if dtype == np.float32 else np.zeros(bq)
        same_sq = np.full(bq, np.inf)
        same_idx = np.full(bq, -1, dtype=np.int64)
        other_sq = np.full((bq, k), np.inf)
        other_idx = np.full(bq, -1, dtype=np.int64)
        same_hi = np.full(bq, np.inf)
        other_lo = np.full((bq, k), np.inf)
        for g_start in range(0, m, gallery_chunk):
            g_chunk = np.asarray(gallery[g_start:g_start + gallery_chunk], dtype=dtype)
            mc = len(g_chunk)
            dots = buffer[:bq * mc].reshape(bq, mc)
            np.matmul(q_block, g_chunk.T, out=dots)
            _reduce_chunk(dots, q_sq, g_cast_sq[g_start:g_start + mc], q_keys[q_start:q_start + bq],
                          g_keys[g_start:g_start + mc], g_first_key[g_start:g_start + mc], multi, q_start, g_start, exclude_self,
                          slack[g_start:g_start + mc] if with_slack else slack, allowance,
                          same_sq, same_idx, other_sq, other_idx, same_hi, other_lo)
        kth_sq = other_sq[:, k - 1]
        block = slice(q_start, q_start + bq)
        with np.errstate(invalid="ignore"):
            margin[block] = np.sqrt(np.maximum(kth_sq, 0.0)) - np.sqrt(np.maximum(same_sq, 0.0))
            if with_slack:
                floor[block] = (other_lo[:, k - 1] - cast_error) - (same_hi + cast_error)
            else:
                other_d = np.sqrt(np.maximum(kth_sq - allowance, 0.0)) - cast_error
                same_d = np.sqrt(np.maximum(same_sq, 0.0) + allowance) + cast_error
                floor[block] = other_d - same_d
        no_same = np.isinf(same_sq)  # Recall@k is 0 whatever the perturbation
        margin[block][no_same] = -np.inf
        floor[block][no_same] = -np.inf
        first_other = other_sq[:, 0]
        same_first = (same_sq < first_other) | ((same_sq == first_other) & (same_idx < other_idx))
        nearest[block] = np.where(same_first, same_idx, other_idx)
    return Margins(margin=margin, margin_floor=floor, nearest=nearest)
