"""Metric-learning retrieval metrics over Euclidean rankings: Recall@k, mAP, mAP@R.

Each query ranks the gallery by squared Euclidean distance, computed in
float64 as a sum over the dimensions in order, so a distance depends only on
the two embeddings: identical embeddings tie exactly, a query is at distance 0
from itself, and the block sizes never change a result. **Ties are broken by
the smaller gallery index** (as faiss does). A gallery item is *relevant* to a
query when their labels are equal (single-label) or share a class
(multi-label, ``y_q . y_j > 0``); see :mod:`minrr.labels`.

With ``R`` relevant items at 1-based positions ``pos_1 < ... < pos_R`` of a
query's ranking:

- rank of the first relevant item ``r = pos_1``; Recall@k is 1 iff ``r <= k``
  (at least one relevant item in the top k);
- AP ``= (1/R) sum_j j / pos_j`` over all R relevant items (robrank's mAP);
- AP@R ``= (1/R) sum_{j : pos_j <= R} j / pos_j`` (Musgrave et al., "A metric
  learning reality check", ECCV 2020), precision averaged over the first R
  positions only.

A query with no relevant gallery item has none of these; it is left out of
every mean, as pytorch-metric-learning does with its "lone" queries.

When the queries are their own gallery (``gallery=None``), each query leaves
one item out of its ranking (``exclude``):

- ``"index"`` (default): item i for query i, i.e. the query itself;
- ``"nearest"``: the first item of the ranking, whatever it is (robrank drops
  ``argsort(dist)[0]``). The two differ only when another item is at distance
  0 from query i and has a smaller index: "nearest" then drops that duplicate
  and keeps the query itself, which it then retrieves first.

Memory stays bounded whatever the gallery size: Recall@k goes over blocks of
queries x blocks of gallery items (twice), AP and AP@R over blocks of queries
with their full rows of distances; ``block_bytes`` caps either block.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numba
import numpy as np

from minrr.io import as_float_array
from minrr.labels import check_label_pair, check_labels, label_keys, same_label

__all__ = [
    "first_relevant_rank",
    "recall_at_k",
    "average_precision",
    "mean_average_precision",
    "map_at_r",
]

BLOCK_BYTES = 64 * 2**20
"""Default size of the distance block a metric holds at once (64 MiB)."""

_GALLERY_BLOCK = 4096  # gallery items per block in the two-pass scan
_EXCLUDE_NONE, _EXCLUDE_INDEX, _EXCLUDE_NEAREST = 0, 1, 2
_EXCLUDE_MODES = {"none": _EXCLUDE_NONE, "index": _EXCLUDE_INDEX, "nearest": _EXCLUDE_NEAREST}


class _Ranking(NamedTuple):
    """Validated inputs of one retrieval problem."""

    queries: np.ndarray  # (N, dim) float64
    gallery: np.ndarray  # (M, dim) float64
    query_keys: np.ndarray  # (N, W) int64, see minrr.labels.label_keys
    gallery_keys: np.ndarray  # (M, W) int64
    multi: bool
    exclude: int  # one of _EXCLUDE_*


def _prepare(embeddings, labels, gallery, gallery_labels, exclude, block_bytes) -> _Ranking:
    queries = np.ascontiguousarray(as_float_array(embeddings, name="embeddings", ndim=2))
    q_labels = check_labels(labels, queries.shape[0], name="labels")
    if (gallery is None) != (gallery_labels is None):
        raise ValueError("gallery and gallery_labels: give both or neither")
    if gallery is None:
        g, g_labels = queries, q_labels
    else:
        g = np.ascontiguousarray(as_float_array(gallery, name="gallery", ndim=2))
        if g.shape[1] != queries.shape[1]:
            raise ValueError(f"gallery: dimension {g.shape[1]} does not match the embeddings' {queries.shape[1]}")
        g_labels = check_labels(gallery_labels, g.shape[0], name="gallery_labels")
        check_label_pair(q_labels, g_labels, names=("labels", "gallery_labels"))
    if exclude is None:
        exclude = "index" if gallery is None else "none"
    if exclude not in _EXCLUDE_MODES:
        raise ValueError(f"exclude: expected 'index', 'nearest', 'none' or None, got {exclude!r}")
    if exclude == "index" and gallery is not None:
        raise ValueError("exclude: 'index' needs the queries to be the gallery (gallery=None)")
    if not isinstance(block_bytes, (int, np.integer)) or block_bytes < 8:
        raise ValueError(f"block_bytes: expected a whole number of bytes >= 8, got {block_bytes}")
    q_keys, multi = label_keys(q_labels)
    g_keys = q_keys if gallery is None else label_keys(g_labels)[0]
    return _Ranking(queries, g, q_keys, g_keys, multi, _EXCLUDE_MODES[exclude])


@numba.njit(parallel=True, cache=True)
def _squared_distances(queries, gallery_t, out):
    """``out[a, j] = sum_k (queries[a, k] - gallery_t[k, j])**2``, summed over k in order.

    queries: (B, dim); gallery_t: (dim, G); out: (B, G). Every entry is the
    same sequence of float64 additions, so it depends on its two vectors
    only. The loop over k is unrolled by four to save loads and stores of
    ``out``; the additions stay in the order k = 0, 1, 2, ...
    """
    n_dim = queries.shape[1]
    n_unrolled = n_dim - n_dim % 4
    for a in numba.prange(queries.shape[0]):
        q = queries[a]
        row = out[a]
        row[:] = 0.0
        for k in range(0, n_unrolled, 4):
            g0, g1, g2, g3 = gallery_t[k], gallery_t[k + 1], gallery_t[k + 2], gallery_t[k + 3]
            for j in range(row.shape[0]):
                acc = row[j]
                diff = q[k] - g0[j]
                acc += diff * diff
                diff = q[k + 1] - g1[j]
                acc += diff * diff
                diff = q[k + 2] - g2[j]
                acc += diff * diff
                diff = q[k + 3] - g3[j]
                acc += diff * diff
                row[j] = acc
        for k in range(n_unrolled, n_dim):
            g = gallery_t[k]
            for j in range(row.shape[0]):
                diff = q[k] - g[j]
                row[j] += diff * diff


def _transposed_blocks(gallery: np.ndarray, size: int) -> list[tuple[int, np.ndarray]]:
    """The gallery as ``(start, (dim, g) C-contiguous block)`` pairs: one transposed copy, made once."""
    return [(start, np.ascontiguousarray(gallery[start:start + size].T)) for start in range(0, len(gallery), size)]


def _distance_blocks(queries: np.ndarray, blocks: list[tuple[int, np.ndarray]]):
    """Yield ``(g_start, d2)``: squared distances of ``queries`` to each transposed gallery block."""
    buffer = np.empty(len(queries) * max(block.shape[1] for _, block in blocks))
    for g_start, block in blocks:
        d2 = buffer[: len(queries) * block.shape[1]].reshape(len(queries), block.shape[1])
        _squared_distances(queries, block, d2)
        yield g_start, d2


@numba.njit(parallel=True, cache=True)
def _scan_nearest(d2, q_start, g_start, q_keys, g_keys, multi, skip_self, near_d, near_i, rel_d, rel_i, n_rel):
    """Fold a distance block into the running nearest item and two nearest relevant items.

    d2: (B, G) block at (q_start, g_start); near_d/near_i: (B,) nearest item;
    rel_d/rel_i: (B, 2) two nearest relevant items; n_rel: (B,) relevant count.
    Items arrive in increasing index order and only a strictly smaller
    distance replaces a kept one, so ties keep the smaller index.
    """
    for a in numba.prange(d2.shape[0]):
        query = q_start + a
        for j in range(d2.shape[1]):
            item = g_start + j
            if skip_self and item == query:
                continue
            d = d2[a, j]
            if d < near_d[a]:
                near_d[a], near_i[a] = d, item
            if same_label(q_keys[query], g_keys[item], multi):
                n_rel[a] += 1
                if d < rel_d[a, 0]:
                    rel_d[a, 1], rel_i[a, 1] = rel_d[a, 0], rel_i[a, 0]
                    rel_d[a, 0], rel_i[a, 0] = d, item
                elif d < rel_d[a, 1]:
                    rel_d[a, 1], rel_i[a, 1] = d, item


@numba.njit(parallel=True, cache=True)
def _count_before(d2, g_start, target_d, target_i, skip, count):
    """Add to ``count[a]`` the items of the block ranked before item ``target_i[a]``.

    An item is ranked before the target when it is closer, or equally close
    with a smaller index; item ``skip[a]`` (-1 for none) is not counted.
    """
    for a in numba.prange(d2.shape[0]):
        for j in range(d2.shape[1]):
            item = g_start + j
            d = d2[a, j]
            if item != skip[a] and (d < target_d[a] or (d == target_d[a] and item < target_i[a])):
                count[a] += 1


def _first_relevant_rank(problem: _Ranking, block_bytes: int) -> np.ndarray:
    """Two passes over gallery blocks: find the nearest relevant item, then count what precedes it."""
    n_queries, n_gallery = problem.queries.shape[0], problem.gallery.shape[0]
    g_block = max(1, min(n_gallery, _GALLERY_BLOCK, block_bytes // 8))
    q_block = max(1, block_bytes // (8 * g_block))
    blocks = _transposed_blocks(problem.gallery, g_block)
    ranks = np.zeros(n_queries, dtype=np.int64)
    for q_start in range(0, n_queries, q_block):
        q_stop = min(q_start + q_block, n_queries)
        b = q_stop - q_start
        near_d, near_i = np.full(b, np.inf), np.full(b, -1, dtype=np.int64)
        rel_d, rel_i = np.full((b, 2), np.inf), np.full((b, 2), -1, dtype=np.int64)
        n_rel = np.zeros(b, dtype=np.int64)
        queries = problem.queries[q_start:q_stop]
        for g_start, d2 in _distance_blocks(queries, blocks):
            _scan_nearest(d2, q_start, g_start, problem.query_keys, problem.gallery_keys, problem.multi,
                          problem.exclude == _EXCLUDE_INDEX, near_d, near_i, rel_d, rel_i, n_rel)
        if problem.exclude == _EXCLUDE_INDEX:
            skip = np.arange(q_start, q_stop, dtype=np.int64)
        elif problem.exclude == _EXCLUDE_NEAREST:
            skip = near_i
        else:
            skip = np.full(b, -1, dtype=np.int64)
        # Dropping the nearest item drops the nearest relevant one when they coincide.
        dropped = rel_i[:, 0] == skip if problem.exclude == _EXCLUDE_NEAREST else np.zeros(b, dtype=bool)
        target = np.where(dropped, 1, 0)
        target_d = rel_d[np.arange(b), target]
        target_i = rel_i[np.arange(b), target]
        count = np.zeros(b, dtype=np.int64)
        for g_start, d2 in _distance_blocks(queries, blocks):
            _count_before(d2, g_start, target_d, target_i, skip, count)
        ranks[q_start:q_stop] = np.where(n_rel - dropped > 0, count + 1, 0)
    return ranks


@numba.njit(parallel=True, cache=True)
def _ranked_precisions(d2, q_start, q_keys, g_keys, multi, exclude, ap, ap_at_r):
    """AP and AP@R of each query from its full row of squared distances.

    d2: (B, M) rows for queries [q_start, q_start + B); ap, ap_at_r: (B,)
    outputs, NaN for a query without relevant items. The relevant items are
    sorted by (distance, index); every other item is placed among them by
    binary search, so a row costs O(M log R + R log R) and O(M) scratch.
    """
    n_gallery = d2.shape[1]
    for a in numba.prange(d2.shape[0]):
        row = d2[a]
        query = q_start + a
        skip = -1
        if exclude == _EXCLUDE_INDEX:
            skip = query
        elif exclude == _EXCLUDE_NEAREST:
            skip = np.argmin(row)  # the first minimum: ties go to the smaller index
        relevant = np.zeros(n_gallery, dtype=np.bool_)
        n_rel = 0
        for j in range(n_gallery):
            if j != skip and same_label(q_keys[query], g_keys[j], multi):
                relevant[j] = True
                n_rel += 1
        if n_rel == 0:
            ap[a] = np.nan
            ap_at_r[a] = np.nan
            continue
        rel_items = np.flatnonzero(relevant)
        rel_items = rel_items[np.argsort(row[rel_items], kind="mergesort")]  # stable: ties by index
        rel_d = row[rel_items]
        # before[p]: other items with exactly p relevant items ranked before them.
        before = np.zeros(n_rel + 1, dtype=np.int64)
        for j in range(n_gallery):
            if j == skip or relevant[j] or row[j] > rel_d[n_rel - 1]:
                continue  # items past the last relevant one move no position
            lo, hi = 0, n_rel
            while lo < hi:
                mid = (lo + hi) // 2
                if rel_d[mid] < row[j] or (rel_d[mid] == row[j] and rel_items[mid] < j):
                    lo = mid + 1
                else:
                    hi = mid
            before[lo] += 1
        others, total, total_r = 0, 0.0, 0.0
        for m in range(n_rel):
            others += before[m]
            position = m + 1 + others
            total += (m + 1) / position
            if position <= n_rel:
                total_r += (m + 1) / position
        ap[a] = total / n_rel
        ap_at_r[a] = total_r / n_rel


def _precisions(problem: _Ranking, block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    n_queries, n_gallery = problem.queries.shape[0], problem.gallery.shape[0]
    q_block = max(1, block_bytes // (8 * n_gallery))
    gallery_t = np.ascontiguousarray(problem.gallery.T)
    d2_buffer = np.empty((min(q_block, n_queries), n_gallery))
    ap, ap_at_r = np.empty(n_queries), np.empty(n_queries)
    for q_start in range(0, n_queries, q_block):
        q_stop = min(q_start + q_block, n_queries)
        d2 = d2_buffer[: q_stop - q_start]
        _squared_distances(problem.queries[q_start:q_stop], gallery_t, d2)
        _ranked_precisions(d2, q_start, problem.query_keys, problem.gallery_keys, problem.multi,
                           problem.exclude, ap[q_start:q_stop], ap_at_r[q_start:q_stop])
    return ap, ap_at_r


def _mean_over_answerable(values: np.ndarray, answerable: np.ndarray) -> np.ndarray:
    if not answerable.any():
        raise ValueError("labels: no query has a relevant gallery item; the metric is undefined")
    return values[answerable].mean(axis=0)


def first_relevant_rank(embeddings, labels, *, gallery=None, gallery_labels=None, exclude=None,
                        block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """1-based rank ``r`` of each query's nearest relevant gallery item.

    Parameters
    ----------
    embeddings : (N, dim) float
        Query embeddings (and the gallery, when ``gallery`` is None).
    labels : (N,) int or (N, C) multi-hot
        Query labels.
    gallery, gallery_labels : (M, dim) float and (M,) int or (M, C), optional
        A separate gallery; by default the queries are their own gallery.
    exclude : {"index", "nearest", "none"} or None
        What each query leaves out of its ranking (see the module docstring).
        None: "index" without a gallery, "none" with one.
    block_bytes : int
        Budget for the distances held at once: queries go through the gallery
        twice, in blocks of at most ``block_bytes`` bytes and 4096 gallery
        items. Beyond that block, memory is O(N) plus one float64 copy of the
        embeddings (transposed gallery blocks), whatever the gallery size.

    Returns
    -------
    (N,) int64
        ``r`` (``r - 1`` items are ranked before the nearest relevant item),
        or 0 for a query without relevant items. The mean of ``r`` is
        robrank's ``r@M``.
    """
    problem = _prepare(embeddings, labels, gallery, gallery_labels, exclude, block_bytes)
    return _first_relevant_rank(problem, block_bytes)


def recall_at_k(embeddings, labels, ks: int | Sequence[int] = 1, *, gallery=None, gallery_labels=None,
                exclude=None, block_bytes: int = BLOCK_BYTES):
    """Recall@k: fraction of queries with a relevant item among their top k.

    ``ks`` is a cut-off k >= 1 or a sequence of them; the other parameters,
    and the memory used, are those of :func:`first_relevant_rank`.

    Returns
    -------
    float, or (len(ks),) float64 when ``ks`` is a sequence
        Mean of ``r <= k`` over the queries that have a relevant item.
    """
    problem = _prepare(embeddings, labels, gallery, gallery_labels, exclude, block_bytes)
    k_values = np.atleast_1d(np.asarray(ks))
    if k_values.ndim != 1 or k_values.size == 0 or k_values.dtype.kind not in "iu" or np.any(k_values < 1):
        raise ValueError(f"ks: expected a whole number >= 1 or a list of them, got {ks!r}")
    ranks = _first_relevant_rank(problem, block_bytes)
    hits = ranks[:, None] <= k_values[None, :]
    recall = _mean_over_answerable(hits.astype(np.float64), ranks > 0)
    return float(recall[0]) if np.ndim(ks) == 0 else recall


def average_precision(embeddings, labels, *, gallery=None, gallery_labels=None, exclude=None,
                      block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Per-query AP over the full ranking, and AP@R.

    Parameters are those of :func:`first_relevant_rank`, but each query needs
    its full ranking: queries go in blocks of ``max(1, block_bytes // (8 M))``
    full rows of distances, plus O(M) scratch per thread and one float64 copy
    of the gallery.

    Returns
    -------
    ap, ap_at_r : (N,) float64
        AP ``(1/R) sum_j j / pos_j`` and AP@R; NaN for a query without
        relevant items.
    """
    problem = _prepare(embeddings, labels, gallery, gallery_labels, exclude, block_bytes)
    return _precisions(problem, block_bytes)


def mean_average_precision(embeddings, labels, *, gallery=None, gallery_labels=None, exclude=None,
                           block_bytes: int = BLOCK_BYTES) -> float:
    """mAP: mean over queries of AP ``(1/R) sum_j j / pos_j`` over the full ranking.

    Takes the arguments of :func:`average_precision`; queries without relevant
    items are left out of the mean.
    """
    ap, _ = average_precision(embeddings, labels, gallery=gallery, gallery_labels=gallery_labels,
                              exclude=exclude, block_bytes=block_bytes)
    return float(_mean_over_answerable(ap, ~np.isnan(ap)))


def map_at_r(embeddings, labels, *, gallery=None, gallery_labels=None, exclude=None,
             block_bytes: int = BLOCK_BYTES) -> float:
    """mAP@R (Musgrave et al. 2020): mean over queries of AP@R.

    R is the query's number of relevant gallery items, and only the first R
    positions count. Takes the arguments of :func:`average_precision`;
    queries without relevant items are left out of the mean.
    """
    _, ap_at_r = average_precision(embeddings, labels, gallery=gallery, gallery_labels=gallery_labels,
                                   exclude=exclude, block_bytes=block_bytes)
    return float(_mean_over_answerable(ap_at_r, ~np.isnan(ap_at_r)))
