"""Retrieval margins of query embeddings against a labelled gallery.

The margin for Recall@k (k = 1 is RetrievalGuard's minimum margin d(x; h)) is

    d_k(q) = (k-th smallest distance to an other-label item)
             - (smallest distance to a same-label item),

so Recall@k is 1 iff ``d_k > 0``, and moving ``q`` by less than ``d_k / 2``
keeps a same-label item inside the top k. An item whose label shares no class
with the query's is "other-label"; fewer than k of them gives ``d_k = inf``.

Distances come from one GEMM per (query block, gallery chunk) followed by a
reduction while the block is still in cache, so peak memory is set by the
block sizes, not by the gallery size. Query blocks run on
``numba.get_num_threads()`` threads, each with its own single-threaded
GEMMs and GIL-free kernels (:func:`in_threads`), so one thread pool is busy
at a time. Two reductions share the work:

* the common case (single labels, exact gallery, k = 1) visits a query's
  same-label items through its label group, masks them, and finds the
  nearest other-label item with one SIMD ``argmax`` per chunk over
  ``q.e - |e|^2 / 2`` (an augmented GEMM);
* everything else (multi-label, k > 1, per-item slack) goes entry by entry
  in a Numba kernel.

The GEMM runs in float32 by default; :func:`margins` also returns
``margin_floor``, a value that provably does not exceed the margin computed
in exact arithmetic, with the rounding of the GEMM (Higham's ``gamma``
bound, and underflow) and any per-item gallery error (``gallery_slack``)
taken off. Embeddings whose largest norm lies outside :data:`SAFE_NORMS` are
first divided by a power of two (:func:`embedding_scale`), so that float32
neither underflows nor overflows. Ties for ``nearest`` go to the smaller
index. The blocked loading, the state and the rounding allowances are shared
with :mod:`minrr.certify.halfspace`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from ..labels import check_label_pair, check_labels, label_keys, same_label

__all__ = ["Margins", "margins"]

QUERY_BLOCK = 1024
GALLERY_CHUNK = 1024
"""Block sizes of the blocked GEMMs: a 1024 x 1024 float32 block (4 MiB) stays in L3 for its reduction, and
single-threaded sgemm runs at full speed on it."""
THREADS_FROM = 2 ** 20
"""Query-item pairs from which the work is spread over threads."""


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


@numba.njit(inline="always", cache=True)
def fold_distance(r, j, s, relevant, with_slack, slack_j, e_sq, same_sq, same_idx, other_sq, other_idx,
                  same_hi, other_lo):
    """Fold the squared distance ``s`` of query row ``r`` to gallery item ``j`` into the running state.

    ``same_sq``/``same_idx`` hold the nearest relevant item, ``other_sq``
    the k smallest non-relevant ``s`` and ``other_idx`` the index of the
    nearest one. With ``with_slack``, the slack-adjusted distances
    ``sqrt(s + E) + slack_j`` (relevant, minimum in ``same_hi``) and
    ``sqrt(max(0, s - E)) - slack_j`` (non-relevant, k smallest in
    ``other_lo``) are tracked too, ``E`` (``e_sq``) being the rounding
    allowance of ``s``. Shared with :mod:`minrr.certify.halfspace`.
    """
    k = other_sq.shape[1]
    if relevant:
        if s < same_sq[r]:
            same_sq[r] = s
            same_idx[r] = j
        if with_slack:
            same_hi[r] = min(same_hi[r], np.sqrt(max(s + e_sq, 0.0)) + slack_j)
    else:
        if s < other_sq[r, 0]:
            other_idx[r] = j
        if s < other_sq[r, k - 1]:
            _insert(other_sq[r], s)
        if with_slack:
            lo = np.sqrt(max(s - e_sq, 0.0)) - slack_j
            if lo < other_lo[r, k - 1]:
                _insert(other_lo[r], lo)


@numba.njit(nogil=True, cache=True)
def _reduce_chunk(dots, q_sq, g_sq, q_keys, g_keys, multi, q_start, g_start, exclude_self,
                  slack, allowance, same_sq, same_idx, other_sq, other_idx, same_hi, other_lo):
    """Fold one ``(bq, mc)`` block of dot products into the running per-query state.

    Squared distances ``s = |q|^2 + |e|^2 - 2 q.e`` are reduced in squared
    form by :func:`fold_distance`; ``allowance`` is each query's rounding
    allowance ``E`` of ``s``.
    """
    bq, mc = dots.shape
    k = other_sq.shape[1]
    with_slack = slack.shape[0] > 0
    for r in range(bq):
        i = q_start + r
        qs = q_sq[r]
        for c in range(mc):
            s = qs + g_sq[c] - 2.0 * dots[r, c]
            if not with_slack and s >= same_sq[r] and s >= other_sq[r, k - 1]:
                continue
            j = g_start + c
            if exclude_self and i == j:
                continue
            fold_distance(r, j, s, same_label(q_keys[r], g_keys[c], multi), with_slack,
                          slack[c] if with_slack else 0.0, allowance[r], same_sq, same_idx, other_sq, other_idx,
                          same_hi, other_lo)


@numba.njit(nogil=True, cache=True)
def _take_same_label(scores, g_start, members, cursor, end, self_idx, q_sq, same_sq, same_idx):
    """Nearest same-label item of each row in one chunk, then mask the row's same-label columns.

    ``scores`` is ``(bq, mc)`` ``q.e - |e|^2 / 2`` for gallery items
    ``g_start .. g_start + mc``. Row r's label group is
    ``members[cursor[r]:end[r]]`` (gallery indices in increasing order);
    ``cursor`` advances past the chunk. Item ``self_idx[r]`` is skipped.
    ``s = |q|^2 - 2 score`` below ``same_sq`` updates it and ``same_idx``.
    The group's columns are then set to ``-inf``, so the row's ``argmax``
    finds the nearest other-label item.
    """
    bq, mc = scores.shape
    stop = g_start + mc
    for r in range(bq):
        pos = cursor[r]
        while pos < end[r] and members[pos] < stop:
            j = members[pos]
            c = j - g_start
            if j != self_idx[r]:
                s = q_sq[r] - 2.0 * scores[r, c]
                if s < same_sq[r]:
                    same_sq[r] = s
                    same_idx[r] = j
            scores[r, c] = -np.inf
            pos += 1
        cursor[r] = pos


def _check_embeddings(x, name):
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n, dim) array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: is empty")
    return arr


def gamma(terms: int, dtype) -> float:
    """Higham's gamma_n = n u / (1 - n u): relative error bound of an n-term dot product."""
    unit = np.finfo(dtype).eps / 2.0
    return terms * unit / (1.0 - terms * unit)


def underflow_allowance(terms: int, dtype, x_norm, y_norm):
    """Absolute error an n-term dot product can add by underflow (or flush-to-zero) of its terms.

    Each term below the smallest normal number ``tiny`` can be lost, costing
    at most ``tiny (1 + |x_i| + |y_i|)``; Higham's relative bound does not
    cover it. Negligible once the data are scaled by :func:`embedding_scale`.
    """
    return terms * np.finfo(dtype).tiny * (1.0 + x_norm + y_norm)


SAFE_NORMS = (2.0 ** -16, 2.0 ** 16)
"""Largest norms inside this range need no rescaling before a float32 GEMM."""


def max_norm(x, chunk: int = GALLERY_CHUNK) -> float:
    """Largest row norm of ``(n, dim)`` embeddings, in float64, read in chunks."""
    top = 0.0
    for start in range(0, len(x), chunk):
        block = np.asarray(x[start:start + chunk], dtype=np.float64)
        top = max(top, float(np.sqrt(np.einsum("ij,ij->i", block, block).max())))
    return top


def embedding_scale(*norms) -> float:
    """A power of two ``s`` to divide the embeddings by, so that float32 neither under- nor overflows.

    Margins and certificates are scale-equivariant and dividing by a power of
    two is exact, so results computed on ``x / s`` are multiplied back by
    ``s``. ``s = 1`` when the largest norm lies in :data:`SAFE_NORMS`.
    """
    top = max(norms)
    if top == 0.0 or SAFE_NORMS[0] <= top <= SAFE_NORMS[1]:
        return 1.0
    return float(2.0 ** np.round(np.log2(top)))


def load_rows(x, rows, dtype, scale: float) -> np.ndarray:
    """``x[rows] / scale`` in ``dtype`` (``rows`` a slice or an index array; ``x`` may be a memory map)."""
    block = np.asarray(x[rows])
    if scale != 1.0:
        block = block.astype(np.float64) / scale
    return np.asarray(block, dtype=dtype)


def squared_norms(x, dtype, scale: float, chunk: int = GALLERY_CHUNK) -> np.ndarray:
    """(n,) float64 squared norms of ``x / scale`` as the GEMM sees it (cast to ``dtype``)."""
    out = np.empty(len(x))
    for start in range(0, len(x), chunk):
        block = load_rows(x, slice(start, start + chunk), dtype, scale).astype(np.float64)
        out[start:start + len(block)] = np.einsum("ij,ij->i", block, block)
    return out


def scale_and_norms(queries, gallery, dtype, chunk: int = GALLERY_CHUNK) -> tuple[float, np.ndarray]:
    """``(scale, g_sq)``: :func:`embedding_scale` of both sets and the gallery's :func:`squared_norms` at that
    scale, reading the gallery once when it is already in ``dtype`` and needs no rescaling."""
    own = gallery.dtype if gallery.dtype.kind == "f" else np.dtype(np.float64)
    raw = squared_norms(gallery, own, 1.0, chunk)  # its largest square root is max_norm(gallery)
    scale = embedding_scale(max_norm(queries), float(np.sqrt(raw.max())))
    if scale == 1.0 and own == dtype:
        return scale, raw
    return scale, squared_norms(gallery, dtype, scale, chunk)


def thread_count(pairs: int) -> int:
    """Threads for a blocked pass over ``pairs`` query-item distances: ``numba.get_num_threads()``, or one below
    :data:`THREADS_FROM`."""
    return max(1, numba.get_num_threads()) if pairs >= THREADS_FROM else 1


def query_blocks(n: int, m: int, size: int) -> tuple[list[tuple[int, int]], int]:
    """``(blocks, workers)``: consecutive ``(start, stop)`` blocks of at most ``size`` of n queries against m
    items, and how many threads to run them on. The number of blocks is a multiple of the threads and the
    blocks are of nearly equal size, so that the threads finish together."""
    workers = min(thread_count(n * m), n)
    count = workers * -(-n // (workers * max(1, size)))
    size = -(-n // count)
    return [(start, min(start + size, n)) for start in range(0, n, size)], workers


def in_threads(task, blocks, workers: int) -> None:
    """Run ``task(start, stop)`` over the blocks on ``workers`` threads, with BLAS single-threaded.

    Each thread runs its own GEMMs and GIL-free (``nogil``) kernels, so one
    thread pool is busy at a time: OpenBLAS's and Numba's pools never spin
    against each other. An error (or Ctrl-C) cancels the blocks not yet started.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        if workers <= 1 or len(blocks) <= 1:
            for start, stop in blocks:
                task(start, stop)
            return
        with ThreadPoolExecutor(min(workers, len(blocks))) as pool:  # map cancels what is left on an error
            list(pool.map(lambda block: task(*block), blocks))


class BlockState:
    """Running per-query state of one query block (see :func:`fold_distance`)."""

    def __init__(self, bq: int, k: int):
        self.same_sq = np.full(bq, np.inf)
        self.same_idx = np.full(bq, -1, dtype=np.int64)
        self.other_sq = np.full((bq, k), np.inf)
        self.other_idx = np.full(bq, -1, dtype=np.int64)
        self.same_hi = np.full(bq, np.inf)
        self.other_lo = np.full((bq, k), np.inf)

    def finish(self, allowance, cast_error, with_slack: bool):
        """``(margin, margin_floor, nearest)`` of the block once every gallery chunk is folded in.

        ``allowance`` (bq,) bounds the rounding of each squared distance and
        ``cast_error`` (bq,) that of each distance from casting the inputs.
        """
        k = self.other_sq.shape[1]
        kth_sq = self.other_sq[:, k - 1]
        with np.errstate(invalid="ignore"):
            margin = np.sqrt(np.maximum(kth_sq, 0.0)) - np.sqrt(np.maximum(self.same_sq, 0.0))
            if with_slack:
                floor = (self.other_lo[:, k - 1] - cast_error) - (self.same_hi + cast_error)
            else:
                other_d = np.sqrt(np.maximum(kth_sq - allowance, 0.0)) - cast_error
                same_d = np.sqrt(np.maximum(self.same_sq, 0.0) + allowance) + cast_error
                floor = other_d - same_d
        no_same = np.isinf(self.same_sq)  # Recall@k is 0 whatever the perturbation
        margin[no_same] = -np.inf
        floor[no_same] = -np.inf
        first_other = self.other_sq[:, 0]
        same_first = (self.same_sq < first_other) | ((self.same_sq == first_other) & (self.same_idx < self.other_idx))
        return margin, floor, np.where(same_first, self.same_idx, self.other_idx)


def _general_pass(q_block, q_sq, q_keys, q_start, gallery, scale, g_sq, g_keys, multi, exclude_self, slack,
                  allowance, state, chunk, buffer):
    """Entry-by-entry reduction over the gallery in index order (any labels, k, slack)."""
    bq = len(q_block)
    for g_start in range(0, len(g_sq), chunk):
        g_chunk = load_rows(gallery, slice(g_start, g_start + chunk), q_block.dtype, scale)
        mc = len(g_chunk)
        dots = buffer[:bq * mc].reshape(bq, mc)
        np.matmul(q_block, g_chunk.T, out=dots)
        _reduce_chunk(dots, q_sq, g_sq[g_start:g_start + mc], q_keys, g_keys[g_start:g_start + mc], multi,
                      q_start, g_start, exclude_self, slack[g_start:g_start + mc] if slack.size else slack,
                      allowance, state.same_sq, state.same_idx, state.other_sq, state.other_idx,
                      state.same_hi, state.other_lo)


def _grouped_pass(q_block, q_sq, q_labels, q_start, gallery, scale, g_sq, members, member_labels, exclude_self,
                  state, chunk, buffer):
    """Nearest same- and other-label items for k = 1 and single labels.

    Same-label items are visited through the label groups (``members``, the
    gallery indices sorted by label); every other item is searched by one
    SIMD ``argmax`` per chunk, which returns the first maximum, so ties go to
    the smaller index.
    """
    bq, dim = q_block.shape
    cursor = np.searchsorted(member_labels, q_labels, side="left")
    end = np.searchsorted(member_labels, q_labels, side="right")
    self_idx = np.arange(q_start, q_start + bq) if exclude_self else np.full(bq, -1)
    augmented = np.empty((bq, dim + 1), dtype=q_block.dtype)
    augmented[:, :dim] = q_block
    augmented[:, dim] = -0.5
    g_chunk = np.empty((min(chunk, len(g_sq)), dim + 1), dtype=q_block.dtype)
    rows = np.arange(bq)
    for g_start in range(0, len(g_sq), chunk):
        mc = min(chunk, len(g_sq) - g_start)
        g_chunk[:mc, :dim] = load_rows(gallery, slice(g_start, g_start + mc), q_block.dtype, scale)
        g_chunk[:mc, dim] = g_sq[g_start:g_start + mc]
        scores = buffer[:bq * mc].reshape(bq, mc)
        np.matmul(augmented, g_chunk[:mc].T, out=scores)  # q.e - |e|^2 / 2
        _take_same_label(scores, g_start, members, cursor, end, self_idx, q_sq, state.same_sq, state.same_idx)
        cols = scores.argmax(axis=1)
        s_other = q_sq - 2.0 * scores[rows, cols].astype(np.float64)
        better = s_other < state.other_sq[:, 0]
        state.other_sq[better, 0] = s_other[better]
        state.other_idx[better] = g_start + cols[better]


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
        ``query_block * gallery_chunk`` GEMM outputs per thread plus O(N + M) per-item state.
    """
    queries, gallery, q_labels, g_labels, dtype = check_inputs(queries, gallery, query_labels, gallery_labels,
                                                               k=k, exclude_self=exclude_self, precision=precision)
    n, dim = queries.shape
    m = gallery.shape[0]
    with_slack = gallery_slack is not None
    slack = np.zeros(0) if not with_slack else np.asarray(gallery_slack, dtype=np.float64)
    if with_slack and (slack.shape != (m,) or np.any(~(slack >= 0))):
        raise ValueError(f"gallery_slack: expected ({m},) non-negative numbers")

    scale, g_sq = scale_and_norms(queries, gallery, dtype, gallery_chunk)
    slack = slack / scale
    g_norm_max = float(np.sqrt(g_sq.max()))
    grouped = q_labels.ndim == 1 and not with_slack and k == 1
    if grouped:
        members = np.argsort(g_labels, kind="stable")
        member_labels = g_labels[members]
    else:
        q_keys, multi = label_keys(q_labels)
        g_keys, _ = label_keys(g_labels)

    margin = np.empty(n)
    floor = np.empty(n)
    nearest = np.empty(n, dtype=np.int64)
    terms = dim + 1 if grouped else dim  # the grouped GEMM carries |e|^2 / 2 as one more term

    def block_margins(q_start, q_stop):
        block = slice(q_start, q_stop)
        q_block = load_rows(queries, block, dtype, scale)
        bq = len(q_block)
        q_sq = np.einsum("ij,ij->i", q_block.astype(np.float64), q_block.astype(np.float64))
        q_norm = np.sqrt(q_sq)
        state = BlockState(bq, k)
        allowance = distance_allowance(terms, dtype, q_norm, g_norm_max, grouped)
        buffer = np.empty(bq * min(gallery_chunk, m), dtype=dtype)
        if grouped:
            _grouped_pass(q_block, q_sq, q_labels[block], q_start, gallery, scale, g_sq, members, member_labels,
                          exclude_self, state, gallery_chunk, buffer)
        else:
            _general_pass(q_block, q_sq, q_keys[block], q_start, gallery, scale, g_sq, g_keys, multi, exclude_self,
                          slack, allowance, state, gallery_chunk, buffer)
        margin[block], floor[block], nearest[block] = state.finish(allowance, cast_error(dtype, q_norm, g_norm_max),
                                                                   with_slack)

    in_threads(block_margins, *query_blocks(n, m, query_block))
    return Margins(margin=margin * scale, margin_floor=floor * scale, nearest=nearest)


def distance_allowance(terms: int, dtype, q_norm, g_norm_max: float, grouped: bool = False):
    """(bq,) bound on the rounding of ``s = |q|^2 + |e|^2 - 2 q.e`` computed from a ``dtype`` GEMM.

    The GEMM's rounding (Higham), underflow, and the float64 rounding of the squared norms and the sum.
    """
    product = q_norm * g_norm_max + (g_norm_max ** 2 if grouped else 0.0)
    return (2.0 * gamma(terms, dtype) * product + 2.0 * underflow_allowance(terms, dtype, q_norm, g_norm_max)
            + gamma(terms, np.float64) * (q_norm ** 2 + g_norm_max ** 2) + 4e-16 * (q_norm + g_norm_max) ** 2)


def cast_error(dtype, q_norm, g_norm_max: float):
    """Casting both inputs to ``dtype`` moves each distance by at most ``u (|q| + |e|)``."""
    return np.finfo(dtype).eps / 2.0 * (q_norm + g_norm_max) if dtype == np.float32 else np.zeros_like(q_norm)


def check_inputs(queries, gallery, query_labels, gallery_labels, *, k, exclude_self, precision):
    """Validated ``(queries, gallery, query_labels, gallery_labels, dtype)`` of :func:`margins`."""
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
    return queries, gallery, q_labels, g_labels, np.dtype(precision)
