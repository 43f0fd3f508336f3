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
  positions only;
- R-precision ``= #{j : pos_j <= R} / R``, the share of relevant items among
  the first R positions.

A query with no relevant gallery item has none of these; it is left out of
every mean, as pytorch-metric-learning does with its "lone" queries.

When the queries are their own gallery (``gallery=None``), each query leaves
one item out of its ranking (``exclude``):

- ``"index"`` (default): item i for query i, i.e. the query itself;
- ``"nearest"``: the first item of the ranking, whatever it is (robrank drops
  ``argsort(dist)[0]``). The two differ only when another item is at distance
  0 from query i and has a smaller index: "nearest" then drops that duplicate
  and keeps the query itself, which it then retrieves first.

How it runs at GEMM speed with exact results. Every metric needs, for some
relevant items m of each query, the number of gallery items ranked before
m, ``pos_m - 1``; sorted, these give ``pos_1 < ... < pos_R``. The relevant
items are found through the label groups (all items for multi-label), with
their distances ``d_m``: for AP, vectorised float64 sums, each within a
float64 rounding bound of the exact one; Recall@k and the first rank keep
only the first one (two for "nearest"), found among candidates within that
bound of the nearest, with exact distances. Then one float32 GEMM per (query
block, gallery chunk) gives ``score = q.e - |e|^2 / 2``, and for each kept m
an item whose score lies beyond ``d_m`` by more than E, a bound on the
rounding of the GEMM, the casts and the float64 sums
(:func:`minrr.certify.margin.distance_allowance`, Higham's gamma), is certainly
before or after m; only an item within E of ``d_m`` (a near-tie) has its
distance compared, vectorised, then exactly (with the index) when even that
cannot tell. Queries with few relevant items count each one's items by a
vector pass over the row. The others split the range of their thresholds
into equal score buckets (about 4 per relevant item) and count each item in
its bucket's counter, O(1) per item; at the end, two tables per bucket give
the relevant items its items are certainly before and after, which turns
the counts into ranks. Only the few items in buckets that hold a threshold
are placed one by one.
Embeddings are divided by a power of two first (exact) when their norms
would under- or overflow float32.

The work is split into query blocks, each run on one thread with
single-threaded BLAS, so only one thread pool is ever busy; a block takes
the queries by label, so that the relevant items it reads stay in cache.
Memory is bounded whatever the gallery size: per worker, at most
``block_bytes`` of scores (1024 x 1024 float32 by default; 1024 x 512 for AP
when most queries have more than 10 relevant items) and the bytes of a
default score block of kept relevant items (at most ``_STATE_BYTES`` each,
with their buckets: one or two per query for Recall@k, all R for AP; at
least one query's), plus O(1) numbers per gallery item (norms, label
groups).
"""

from __future__ import annotations

import operator
from typing import NamedTuple, Sequence

import numba
import numpy as np

from minrr.io import as_float_array
from minrr.labels import check_label_pair, check_labels, label_keys, same_label
from minrr.certify.margin import (cast_error, distance_allowance, embedding_scale, gamma, in_threads, load_rows, max_norm,
                          squared_norms, thread_count)

__all__ = [
    "QueryStatistics",
    "query_statistics",
    "first_relevant_rank",
    "recall_at_k",
    "average_precision",
    "mean_average_precision",
    "map_at_r",
    "r_precision",
    "mean_over_answerable",
]

BLOCK_BYTES = 64 * 2**20
"""Default size of the distance block a metric holds at once (64 MiB)."""

_GEMM_DTYPE = np.float32
_QUERY_BLOCK = 1024  # queries per GEMM block
_GALLERY_CHUNK = 1024  # gallery items per GEMM block
_BUCKET_CHUNK = 512  # gallery items per GEMM block when most queries have score buckets (whose counters last
# across chunks): a narrower block of scores, which stays in cache for the GEMM and the counting
_BUCKETS_ABOVE = 10  # relevant items of a query beyond which gallery items are counted through score buckets
_BUCKETS_PER_ITEM = 4  # score buckets per kept relevant item of such a query (plus one below and one above all)
_SPILL = 16  # counters that such a query's bucket 0 (most items, never read) uses in turn: none is a queue
_STATE_BYTES = 64 + 12 * _BUCKETS_PER_ITEM  # bytes held per kept relevant item at the peak: distance, index,
# counts, thresholds, and per bucket two int32 tables and an int32 counter (int64 from 2^31 gallery items)
_EXCLUDE_NONE, _EXCLUDE_INDEX, _EXCLUDE_NEAREST = 0, 1, 2
_EXCLUDE_MODES = {"none": _EXCLUDE_NONE, "index": _EXCLUDE_INDEX, "nearest": _EXCLUDE_NEAREST}


class _Ranking(NamedTuple):
    """Validated inputs of one retrieval problem."""

    queries: np.ndarray  # (N, dim) float32 or float64 (the input's float type, else float64)
    gallery: np.ndarray  # (M, dim) likewise
    query_keys: np.ndarray  # (N, W) int64, see minrr.labels.label_keys
    gallery_keys: np.ndarray  # (M, W) int64
    multi: bool
    exclude: int  # one of _EXCLUDE_*


def _float_embeddings(x, name: str) -> np.ndarray:
    """``x`` checked and C-contiguous, float32 kept as is (the exact distances cast it to float64 exactly)."""
    dtype = np.float32 if np.asarray(x).dtype == np.float32 else np.float64
    return np.ascontiguousarray(as_float_array(x, name=name, ndim=2, dtype=dtype))


def _prepare(embeddings, labels, gallery, gallery_labels, exclude, block_bytes) -> _Ranking:
    queries = _float_embeddings(embeddings, "embeddings")
    q_labels = check_labels(labels, queries.shape[0], name="labels")
    if (gallery is None) != (gallery_labels is None):
        raise ValueError("gallery and gallery_labels: give both or neither")
    if gallery is None:
        g, g_labels = queries, q_labels
    else:
        g = _float_embeddings(gallery, "gallery")
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


def _squared_distance(a, b):
    """``sum_k (a[k] - b[k])**2`` in float64."""
    acc = 0.0
    for k in range(a.shape[0]):
        diff = np.float64(a[k]) - np.float64(b[k])
        acc += diff * diff
    return acc


_exact_squared_distance = numba.njit(inline="always", cache=True)(_squared_distance)
"""Summed over k in order: the distance that ranks."""
_approximate_squared_distance = numba.njit(fastmath=True, cache=True)(_squared_distance)
"""Summed in any order (vectorised): within ``tolerance / 2`` of the exact one. Not inlined: its
callers are not fastmath."""


@numba.njit(nogil=True, cache=True)
def _relevant_counts(q_ids, q_keys, g_keys, multi, members, lo, hi, skip_self, n_relevant):
    """``n_relevant[a]``: relevant items of query ``q_ids[a]`` among ``members[lo[a]:hi[a]]``."""
    for a in range(q_ids.shape[0]):
        query, count = q_ids[a], 0
        for p in range(lo[a], hi[a]):
            j = members[p]
            if not (skip_self and j == query) and same_label(q_keys[query], g_keys[j], multi):
                count += 1
        n_relevant[a] = count


def _distances(query, gallery, items, out):
    """``out[t]``: squared distance from ``query`` to ``gallery[items[t]]``, in float64.

    Four items at a time, in four independent chains (instruction-level
    parallelism), each summed over k in order unless compiled with fastmath.
    """
    n_dim, n = gallery.shape[1], items.shape[0]
    start = 0
    while start + 4 <= n:
        e0, e1, e2, e3 = gallery[items[start]], gallery[items[start + 1]], gallery[items[start + 2]], \
            gallery[items[start + 3]]
        d0 = d1 = d2 = d3 = 0.0
        for k in range(n_dim):
            coordinate = np.float64(query[k])
            diff0, diff1 = coordinate - np.float64(e0[k]), coordinate - np.float64(e1[k])
            diff2, diff3 = coordinate - np.float64(e2[k]), coordinate - np.float64(e3[k])
            d0 += diff0 * diff0
            d1 += diff1 * diff1
            d2 += diff2 * diff2
            d3 += diff3 * diff3
        out[start], out[start + 1], out[start + 2], out[start + 3] = d0, d1, d2, d3
        start += 4
    for t in range(start, n):
        out[t] = _exact_squared_distance(query, gallery[items[t]])


_exact_distances = numba.njit(inline="always", cache=True)(_distances)
"""Each summed over k in order, as :func:`_exact_squared_distance` does. Inlined: a cached copy would share
its cache entry with the fastmath one."""
_approximate_distances = numba.njit(nogil=True, fastmath=True, cache=True)(_distances)
"""Summed in any order (vectorised over k): each within ``tolerance / 2`` of the exact one."""

_CROWDED = 32  # items of one counting-sort bucket beyond which _distance_order falls back to merge sort


@numba.njit(nogil=True, cache=True)
def _distance_order(dist, order, count, key):
    """``order[:n]``: the indices of the n values ``dist`` in increasing order, equal values in index order.

    A stable counting sort into n equal-width buckets over [min, max], then an
    insertion sort, which only moves a value past larger ones of its own
    bucket: O(n) for spread values. When a bucket holds more than
    ``_CROWDED`` values, a merge sort instead. ``count`` (n + 1,) and ``key``
    (n,) int64 are scratch.
    """
    n = dist.shape[0]
    smallest, largest = (dist.min(), dist.max()) if n > 0 else (0.0, 0.0)
    if largest == smallest:
        order[:n] = np.arange(n)
        return
    count[:n + 1] = 0
    for t in range(n):  # (dist - smallest) / (largest - smallest) is in [0, 1] whatever the rounding
        key[t] = min(int((dist[t] - smallest) / (largest - smallest) * n), n - 1)
        count[key[t] + 1] += 1
    if np.max(count[:n + 1]) > _CROWDED:
        order[:n] = np.argsort(dist, kind="mergesort")
        return
    for b in range(n):
        count[b + 1] += count[b]
    for t in range(n):
        order[count[key[t]]] = t
        count[key[t]] += 1
    for i in range(1, n):
        t, value = order[i], dist[order[i]]
        j = i - 1
        while j >= 0 and dist[order[j]] > value:
            order[j + 1] = order[j]
            j -= 1
        order[j + 1] = t


@numba.njit(nogil=True, cache=True)
def _sorted_relevant(queries, gallery, q_ids, q_keys, g_keys, multi, members, lo, hi, skip_self, tolerance,
                     offsets, rel_d, rel_i):
    """The first ``offsets[a + 1] - offsets[a]`` relevant items of each query, by distance, then index.

    Candidates ``members[lo[a]:hi[a]]`` come in increasing index order and the
    sort is stable (:func:`_distance_order`), so equal distances keep the
    smaller index first. Every relevant item kept: by the vectorised
    distances, each within ``tolerance[a] / 2`` of the exact one (``rel_d``
    holds them; the order may differ from the exact one within that
    tolerance). Only the first few kept: the vectorised distances rule out
    every candidate farther than ``tolerance[a]`` beyond the last kept one,
    and the rest are ordered by their exact distances (``rel_d``).
    """
    most = np.max(hi - lo) if q_ids.shape[0] > 0 else 0
    items, dist = np.empty(most, dtype=np.int64), np.empty(most)
    order, key = np.empty(most, dtype=np.int64), np.empty(most, dtype=np.int64)
    count = np.empty(most + 1, dtype=np.int64)
    for a in range(q_ids.shape[0]):
        query = q_ids[a]
        keep = offsets[a + 1] - offsets[a]
        n = 0
        for p in range(lo[a], hi[a]):
            j = members[p]
            if not (skip_self and j == query) and same_label(q_keys[query], g_keys[j], multi):
                items[n] = j
                n += 1
        _approximate_distances(queries[query], gallery, items[:n], dist[:n])
        if keep < n:
            cut = np.sort(dist[:n])[keep - 1] + tolerance[a]
            close = 0
            for t in range(n):
                if dist[t] <= cut:
                    items[close] = items[t]
                    close += 1
            n = close
            _exact_distances(queries[query], gallery, items[:n], dist[:n])
        _distance_order(dist[:n], order, count, key)
        for t in range(keep):
            rel_d[offsets[a] + t] = dist[order[t]]
            rel_i[offsets[a] + t] = items[order[t]]


@numba.njit(inline="always", cache=True)
def _is_before(query, gallery, item, target_d, target_i, tolerance):
    """Whether gallery ``item`` ranks before gallery item ``target_i``, by exact distance, then index.

    ``target_d`` is within ``tolerance / 2`` of the target's exact distance, as
    the vectorised distance is of the item's: they settle every case but a
    near-exact tie (with a margin for their own rounding), and the exact
    distances settle that.
    """
    d = _approximate_squared_distance(query, gallery[item])
    if d + 2.0 * tolerance < target_d:
        return True
    if d - 2.0 * tolerance > target_d:
        return False
    d, target_d = _exact_squared_distance(query, gallery[item]), _exact_squared_distance(query, gallery[target_i])
    return d < target_d or (d == target_d and item < target_i)


@numba.njit(inline="always", cache=True)
def _bucket(score, low, scale, top):
    """Score bucket 0 .. top + 1 of ``score``: ``(score - low) * scale``, clipped to [-1, top], plus one.

    All float32 and non-decreasing in ``score``, so a bucket above another
    holds only larger scores, whatever the rounding.
    """
    f = min(max((score - low) * scale, np.float32(-1.0)), top)
    return int(f + np.float32(1.0))


@numba.njit(nogil=True, cache=True)
def _bucket_tables(offsets, above, below, bucket_offsets, low, scale, uncertain_lo, uncertain_hi, tally):
    """Score buckets of the queries that have them (``bucket_offsets[a + 1] > bucket_offsets[a]``).

    Query a's scores between its lowest threshold ``below[offsets[a + 1] - 1]``
    and its highest ``above[offsets[a]]`` are split into equal buckets
    (:func:`_bucket`), with one bucket below and one above them all. An item
    whose score is in bucket b (index ``bucket_offsets[a] + b`` of the tables)
    certainly ranks after the kept items m < ``uncertain_lo`` (relative to
    ``offsets[a]``: the lower threshold's bucket is above b) and before the
    kept items m >= ``uncertain_hi`` (the upper threshold's bucket is below
    b); the kept items in between are uncertain. A bucket is *certain* when
    the two are equal, as bucket 0 always is (every threshold is in bucket 1
    or above). Query a's counters (see :func:`_count_before`) start at 0, but
    those of uncertain buckets at the most negative value, which tells them apart.
    """
    uncertain_start = np.iinfo(tally.dtype).min
    most = np.max(bucket_offsets[1:] - bucket_offsets[:-1]) if offsets.shape[0] > 1 else 0
    with_above = np.empty(most + 1, dtype=np.int64)  # kept items by the bucket of their upper threshold
    with_below = np.empty(most + 1, dtype=np.int64)  # and of their lower one
    for a in range(offsets.shape[0] - 1):
        first, last = offsets[a], offsets[a + 1]
        b_first, n_buckets = bucket_offsets[a], bucket_offsets[a + 1] - bucket_offsets[a]
        if n_buckets == 0:
            continue
        low[a] = below[last - 1]
        width = np.float64(above[first]) - np.float64(low[a])
        step = np.float32((n_buckets - 3) / width) if width > 0.0 else np.float32(np.inf)
        scale[a] = step if step < np.inf else np.finfo(np.float32).max  # one threshold value: own bucket
        top = np.float32(n_buckets - 2)
        with_above[:n_buckets + 1] = 0
        with_below[:n_buckets + 1] = 0
        for m in range(first, last):
            with_above[_bucket(above[m], low[a], scale[a], top)] += 1
            with_below[_bucket(below[m], low[a], scale[a], top)] += 1
        row_tally = tally[b_first + _SPILL * a:b_first + _SPILL * (a + 1) + n_buckets]
        at_or_above, strictly_above = 0, 0  # items whose upper threshold's bucket is >= b, lower threshold's > b
        for b in range(n_buckets - 1, -1, -1):
            at_or_above += with_above[b]
            strictly_above += with_below[b + 1]
            uncertain_lo[b_first + b], uncertain_hi[b_first + b] = strictly_above, at_or_above
            row_tally[b] = 0 if at_or_above == strictly_above else uncertain_start
        row_tally[n_buckets:] = 0


@numba.njit(nogil=True, cache=True)
def _count_before(scores, g_start, queries, gallery, q_ids, skip_self, tolerance, offsets, above, below, rel_d,
                  rel_i, bucket_offsets, low, scale, uncertain_lo, uncertain_hi, tally, counts, later):
    """Count, for each kept relevant item m, the items of one gallery chunk ranked before it.

    ``scores[a, c] = q.e - |e|^2 / 2`` (GEMM precision) for query ``q_ids[a]``
    and item ``g_start + c``; a larger score is a smaller distance. For the
    relevant items ``offsets[a] .. offsets[a + 1]`` of row a (by increasing
    distance ``rel_d``, see :func:`_sorted_relevant`), a score above ``above[m]`` is certainly
    before item m and one below ``below[m]`` certainly after; a score in
    between is a near-tie, settled by the distances (:func:`_is_before`,
    ``tolerance[a]``) and the index.
    Rows without score buckets add to ``counts[m]``, one vector pass over the
    row per kept item. Rows with buckets (:func:`_bucket_tables`) count their
    items by bucket in ``tally``, over all the chunks: row a's counters start
    at ``bucket_offsets[a] + _SPILL * a``, counter b for bucket b >= 1, then
    ``_SPILL`` counters that bucket 0 (the items after every kept one, never
    read) uses in turn by column, so that its many items do not wait on one
    counter; :func:`_add_later` turns the counts into ranks. An item whose
    counter is negative, in a bucket with uncertain kept items, is also
    listed, then placed one by one: before every kept item from some t on,
    added as a difference ``later[offsets[a] + a + t] += 1`` (slot
    ``offsets[a + 1] + a`` of each row: after all its items, never read),
    then its near-ties settled. The query itself is skipped when
    ``skip_self``.
    """
    n_cols = scores.shape[1]
    slots = np.empty(n_cols, dtype=np.uint64)
    flagged = np.empty(n_cols, dtype=np.int64)
    for a in range(scores.shape[0]):
        first, last = offsets[a], offsets[a + 1]
        if first == last:
            continue
        row, query = scores[a], q_ids[a]
        self_col = query - g_start if skip_self and g_start <= query < g_start + n_cols else -1
        b_first, n_buckets = bucket_offsets[a], bucket_offsets[a + 1] - bucket_offsets[a]
        if n_buckets == 0:
            for m in range(first, last):
                hi_t, lo_t = above[m], below[m]
                n_before, n_near = 0, 0
                for c in range(n_cols):
                    n_before += row[c] > hi_t
                    n_near += row[c] >= lo_t
                for c in (self_col, rel_i[m] - g_start):  # the query itself; item m, never before itself
                    if 0 <= c < n_cols and row[c] >= lo_t:
                        n_near -= 1
                        n_before -= row[c] > hi_t
                if n_near > n_before:  # near-ties: settle them exactly
                    for c in range(n_cols):
                        if lo_t <= row[c] <= hi_t and c != self_col and \
                                _is_before(queries[query], gallery, g_start + c, rel_d[m], rel_i[m], tolerance[a]):
                            n_before += 1
                counts[m] += n_before
            continue
        base = first + a  # slot of kept item 0 in ``later``
        low_a, scale_a, top = low[a], scale[a], np.float32(n_buckets - 2)
        row_lo, row_hi = uncertain_lo[b_first:b_first + n_buckets], uncertain_hi[b_first:b_first + n_buckets]
        row_tally = tally[b_first + _SPILL * a:b_first + _SPILL * (a + 1) + n_buckets]
        for c in range(n_cols):  # vectorised
            b = _bucket(row[c], low_a, scale_a, top)
            slots[c] = b if b > 0 else n_buckets + c % _SPILL
        n_flagged = 0
        for c in range(n_cols):  # without branches: items of uncertain buckets (negative counters) also listed
            s = slots[c]
            tallied = row_tally[s] + 1
            row_tally[s] = tallied
            flagged[n_flagged] = c
            n_flagged += tallied < 0
        if self_col >= 0:
            row_tally[slots[self_col]] -= 1
        for f in range(n_flagged):
            c = flagged[f]
            if c == self_col:
                continue
            # Kept items from t on have their upper threshold below the score, those before p their lower
            # one above it (both thresholds are non-increasing in m); those in between are near-ties.
            score, b = row[c], slots[c]
            t = p = first + row_lo[b]
            for m in range(first + row_lo[b], first + row_hi[b]):
                t += above[m] >= score
                p += below[m] > score
            later[base + t - first] += 1
            for m in range(p, t):
                if rel_i[m] != g_start + c and _is_before(queries[query], gallery, g_start + c, rel_d[m], rel_i[m],
                                                          tolerance[a]):
                    later[base + m - first] += 1
                    later[base + m - first + 1] -= 1


@numba.njit(nogil=True, cache=True)
def _add_later(offsets, bucket_offsets, uncertain_lo, tally, later, counts):
    """Add the items counted in ``tally`` and ``later`` (see :func:`_count_before`) to ``counts``.

    An item of a certain bucket b (non-negative counter) is before the kept
    items from ``uncertain_lo[b]`` on, which is non-increasing in b: so kept
    item m is after the items of the certain buckets from the lowest b with
    ``uncertain_lo[b] <= m`` up, a suffix sum of their counts. Going down the
    buckets, ``reach[uncertain_lo[b]]`` is left holding that sum for the
    lowest such b, and its running maximum over m is what each kept item is
    after; plus the running sum of the differences in ``later``.
    """
    most = np.max(offsets[1:] - offsets[:-1]) if offsets.shape[0] > 1 else 0
    reach = np.empty(most + 1, dtype=np.int64)
    for a in range(offsets.shape[0] - 1):
        b_first, n_buckets = bucket_offsets[a], bucket_offsets[a + 1] - bucket_offsets[a]
        if n_buckets == 0:
            continue
        first, n_kept = offsets[a], offsets[a + 1] - offsets[a]
        row_lo, row_tally = uncertain_lo[b_first:b_first + n_buckets], tally[b_first + _SPILL * a:]
        reach[:n_kept + 1] = 0
        suffix = 0
        for b in range(n_buckets - 1, -1, -1):
            suffix += max(row_tally[b], 0)
            reach[row_lo[b]] = suffix
        before, running = 0, 0
        for m in range(n_kept):
            before = max(before, reach[m])
            running += later[first + a + m]
            counts[first + m] += before + running


@numba.njit(nogil=True, cache=True)
def _positions_to_metrics(offsets, counts, n_relevant, drop_nearest, with_ap, ranks, ap, ap_at_r, r_prec):
    """First relevant rank, AP, AP@R and R-precision of each query from its kept relevant items' counts.

    Kept item t is at position ``counts[t] + 1``; sorted, a query's positions
    are those of its first, second, ... relevant item. ``drop_nearest``
    removes the first item of the ranking: the first relevant item when
    nothing precedes it, else an other item.
    """
    for a in range(n_relevant.shape[0]):
        counts[offsets[a]:offsets[a + 1]] = np.sort(counts[offsets[a]:offsets[a + 1]])
        first, n_rel, lost = offsets[a], n_relevant[a], 0
        if drop_nearest and n_rel > 0:
            lost = 1
            if counts[first] == 0:
                first += 1
                n_rel -= 1
        if n_rel == 0:
            ranks[a], ap[a], ap_at_r[a], r_prec[a] = 0, np.nan, np.nan, np.nan
            continue
        ranks[a] = counts[first] + 1 - lost
        if with_ap:
            total, total_r, hits_r = 0.0, 0.0, 0
            for m in range(n_rel):
                position = counts[first + m] + 1 - lost
                total += (m + 1) / position
                if position <= n_rel:
                    total_r += (m + 1) / position
                    hits_r += 1
            ap[a] = total / n_rel
            ap_at_r[a] = total_r / n_rel
            r_prec[a] = hits_r / n_rel


def _rounding_allowance(q_norm: np.ndarray, g_norm_max: float, dim: int, dtype, scale: float) -> np.ndarray:
    """E per query: ``|(|q'|^2 - 2 score) - d / scale^2| <= E`` for every gallery item.

    ``score`` is the GEMM's ``[q', -1/2] . [e', |e'|^2]`` on the embeddings
    divided by ``scale`` and cast to ``dtype`` (norms ``q_norm``,
    ``g_norm_max`` of the scaled embeddings), and ``d`` the exact float64
    distance of the unscaled ones. Terms: the GEMM's rounding and underflow
    (:func:`minrr.certify.margin.distance_allowance`, augmented form), the cast of the
    embeddings (:func:`minrr.certify.margin.cast_error`), and the float64 rounding of
    ``d``, of the squared norms and of the thresholds.
    """
    reach = q_norm + g_norm_max  # bounds |q| + |e|, and |q - e|
    shift = cast_error(dtype, q_norm, g_norm_max)  # |(q' - e') - (q - e)| <= shift
    unit64 = np.finfo(np.float64).eps / 2.0
    exact = ((gamma(dim + 2, np.float64) + 2.0 * gamma(dim, np.float64) + 8.0 * unit64) * reach ** 2
             + (dim + 2) * 2.0 ** -1074 / scale ** 2)
    gemm = distance_allowance(dim + 1, dtype, q_norm, g_norm_max, grouped=True)
    return (gemm + 2.0 * reach * shift + shift ** 2 + exact) * (1.0 + 1e-6)


@numba.njit(inline="always", cache=True)
def _next_float32(value, step):
    """The float32 ``step`` (1 or -1) places above finite float32 ``value``, +0 and -0 counting as one."""
    bits = np.int64(value.view(np.int32))
    place = (bits if bits >= 0 else -(bits & 0x7FFFFFFF)) + step  # the floats in order, as integers
    return np.int32(place if place >= 0 else -place | -2**31).view(np.float32)  # negative: sign bit, magnitude


@numba.njit(nogil=True, cache=True)
def _thresholds(offsets, q_sq, allowance, rel_d, scale2, above, below):
    """Float32 score thresholds of the kept relevant items t of each query a (``offsets[a] <= t < offsets[a + 1]``).

    With ``centre = q_sq[a] - rel_d[t] / scale2``, twice the score at the
    distance ``rel_d[t]``, ``above[t] = (centre + allowance[a]) / 2`` rounded
    down and ``below[t] = (centre - allowance[a]) / 2`` rounded up, so that
    comparing a float32 score against them is exact.
    """
    for a in range(offsets.shape[0] - 1):
        for t in range(offsets[a], offsets[a + 1]):  # without branches
            centre = q_sq[a] - rel_d[t] / scale2
            high, low = (centre + allowance[a]) / 2.0, (centre - allowance[a]) / 2.0
            nearest_high, nearest_low = np.float32(high), np.float32(low)
            above[t] = nearest_high if nearest_high <= high else _next_float32(nearest_high, -1)
            below[t] = nearest_low if nearest_low >= low else _next_float32(nearest_low, 1)


class _Gallery(NamedTuple):
    """What every query block needs of the gallery, made once: O(M) numbers."""

    members: np.ndarray  # candidate relevant items, grouped by label (single-label) or all items
    member_keys: np.ndarray  # the members' labels, ascending (single-label)
    norm_column: np.ndarray  # (M,) |e'|^2 of the scaled, cast items, in the GEMM's dtype
    norm_max: float  # max |e| / scale
    scale: float  # power of two the embeddings are divided by before the GEMM


def _gallery_state(problem: _Ranking) -> _Gallery:
    q_norm_max, g_norm_max = max_norm(problem.queries), max_norm(problem.gallery)
    if q_norm_max + g_norm_max > 1e150:
        raise ValueError("embeddings: norms must stay below 1e150 for squared distances to be finite")
    scale = embedding_scale(q_norm_max, g_norm_max)
    column = squared_norms(problem.gallery, _GEMM_DTYPE, scale).astype(_GEMM_DTYPE)
    if problem.multi:
        members = np.arange(len(problem.gallery))
        member_keys = np.zeros(len(problem.gallery), dtype=np.int64)  # unused: every item is a candidate
    else:
        members = np.argsort(problem.gallery_keys[:, 0], kind="stable")
        member_keys = problem.gallery_keys[members, 0]
    return _Gallery(members, member_keys, column, g_norm_max / scale, scale)


def _candidates(problem: _Ranking, gallery: _Gallery, q_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``lo, hi``: the candidate relevant items of each query are ``gallery.members[lo:hi]``."""
    if problem.multi:
        return np.zeros(len(q_ids), dtype=np.int64), np.full(len(q_ids), len(gallery.members), dtype=np.int64)
    keys = problem.query_keys[q_ids, 0]
    return (np.searchsorted(gallery.member_keys, keys, side="left"),
            np.searchsorted(gallery.member_keys, keys, side="right"))


def _query_blocks(kept: np.ndarray, size: int, state_bytes: int) -> list[tuple[int, int]]:
    """Consecutive query ranges of at most ``size`` queries and ``state_bytes`` of kept relevant items."""
    blocks, start, held = [], 0, 0
    for a, n in enumerate(kept.tolist()):
        if a > start and (a - start == size or (held + n) * _STATE_BYTES > state_bytes):
            blocks.append((start, a))
            start, held = a, 0
        held += n
    blocks.append((start, len(kept)))
    return blocks


def _ranked(problem: _Ranking, block_bytes: int, with_ap: bool, rows: range | None = None) -> tuple[np.ndarray, ...]:
    """First relevant rank of queries ``rows`` (default: all), and (``with_ap``) AP, AP@R and R-precision (else NaN).

    Returns (len(rows),) arrays; a query's values do not depend on ``rows``.
    """
    rows = range(problem.queries.shape[0]) if rows is None else rows
    first_row, n_queries, dim = rows.start, len(rows), problem.queries.shape[1]
    n_gallery = problem.gallery.shape[0]
    gallery = _gallery_state(problem)
    dtype, scale = _GEMM_DTYPE, gallery.scale
    itemsize = np.dtype(dtype).itemsize
    skip_self = problem.exclude == _EXCLUDE_INDEX
    drop_nearest = problem.exclude == _EXCLUDE_NEAREST
    workers = min(thread_count(n_queries * n_gallery), n_queries)

    def block_shape(widest):
        """Gallery items and queries per GEMM block."""
        chunk = max(1, min(n_gallery, widest, block_bytes // itemsize))
        return chunk, max(1, min(_QUERY_BLOCK, _QUERY_BLOCK * _GALLERY_CHUNK // chunk, -(-n_queries // workers),
                                 block_bytes // (itemsize * chunk)))

    chunk, size = block_shape(_GALLERY_CHUNK)
    state_bytes = size * chunk * itemsize  # kept relevant items per block: the bytes of a default score block
    n_relevant = np.empty(n_queries, dtype=np.int64)

    def count_relevant(start, stop):
        q_ids = np.arange(first_row + start, first_row + stop)
        lo, hi = _candidates(problem, gallery, q_ids)
        _relevant_counts(q_ids, problem.query_keys, problem.gallery_keys, problem.multi, gallery.members, lo, hi,
                         skip_self, n_relevant[start:stop])

    in_threads(count_relevant, [(s, min(s + size, n_queries)) for s in range(0, n_queries, size)], workers)
    kept = n_relevant if with_ap else np.minimum(n_relevant, 1 + drop_nearest)
    if np.median(kept) > _BUCKETS_ABOVE:
        chunk, size = block_shape(_BUCKET_CHUNK)
    # Blocks take the queries by label (single-label): those of one label share their candidate relevant items,
    # which then stay in cache for all of their distances.
    order = np.arange(n_queries) if problem.multi else \
        np.argsort(problem.query_keys[first_row:first_row + n_queries, 0], kind="stable")
    ranks = np.empty(n_queries, dtype=np.int64)
    ap, ap_at_r, r_prec = (np.full(n_queries, np.nan) for _ in range(3))

    def rank_block(start, stop):
        picked = order[start:stop]
        q_ids = first_row + picked
        offsets = np.concatenate([[0], np.cumsum(kept[picked])])
        rel_d, rel_i = np.empty(offsets[-1]), np.empty(offsets[-1], dtype=np.int64)
        lo, hi = _candidates(problem, gallery, q_ids)
        cast = load_rows(problem.queries, q_ids, dtype, scale)
        q_sq = squared_norms(cast, dtype, 1.0)
        q_norm = np.sqrt(squared_norms(problem.queries[q_ids], np.float64, scale))
        # Two float64 sums of the same dim + 2 rounded terms differ by at most 2 gamma_{dim+2} (|q| + |e|)^2.
        tolerance = (4.0 * gamma(dim + 2, np.float64) * ((q_norm + gallery.norm_max) * scale) ** 2
                     + 4 * dim * 2.0 ** -1074) * (1.0 + 1e-6)
        _sorted_relevant(problem.queries, problem.gallery, q_ids, problem.query_keys, problem.gallery_keys,
                         problem.multi, gallery.members, lo, hi, skip_self, tolerance, offsets, rel_d, rel_i)
        # Plus the tolerance of the relevant items' vectorised distances (rel_d), with room for rounding.
        allowance = _rounding_allowance(q_norm, gallery.norm_max, dim, dtype, scale) + tolerance / scale ** 2
        above, below = np.empty(offsets[-1], dtype=dtype), np.empty(offsets[-1], dtype=dtype)
        _thresholds(offsets, q_sq, allowance, rel_d, scale ** 2, above, below)
        augmented = np.empty((len(q_ids), dim + 1), dtype=dtype)
        augmented[:, :dim] = cast
        augmented[:, dim] = -0.5
        items = np.empty((chunk, dim + 1), dtype=dtype)
        buffer = np.empty(len(q_ids) * chunk, dtype=dtype)
        n_buckets = np.where(kept[picked] > _BUCKETS_ABOVE, _BUCKETS_PER_ITEM * kept[picked] + 2, 0)
        bucket_offsets = np.concatenate([[0], np.cumsum(n_buckets)])
        low, bucket_scale = np.empty(len(q_ids), dtype=dtype), np.empty(len(q_ids), dtype=dtype)
        uncertain_lo, uncertain_hi = (np.empty(bucket_offsets[-1], dtype=np.int32) for _ in range(2))
        tally = np.empty(bucket_offsets[-1] + _SPILL * len(q_ids), dtype=np.int32 if n_gallery < 2**31 else np.int64)
        _bucket_tables(offsets, above, below, bucket_offsets, low, bucket_scale, uncertain_lo, uncertain_hi, tally)
        counts = np.zeros(offsets[-1], dtype=np.int64)
        later = np.zeros(offsets[-1] + len(q_ids), dtype=np.int64)
        for g_start in range(0, n_gallery, chunk):
            n = min(chunk, n_gallery - g_start)
            items[:n, :dim] = load_rows(problem.gallery, slice(g_start, g_start + n), dtype, scale)
            items[:n, dim] = gallery.norm_column[g_start:g_start + n]
            scores = buffer[:len(q_ids) * n].reshape(len(q_ids), n)
            np.matmul(augmented, items[:n].T, out=scores)  # q'.e' - |e'|^2 / 2
            _count_before(scores, g_start, problem.queries, problem.gallery, q_ids, skip_self, tolerance, offsets,
                          above, below, rel_d, rel_i, bucket_offsets, low, bucket_scale, uncertain_lo, uncertain_hi,
                          tally, counts, later)
        _add_later(offsets, bucket_offsets, uncertain_lo, tally, later, counts)
        values = np.empty(len(q_ids), dtype=np.int64), *(np.full(len(q_ids), np.nan) for _ in range(3))
        _positions_to_metrics(offsets, counts, n_relevant[picked], drop_nearest, with_ap, *values)
        ranks[picked], ap[picked], ap_at_r[picked], r_prec[picked] = values

    # Kept relevant items of a block take at most the bytes of a score block, whatever the gallery size.
    in_threads(rank_block, _query_blocks(kept[order], size, state_bytes), workers)
    return ranks, ap, ap_at_r, r_prec


class QueryStatistics(NamedTuple):
    """What every metric averages, per query: (n,) arrays for n queries."""

    first_relevant_rank: np.ndarray  # int64 r, 0 for a query without relevant items
    average_precision: np.ndarray  # float64 AP, NaN without relevant items
    ap_at_r: np.ndarray  # float64 AP@R, likewise
    r_precision: np.ndarray  # float64, likewise


def query_statistics(embeddings, labels, *, gallery=None, gallery_labels=None, exclude=None,
                     rows: tuple[int, int] | None = None, block_bytes: int = BLOCK_BYTES) -> QueryStatistics:
    """First relevant rank, AP, AP@R and R-precision of each query, in one pass over the gallery.

    The means of these (over the queries with a relevant item) are every metric of
    this module, so a caller that wants them all pays for one pass, not one per metric.

    Parameters
    ----------
    embeddings, labels, gallery, gallery_labels, exclude, block_bytes : as :func:`first_relevant_rank`.
    rows : (start, stop), optional
        Only queries ``start .. stop - 1`` (default: all), still ranked against the
        whole gallery, leaving out what ``exclude`` says (with ``"index"``, query i
        leaves out item i of the embeddings). A query's values do not depend on
        ``rows``, so chunks of queries can be computed apart, on other machines,
        and concatenated.

    Returns
    -------
    :class:`QueryStatistics` of (stop - start,) arrays.
    """
    problem = _prepare(embeddings, labels, gallery, gallery_labels, exclude, block_bytes)
    n_queries = problem.queries.shape[0]
    if rows is None:
        rows = (0, n_queries)
    try:
        start, stop = (int(operator.index(v)) for v in rows)
    except (TypeError, ValueError):
        raise ValueError(f"rows: expected (start, stop) whole numbers, got {rows!r}") from None
    if not 0 <= start < stop <= n_queries:
        raise ValueError(f"rows: expected 0 <= start < stop <= {n_queries} (the queries), got {rows!r}")
    return QueryStatistics(*_ranked(problem, block_bytes, with_ap=True, rows=range(start, stop)))


def _first_relevant_rank(problem: _Ranking, block_bytes: int) -> np.ndarray:
    return _ranked(problem, block_bytes, with_ap=False)[0]


def _precisions(problem: _Ranking, block_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AP, AP@R and R-precision of every query (NaN without relevant items)."""
    return _ranked(problem, block_bytes, with_ap=True)[1:]


def mean_over_answerable(values: np.ndarray, answerable: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of ``values[answerable]``, the queries with a relevant item; refuses none."""
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
        Budget per worker thread for the scores held at once (float32 blocks
        of at most 1024 queries x 1024 gallery items) and for the kept
        relevant items of a query block. Beyond that, memory is O(N + M)
        numbers, whatever the gallery size; float32 embeddings are not copied.

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
    recall = mean_over_answerable(hits.astype(np.float64), ranks > 0)
    return float(recall[0]) if np.ndim(ks) == 0 else recall


def average_precision(embeddings, labels, *, gallery=None, gallery_labels=None, exclude=None,
                      block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Per-query AP over the full ranking, and AP@R.

    Parameters, and the memory used, are those of :func:`first_relevant_rank`,
    but every relevant item of a query is kept (about 112 bytes each at the
    peak, with its score buckets), so a query block holds at most as many bytes of
    them as a default block of scores (at least one query's), whatever the gallery size.
    Cost: the GEMM, plus O(R) per gallery item and query for R <= 10 relevant
    items, O(1) beyond (plus O(R) per query).

    Returns
    -------
    ap, ap_at_r : (N,) float64
        AP ``(1/R) sum_j j / pos_j`` and AP@R; NaN for a query without
        relevant items.
    """
    problem = _prepare(embeddings, labels, gallery, gallery_labels, exclude, block_bytes)
    return _precisions(problem, block_bytes)[:2]


def mean_average_precision(embeddings, labels, *, gallery=None, gallery_labels=None, exclude=None,
                           block_bytes: int = BLOCK_BYTES) -> float:
    """mAP: mean over queries of AP ``(1/R) sum_j j / pos_j`` over the full ranking.

    Takes the arguments of :func:`average_precision`; queries without relevant
    items are left out of the mean.
    """
    ap, _ = average_precision(embeddings, labels, gallery=gallery, gallery_labels=gallery_labels,
                              exclude=exclude, block_bytes=block_bytes)
    return float(mean_over_answerable(ap, ~np.isnan(ap)))


def map_at_r(embeddings, labels, *, gallery=None, gallery_labels=None, exclude=None,
             block_bytes: int = BLOCK_BYTES) -> float:
    """mAP@R (Musgrave et al. 2020): mean over queries of AP@R.

    R is the query's number of relevant gallery items, and only the first R
    positions count. Takes the arguments of :func:`average_precision`;
    queries without relevant items are left out of the mean.
    """
    _, ap_at_r = average_precision(embeddings, labels, gallery=gallery, gallery_labels=gallery_labels,
                                   exclude=exclude, block_bytes=block_bytes)
    return float(mean_over_answerable(ap_at_r, ~np.isnan(ap_at_r)))


def r_precision(embeddings, labels, *, gallery=None, gallery_labels=None, exclude=None,
                block_bytes: int = BLOCK_BYTES) -> float:
    """R-precision: mean over queries of the share of relevant items among the first R positions.

    R is the query's number of relevant gallery items (pytorch-metric-learning's
    ``r_precision``). Takes the arguments of :func:`average_precision`; queries
    without relevant items are left out of the mean.
    """
    problem = _prepare(embeddings, labels, gallery, gallery_labels, exclude, block_bytes)
    r_prec = _precisions(problem, block_bytes)[2]
    return float(mean_over_answerable(r_prec, ~np.isnan(r_prec)))
