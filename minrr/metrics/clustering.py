"""Clustering quality of embeddings: NMI between k-means clusters and the classes.

NMI(U, V) = I(U; V) / ((H(U) + H(V)) / 2), the *arithmetic* normalisation:
the default of scikit-learn's ``normalized_mutual_info_score``, which both
robrank (``metric_get_nmi``) and pytorch-metric-learning (AccuracyCalculator's
"NMI") call with default arguments. Their k-means is faiss's (random initial
centroids, 20 or 25 Lloyd iterations); minrr's is k-means++ by default, with
faiss's random start as an option, and both are seeded.
"""

from __future__ import annotations

import numpy as np

from minrr.io import as_float_array
from minrr.labels import check_labels

__all__ = ["normalized_mutual_info", "kmeans", "kmeans_nmi"]

_ASSIGN_BLOCK = 2**22  # entries of the (points x centroids) block held at once


def _partition(labels, name: str) -> tuple[np.ndarray, int]:
    """Cluster index of every item, ``(N,)`` int64 in [0, n_clusters), and n_clusters."""
    y = check_labels(labels, name=name)
    if y.ndim != 1:
        raise ValueError(f"{name}: expected one label per item (N,), got shape {y.shape}")
    if y.size == 0:
        raise ValueError(f"{name}: is empty")
    values, index = np.unique(y, return_inverse=True)
    return index.reshape(-1), len(values)


def _entropy(counts: np.ndarray, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(labels_true, labels_pred) -> float:
    """NMI with arithmetic normalisation, ``I(U; V) / ((H(U) + H(V)) / 2)``.

    Parameters
    ----------
    labels_true, labels_pred : (N,) int
        Two partitions of the same N items; only which items share a label matters.

    Returns
    -------
    float in [0, 1]
        1 for identical partitions up to renaming (two single-cluster
        partitions included, as in scikit-learn), 0 for independent ones.
    """
    u, n_u = _partition(labels_true, "labels_true")
    v, n_v = _partition(labels_pred, "labels_pred")
    if len(u) != len(v):
        raise ValueError(f"labels_pred: {len(v)} labels for the {len(u)} items of labels_true")
    n = len(u)
    h_u = _entropy(np.bincount(u), n)
    h_v = _entropy(np.bincount(v), n)
    if h_u == 0.0 and h_v == 0.0:
        return 1.0
    cells, joint = np.unique(u * n_v + v, return_counts=True)  # non-empty cells only
    p_uv = joint / n
    p_u = np.bincount(u)[cells // n_v] / n
    p_v = np.bincount(v)[cells % n_v] / n
    mutual = float((p_uv * (np.log(p_uv) - np.log(p_u) - np.log(p_v))).sum())
    return float(np.clip(mutual / ((h_u + h_v) / 2.0), 0.0, 1.0))  # clip: rounding only


def _squared_distances_to(x: np.ndarray, centroids: np.ndarray):
    """Yield ``(rows, d2)``: squared distances of blocks of points to every centroid."""
    c_sq = np.einsum("ij,ij->i", centroids, centroids)
    block = max(1, _ASSIGN_BLOCK // len(centroids))
    for start in range(0, len(x), block):
        rows = slice(start, min(start + block, len(x)))
        xb = x[rows]
        yield rows, np.einsum("ij,ij->i", xb, xb)[:, None] - 2.0 * (xb @ centroids.T) + c_sq[None, :]


def _assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every point (ties to the smaller index) and its squared distance."""
    labels = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x))
    for rows, d2 in _squared_distances_to(x, centroids):
        labels[rows] = np.argmin(d2, axis=1)
        dist[rows] = np.maximum(d2[np.arange(len(d2)), labels[rows]], 0.0)
    return labels, dist


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Arthur and Vassilvitskii's seeding: each new centroid is a point drawn with
    probability proportional to its squared distance to the nearest centroid so far."""
    chosen = [int(rng.integers(len(x)))]
    nearest = ((x - x[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = nearest.sum()
        pick = int(rng.choice(len(x), p=nearest / total)) if total > 0 else int(rng.integers(len(x)))
        chosen.append(pick)
        nearest = np.minimum(nearest, ((x - x[pick]) ** 2).sum(axis=1))
    return x[chosen].copy()


def kmeans(embeddings, n_clusters: int, *, seed: int = 0, n_iter: int = 20,
           init: str = "k-means++") -> np.ndarray:
    """Lloyd's k-means from a seeded start.

    Parameters
    ----------
    embeddings : (N, dim) float
    n_clusters : int
        k, between 1 and N.
    seed : int
        Seed of the initial centroids; equal seeds give equal clusters.
    n_iter : int
        At most this many Lloyd iterations; stops early once no point moves.
    init : {"k-means++", "random"}
        k-means++ seeding, or k distinct random points (faiss's start).
        k-means++ costs O(N k dim) once; each iteration costs the same, as a
        GEMM over blocks of points (memory ``O(2**22)`` floats).

    Returns
    -------
    (N,) int64
        Cluster of every point. A cluster left empty restarts at the point
        farthest from its centroid.
    """
    x = as_float_array(embeddings, name="embeddings", ndim=2)
    n = len(x)
    if not isinstance(n_clusters, (int, np.integer)) or not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters: expected a whole number between 1 and {n} (the number of points), "
                         f"got {n_clusters!r}")
    if not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise ValueError(f"n_iter: expected a whole number >= 1, got {n_iter!r}")
    rng = np.random.default_rng(seed)
    if init == "k-means++":
        centroids = _kmeans_plus_plus(x, n_clusters, rng)
    elif init == "random":
        centroids = x[rng.choice(n, size=n_clusters, replace=False)].copy()
    else:
        raise ValueError(f"init: expected 'k-means++' or 'random', got {init!r}")
    labels, dist = _assign(x, centroids)
    for _ in range(n_iter):
        sizes = np.bincount(labels, minlength=n_clusters)
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, x)
        filled = sizes > 0
        centroids[filled] = sums[filled] / sizes[filled, None]
        far_first = np.argsort(-dist, kind="stable")
        centroids[~filled] = x[far_first[: np.count_nonzero(~filled)]]
        new_labels, dist = _assign(x, centroids)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def kmeans_nmi(embeddings, labels, *, seed: int = 0, n_iter: int = 20, init: str = "k-means++") -> float:
    """NMI between the classes and k-means clusters with k = the number of classes.

    Parameters
    ----------
    embeddings : (N, dim) float
    labels : (N,) int
        Single-label classes (NMI is not defined here for multi-hot labels).
    seed, n_iter, init
        As for :func:`kmeans`.

    Returns
    -------
    float in [0, 1]
    """
    x = as_float_array(embeddings, name="embeddings", ndim=2)
    classes, n_classes = _partition(labels, "labels")
    if len(classes) != len(x):
        raise ValueError(f"labels: {len(classes)} labels for {len(x)} embeddings; the counts must match")
    clusters = kmeans(x, n_classes, seed=seed, n_iter=n_iter, init=init)
    return normalized_mutual_info(classes, clusters)
