"""The metric-learning retrieval metrics of a set of embeddings at once, under pytorch-metric-learning's names.

======================================  ==========================================================
key (``AccuracyCalculator``'s)          metric (see :mod:`minrr.metrics.retrieval`)
======================================  ==========================================================
``precision_at_1``                      Recall@1 (equal to precision@1: one item retrieved)
``recall_at_k`` (k > 1, e.g. ``recall_at_4``)  Recall@k, the share of queries with a relevant item in the top k
``mean_average_precision``              mAP over the full ranking
``mean_average_precision_at_r``         mAP@R
``r_precision``                         R-precision
``NMI``                                 NMI of k-means clusters of the queries (single labels only)
======================================  ==========================================================

pytorch-metric-learning has no Recall@k for k > 1 (its ``precision_at_k`` would be
another metric); ``recall_at_k`` follows its ``<metric>_at_<k>`` pattern. ``minrr
evaluate`` writes these keys, and so do the model cards of ``minrr train``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .clustering import kmeans_nmi
from .retrieval import QueryStatistics, mean_over_answerable, query_statistics

__all__ = ["retrieval_metrics", "summarise", "recall_ks", "recall_key"]


def recall_key(k: int) -> str:
    """The key of Recall@k: ``precision_at_1`` for k = 1, else ``recall_at_<k>``."""
    return "precision_at_1" if k == 1 else f"recall_at_{k}"


def recall_ks(ks: int | Sequence[int]) -> list[int]:
    """The k of Recall@k to report for ``ks``: 1 and each k given, increasing (each checked >= 1)."""
    k_array = np.atleast_1d(np.asarray(ks))
    if k_array.ndim != 1 or k_array.size == 0 or k_array.dtype.kind not in "iu" or np.any(k_array < 1):
        raise ValueError(f"ks: expected a whole number >= 1 or a list of them, got {ks!r}")
    return sorted({1, *k_array.tolist()})


def summarise(statistics: QueryStatistics, ks: int | Sequence[int] = (1, 2, 4, 8)) -> dict[str, float]:
    """The retrieval metrics (no NMI) of per-query statistics, keyed as :func:`retrieval_metrics` keys them.

    ``statistics`` may be chunks of queries computed apart and concatenated
    (:func:`minrr.metrics.retrieval.query_statistics` with ``rows``): the result is that of the whole.
    """
    k_values = np.asarray(recall_ks(ks))
    ranks = statistics.first_relevant_rank
    hits = (ranks[:, None] <= k_values[None, :]).astype(np.float64)
    metrics = {recall_key(k): float(r) for k, r in zip(k_values.tolist(), mean_over_answerable(hits, ranks > 0))}
    for key, values in (("mean_average_precision", statistics.average_precision),
                        ("mean_average_precision_at_r", statistics.ap_at_r),
                        ("r_precision", statistics.r_precision)):
        metrics[key] = float(mean_over_answerable(values, ~np.isnan(values)))
    return metrics


def retrieval_metrics(embeddings, labels, *, ks: int | Sequence[int] = (1, 2, 4, 8), gallery=None,
                      gallery_labels=None, exclude=None, seed: int = 0, nmi: bool = True) -> dict[str, float]:
    """Recall@k, mAP, mAP@R, R-precision and NMI, keyed as pytorch-metric-learning keys them.

    One pass over the gallery gives every retrieval metric
    (:func:`minrr.metrics.retrieval.query_statistics`).

    Parameters
    ----------
    embeddings : (N, dim) float, the queries (and the gallery when ``gallery`` is None).
    labels : (N,) int or (N, C) multi-hot.
    ks : the k of Recall@k; 1 is always reported (``precision_at_1``).
    gallery, gallery_labels, exclude : as for :func:`minrr.metrics.retrieval.recall_at_k`.
    seed : seed of the k-means behind NMI.
    nmi : False leaves NMI out (its k-means dominates the cost with thousands of classes).

    Returns
    -------
    dict of floats: ``precision_at_1``, ``recall_at_<k>`` for each k > 1 in increasing
    order, ``mean_average_precision``, ``mean_average_precision_at_r``, ``r_precision``,
    and ``NMI`` when ``nmi`` and the labels are single labels (NMI of the queries' clusters).
    """
    recall_ks(ks)  # checked before the work
    metrics = summarise(query_statistics(embeddings, labels, gallery=gallery, gallery_labels=gallery_labels,
                                         exclude=exclude), ks)
    if nmi and np.asarray(labels).ndim == 1:
        metrics["NMI"] = kmeans_nmi(embeddings, labels, seed=seed)
    return metrics
