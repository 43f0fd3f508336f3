"""Collapse diagnostics of a metric-learning model: hardness, collapseness, spread, separability.

Adversarial training of a triplet model can *collapse*: every embedding shrinks onto a
point and the classes become inseparable (COLO-TRIDE, REFERENCE §3). These NumPy
functions measure that state on embeddings; minrr's training logs them every epoch.
Distances are Euclidean on the given (normally l2-normalised) embeddings.

* hardness of a triplet (a, p, n): ``H = d(a, p) - d(a, n)``; H > 0 is a wrongly ordered
  triplet;
* collapseness: ``C = D_ap - D_an`` with ``D_ap = sum_i w_i d_ap_i / sum_i w_i``,
  ``w_i = exp(lambda (d_ap_i - max_j d_ap_j))``, and ``D_an`` likewise; C > 0 signals a
  collapsing batch. ``lambda -> 0`` gives the mean hardness, ``lambda -> inf`` gives
  ``max d_ap - max d_an``;
* mean pairwise distance over all pairs i != j (shrinks to 0 on collapse);
* separability: ``(mean d_an - mean d_ap) / mean pairwise distance``, the mean over all
  different-label pairs minus the mean over all same-label pairs, relative to the spread
  (near 0 when the classes are entangled).
"""

from __future__ import annotations

import numpy as np

__all__ = ["hardness", "soft_max_mean", "collapseness", "triplet_distances", "random_triplets",
           "mean_pairwise_distance", "separability", "embedding_diagnostics"]

_BLOCK = 1024


def hardness(d_ap, d_an) -> np.ndarray:
    """H = d(a, p) - d(a, n) of each triplet; (T,) arrays in, (T,) out."""
    return np.asarray(d_ap, dtype=np.float64) - np.asarray(d_an, dtype=np.float64)


def soft_max_mean(d, lam: float) -> float:
    """``sum_i w_i d_i / sum_i w_i`` with ``w_i = exp(lambda (d_i - max_j d_j))`` (COLO-TRIDE's D_ap, D_an).

    lam : lambda >= 0, the attention factor; 0 gives the plain mean.
    """
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError(f"d: expected a non-empty (T,) array of distances, got shape {d.shape}")
    if not (np.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam: expected a finite number >= 0, got {lam}")
    w = np.exp(lam * (d - d.max()))
    return float(w @ d / w.sum())


def collapseness(d_ap, d_an, lam: float) -> float:
    """C = D_ap - D_an of a batch of triplets (see :func:`soft_max_mean`); C > 0: collapsing."""
    return soft_max_mean(d_ap, lam) - soft_max_mean(d_an, lam)


def triplet_distances(embeddings, triplets) -> tuple[np.ndarray, np.ndarray]:
    """(d(a, p), d(a, n)) of (T, 3) index triplets (a, p, n) into (N, dim) embeddings."""
    e = np.asarray(embeddings, dtype=np.float64)
    t = np.asarray(triplets)
    if t.ndim != 2 or t.shape[1] != 3:
        raise ValueError(f"triplets: expected (T, 3) indices (anchor, positive, negative), got shape {t.shape}")
    a, p, n = e[t[:, 0]], e[t[:, 1]], e[t[:, 2]]
    return np.linalg.norm(a - p, axis=1), np.linalg.norm(a - n, axis=1)


def random_triplets(labels, rng) -> np.ndarray:
    """(T, 3) triplets: every item with another item of its label as anchor, with a random
    positive (same label, not itself) and a random negative (another label), from ``rng``."""
    labels = np.asarray(labels)
    rows = []
    for a in range(len(labels)):
        positives = np.flatnonzero(labels == labels[a])
        positives = positives[positives != a]
        negatives = np.flatnonzero(labels != labels[a])
        if len(positives) and len(negatives):
            rows.append((a, rng.choice(positives), rng.choice(negatives)))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def _pair_sums(e: np.ndarray, labels: np.ndarray) -> tuple[float, int, float, int]:
    """Sums and counts of distances over same-label and different-label pairs i != j, by blocks."""
    same_sum = diff_sum = 0.0
    same_count = diff_count = 0
    sq = np.einsum("ij,ij->i", e, e)
    for lo in range(0, len(e), _BLOCK):
        block = e[lo:lo + _BLOCK]
        d = np.sqrt(np.maximum(sq[lo:lo + _BLOCK, None] + sq[None] - 2.0 * block @ e.T, 0.0))
        same = labels[lo:lo + _BLOCK, None] == labels[None]
        rows = np.arange(lo, lo + len(block))
        same[rows - lo, rows] = False  # leave out i == j
        different = labels[lo:lo + _BLOCK, None] != labels[None]
        same_sum += float(d[same].sum())
        same_count += int(same.sum())
        diff_sum += float(d[different].sum())
        diff_count += int(different.sum())
    return same_sum, same_count, diff_sum, diff_count


def _check(embeddings, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """(N, dim) float64 embeddings, N >= 2, and (N,) labels (all 0 when None)."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or len(e) < 2:
        raise ValueError(f"embeddings: expected (N, dim) with N >= 2, got shape {e.shape}")
    y = np.zeros(len(e), dtype=np.int64) if labels is None else np.asarray(labels)
    if y.shape != (len(e),):
        raise ValueError(f"labels: expected ({len(e)},) labels, got shape {y.shape}")
    return e, y


def mean_pairwise_distance(embeddings) -> float:
    """Mean Euclidean distance over all pairs i != j of (N, dim) embeddings."""
    e, no_labels = _check(embeddings)
    same_sum, same_count, _, _ = _pair_sums(e, no_labels)
    return same_sum / same_count


def separability(embeddings, labels) -> float:
    """``(mean d_an - mean d_ap) / mean pairwise distance`` over all pairs of (N, dim) embeddings.

    d_ap: same-label pairs, d_an: different-label pairs; 0 when every embedding is the same.
    """
    e, y = _check(embeddings, labels)
    same_sum, same_count, diff_sum, diff_count = _pair_sums(e, y)
    if same_count == 0 or diff_count == 0:
        raise ValueError("labels: expected at least two items of one label and two labels")
    spread = (same_sum + diff_sum) / (same_count + diff_count)
    if spread == 0:
        return 0.0
    return (diff_sum / diff_count - same_sum / same_count) / spread


def embedding_diagnostics(embeddings, labels, triplets, lam: float) -> dict[str, float]:
    """Hardness (mean H), collapseness C (with ``lam``), mean pairwise distance and separability
    of (N, dim) embeddings, the first two over the (T, 3) ``triplets``."""
    d_ap, d_an = triplet_distances(embeddings, triplets)
    return {"hardness": float(hardness(d_ap, d_an).mean()), "collapseness": collapseness(d_ap, d_an, lam),
            "mean_pairwise_distance": mean_pairwise_distance(embeddings),
            "separability": separability(embeddings, labels)}
