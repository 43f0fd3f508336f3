"""Retrieval metrics of Hamming rankings, in the conventions of deep-hashing papers.

A ranking is ``retrieved``: ``(n_queries, k)`` database indices, best first, as returned
by :func:`minrr.hashing.hamming.search`. A database item is relevant to a query when their labels
are the same (single-label ``(n,)`` integers) or share a class (multi-hot ``(n, C)``).

mAP@k (DeepHash-pytorch / CSQ): in the top k, ``AP = (1 / R_k) sum_j precision@j`` over the
relevant positions j, where ``R_k`` is the number of relevant items in the top k; AP = 0
when ``R_k = 0``, and mAP is the mean over all queries. The DHTA variant leaves the
queries with ``R_k = 0`` out of the mean.
"""

from __future__ import annotations

import numba
import numpy as np

from minrr.hashing import hamming
from minrr.labels import check_label_pair, check_labels, label_keys, same_label

__all__ = [
    "average_precision",
    "map_at_k",
    "mean_of_ap",
    "precision_at_k",
    "precision_recall_curve",
    "hamming_map",
]

VARIANTS = ("deephash", "dhta")
_RANKED_PER_BATCH = 1 << 22  # ranking entries per query batch in hamming_map


@numba.njit(parallel=True, cache=True)
def _average_precision(retrieved, query_keys, database_keys, multi, ap, n_relevant):
    """AP and R_k of each query's ranking (see the module docstring)."""
    for q in numba.prange(retrieved.shape[0]):
        hits = 0
        total = 0.0
        for j in range(retrieved.shape[1]):
            if same_label(query_keys[q], database_keys[retrieved[q, j]], multi):
                hits += 1
                total += hits / (j + 1)
        n_relevant[q] = hits
        ap[q] = total / hits if hits else 0.0


@numba.njit(parallel=True, cache=True)
def _hit_curves(retrieved, query_keys, database_keys, multi, n_relevant_all, hits_sum, recall_sum):
    """Sums over each part of the queries, at every cut-off j: of the relevant items in
    the top j + 1 (``hits_sum``), and of their share of the query's relevant items in
    the whole database (``recall_sum``)."""
    n_parts = hits_sum.shape[0]
    n_queries = retrieved.shape[0]
    for p in numba.prange(n_parts):
        for q in range(p * n_queries // n_parts, (p + 1) * n_queries // n_parts):
            hits = 0
            for j in range(retrieved.shape[1]):
                hits += same_label(query_keys[q], database_keys[retrieved[q, j]], multi)
                hits_sum[p, j] += hits
                if n_relevant_all[q]:
                    recall_sum[p, j] += hits / n_relevant_all[q]


@numba.njit(parallel=True, cache=True)
def _count_relevant(query_keys, database_keys, multi, out):
    """Relevant database items of each query."""
    for q in numba.prange(query_keys.shape[0]):
        count = 0
        for i in range(database_keys.shape[0]):
            count += same_label(query_keys[q], database_keys[i], multi)
        out[q] = count


def _checked(retrieved, query_labels, database_labels):
    """Validate a ranking and its labels; return (retrieved, query keys, database keys, multi)."""
    ranking = np.asarray(retrieved)
    if ranking.ndim != 2 or 0 in ranking.shape:
        raise ValueError(f"retrieved: expected (n_queries, k) database indices, got shape {ranking.shape}")
    if ranking.dtype.kind not in "iu":
        raise TypeError(f"retrieved: expected integer database indices, got dtype {ranking.dtype}")
    db = check_labels(database_labels, name="database_labels")
    qy = check_labels(query_labels, ranking.shape[0], name="query_labels")
    check_label_pair(qy, db, names=("query_labels", "database_labels"))
    if ranking.size and (ranking.min() < 0 or ranking.max() >= len(db)):
        raise ValueError(f"retrieved: indices must lie in [0, {len(db)}), the database_labels rows")
    q_keys, multi = label_keys(qy)
    db_keys, _ = label_keys(db)
    return np.ascontiguousarray(ranking, dtype=np.int64), q_keys, db_keys, multi


def average_precision(retrieved, query_labels, database_labels):
    """Average precision of each query over its ranking (DeepHash / CSQ convention).

    Parameters
    ----------
    retrieved : (n_queries, k) int, database indices, best first
    query_labels : (n_queries,) int or (n_queries, C) multi-hot
    database_labels : (N,) int or (N, C) multi-hot

    Returns
    -------
    ap : (n_queries,) float64, 0 where no relevant item is retrieved
    n_relevant : (n_queries,) int64, R_k, the relevant items in each query's top k
    """
    ranking, q_keys, db_keys, multi = _checked(retrieved, query_labels, database_labels)
    ap = np.empty(len(ranking), dtype=np.float64)
    n_relevant = np.empty(len(ranking), dtype=np.int64)
    _average_precision(ranking, q_keys, db_keys, multi, ap, n_relevant)
    return ap, n_relevant


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")


def mean_of_ap(ap, n_relevant, *, variant: str = "deephash") -> float:
    """The mAP of per-query APs, as :func:`average_precision` returns them.

    ``variant="deephash"`` averages over every query (AP = 0 without a relevant item in
    the top k); ``variant="dhta"`` averages over the queries with ``n_relevant > 0``, and
    is NaN when there are none.
    """
    _check_variant(variant)
    ap, n_relevant = np.asarray(ap), np.asarray(n_relevant)
    if variant == "dhta":
        ap = ap[n_relevant > 0]
    return float(ap.mean()) if len(ap) else float("nan")


def map_at_k(retrieved, query_labels, database_labels, *, variant: str = "deephash") -> float:
    """mAP@k of a ranking, k = ``retrieved.shape[1]``, under ``variant`` (see :func:`mean_of_ap`).

    The deep-hashing papers' mAP@k; :func:`minrr.metrics.retrieval.mean_average_precision` is the
    metric-learning mAP over the full ranking of embeddings.

    Arguments as in :func:`average_precision`.
    """
    ap, n_relevant = average_precision(retrieved, query_labels, database_labels)
    return mean_of_ap(ap, n_relevant, variant=variant)


def precision_at_k(retrieved, query_labels, database_labels) -> float:
    """Mean over queries of the fraction of relevant items in the top k = ``retrieved.shape[1]``."""
    _, n_relevant = average_precision(retrieved, query_labels, database_labels)
    return float(n_relevant.mean() / np.shape(retrieved)[1])


def precision_recall_curve(retrieved, query_labels, database_labels):
    """Precision and recall at every cut-off j = 1 .. k, averaged over queries.

    Recall divides by the query's relevant items in the whole database; a query without
    any counts as recall 0 (the DeepHash convention). Arguments as in
    :func:`average_precision`.

    Returns
    -------
    precision : (k,) float64, mean precision@j
    recall : (k,) float64, mean recall@j
    """
    ranking, q_keys, db_keys, multi = _checked(retrieved, query_labels, database_labels)
    n_relevant_all = np.empty(len(ranking), dtype=np.int64)
    _count_relevant(q_keys, db_keys, multi, n_relevant_all)
    n_parts = min(len(ranking), 64)  # fixed split: the sums do not depend on the thread count
    k = ranking.shape[1]
    hits_sum = np.zeros((n_parts, k), dtype=np.int64)
    recall_sum = np.zeros((n_parts, k), dtype=np.float64)
    _hit_curves(ranking, q_keys, db_keys, multi, n_relevant_all, hits_sum, recall_sum)
    n_queries = len(ranking)
    precision = hits_sum.sum(axis=0) / (np.arange(1, k + 1) * n_queries)
    recall = recall_sum.sum(axis=0) / n_queries
    return precision, recall


def hamming_map(query_codes, database_codes, query_labels, database_labels, k: int | None = None, *,
                packed: bool = False, variant: str = "deephash") -> float:
    """mAP@k of the Hamming ranking of codes (k = None: the whole database, mAP@all).

    Unpacked codes are packed once; queries are then ranked in batches of about
    ``2**22 / k``, so memory stays bounded whatever the number of queries.

    Queries come first, as in :func:`minrr.hashing.hamming.search` (and ``faiss.knn(xq, xb, k)``).

    Parameters
    ----------
    query_codes : (n_queries, K) codes, or packed (see :mod:`minrr.hashing.hamming`)
    database_codes : (N, K) codes in the same layout
    query_labels : (n_queries,) int or (n_queries, C) multi-hot
    database_labels : (N,) int or (N, C) multi-hot
    k : int or None
    packed, variant : as in :func:`minrr.hashing.hamming.search` and :func:`map_at_k`

    Returns
    -------
    float, the mAP
    """
    _check_variant(variant)
    if not packed:
        if np.ndim(query_codes) == np.ndim(database_codes) == 2 and \
                np.shape(query_codes)[1] != np.shape(database_codes)[1]:
            raise ValueError(f"query_codes: codes of {np.shape(query_codes)[1]} bits, but the "
                             f"database codes have {np.shape(database_codes)[1]} bits")
        database_codes = hamming.pack(database_codes, name="database_codes")
        query_codes = hamming.pack(query_codes, name="query_codes")
    n_queries = len(query_codes)
    k = hamming.check_k(len(database_codes) if k is None else k, len(database_codes))
    query_labels = check_labels(query_labels, n_queries, name="query_labels")
    database_labels = check_labels(database_labels, len(database_codes), name="database_labels")
    check_label_pair(query_labels, database_labels, names=("query_labels", "database_labels"))
    batch = max(1, _RANKED_PER_BATCH // k)
    ap = np.empty(n_queries, dtype=np.float64)
    n_relevant = np.empty(n_queries, dtype=np.int64)
    for q0 in range(0, n_queries, batch):
        rows = slice(q0, q0 + batch)
        _, retrieved = hamming.search(query_codes[rows], database_codes, k, packed=True)
        ap[rows], n_relevant[rows] = average_precision(retrieved, query_labels[rows], database_labels)
    return mean_of_ap(ap, n_relevant, variant=variant)
