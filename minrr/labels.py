"""Class labels and the "same label" relation used by every retrieval metric.

Labels are either single-label integers ``(N,)`` or multi-hot rows ``(N, C)``;
two items are relevant to each other when their labels are equal
(single-label) or share a class, ``y_i . y_j > 0`` (multi-label).

Numba kernels see labels as *keys*: an ``(N, W)`` int64 array plus a flag.
Single-label keys are the labels themselves (``W = 1``, compared for
equality); multi-label keys are the multi-hot rows packed into 64-bit words
(``W = ceil(C / 64)``, compared by bitwise AND). :func:`same_label` is the one
comparison every kernel calls.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["check_labels", "check_label_pair", "label_keys", "same_label", "relevance", "non_relevant_counts",
           "check_top_k"]


def check_labels(labels, n: int | None = None, *, name: str) -> np.ndarray:
    """Validate labels: ``(N,)`` integers, or ``(N, C)`` multi-hot 0/1 (or bool).

    Returns int64 ``(N,)`` or bool ``(N, C)``. ``n``, when given, is the
    number of items the labels must describe.
    """
    y = np.asarray(labels)
    if y.ndim not in (1, 2):
        raise ValueError(f"{name}: expected (N,) integer labels or (N, C) multi-hot labels, got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{name}: labels must be integers, got non-integer floats")
    elif y.dtype.kind not in "iub":
        raise TypeError(f"{name}: expected integer or boolean labels, got dtype {y.dtype}")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"{name}: {y.shape[0]} labels for {n} items; the counts must match")
    if y.ndim == 2:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError(f"{name}: multi-hot labels must hold only 0 and 1")
        return y.astype(bool)
    return y.astype(np.int64)


def check_label_pair(query_labels, gallery_labels, *, names=("labels", "gallery labels")):
    """Check that query and gallery labels are of one kind (and one class count)."""
    q, g = query_labels, gallery_labels
    if q.ndim != g.ndim:
        raise ValueError(f"{names[0]} and {names[1]}: one is single-label and the other multi-label")
    if q.ndim == 2 and q.shape[1] != g.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]}: {q.shape[1]} classes against {g.shape[1]}")


def label_keys(labels: np.ndarray) -> tuple[np.ndarray, bool]:
    """Kernel keys of checked labels: ``(keys (N, W) int64, multi)``."""
    if labels.ndim == 1:
        return labels.astype(np.int64).reshape(-1, 1), False
    n, c = labels.shape
    words = max(1, -(-c // 64))
    padded = np.zeros((n, words * 64), dtype=bool)
    padded[:, :c] = labels
    packed = np.packbits(padded, axis=1, bitorder="little")  # (N, 8 W) uint8
    return np.ascontiguousarray(packed).view(np.int64).reshape(n, words), True


@numba.njit(inline="always", cache=True)
def same_label(keys_a, keys_b, multi):
    """True when two key rows (``(W,)`` int64) are relevant to each other."""
    if not multi:
        return keys_a[0] == keys_b[0]
    for w in range(keys_a.shape[0]):
        if keys_a[w] & keys_b[w]:
            return True
    return False


def relevance(query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """Dense ``(n_queries, n_gallery)`` bool matrix of the relation; for small inputs and tests."""
    if query_labels.ndim == 1:
        return query_labels[:, None] == gallery_labels[None, :]
    return (query_labels.astype(np.int64) @ gallery_labels.astype(np.int64).T) > 0


def non_relevant_counts(query_labels: np.ndarray, gallery_labels: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """``(n_queries,)`` int64: how many gallery items are not relevant to each query (checked labels)."""
    m = len(gallery_labels)
    if query_labels.ndim == 1:
        classes, counts = np.unique(gallery_labels, return_counts=True)
        at = np.minimum(np.searchsorted(classes, query_labels), len(classes) - 1)
        return m - np.where(classes[at] == query_labels, counts[at], 0)
    return np.concatenate([m - relevance(query_labels[i:i + chunk], gallery_labels).sum(axis=1)
                           for i in range(0, len(query_labels), chunk)]).astype(np.int64)


def check_top_k(k: int, query_labels: np.ndarray, gallery_labels: np.ndarray) -> int:
    """Refuse a ``k`` larger than some query's number of non-relevant gallery items.

    Such a query has a relevant item among its k nearest whatever the input, so
    its Recall@k is 1 at every radius: a certificate of infinite radius that says
    nothing about the model.
    """
    counts = non_relevant_counts(query_labels, gallery_labels)
    short = np.flatnonzero(counts < k)
    if short.size:
        i = int(short[0])
        raise ValueError(f"k: expected at most {int(counts.min())}, the fewest non-relevant gallery items of a query "
                         f"(query {i} has {int(counts[i])}, {short.size} queries have fewer than {k}); "
                         f"Recall@{k} is 1 for them whatever the input")
    return int(k)
