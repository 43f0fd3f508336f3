"""CSQ hash centres: one +-1 code of K bits per class, far apart in Hamming distance.

Central Similarity Quantization (Yuan et al., CVPR 2020) trains a hashing
network to put each image's code near its class centre. The centres are
(REFERENCE §2):

* Hadamard: when K is a power of two and C <= 2K, the first C rows of
  ``[H; -H]`` with H the Sylvester Hadamard matrix of order K. Any two rows of
  H are at Hamming distance exactly K/2, and a row and its negation at K.
* random: otherwise, C independent balanced codes (exactly floor(K/2) bits
  set to -1, positions uniform), from ``seed``.

A multi-label item's centre is the sign of the sum of its classes' centres,
with each tied bit taken from one fixed random +-1 vector (from ``seed``).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import hadamard

from .labels import check_labels

__all__ = ["hash_centers", "multilabel_centers", "is_hadamard_case"]


def _count(value, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name}: expected a whole number >= 1, got {value!r}")
    return int(value)


def is_hadamard_case(n_classes: int, n_bits: int) -> bool:
    """True when CSQ uses Hadamard rows: K a power of two and C <= 2K."""
    return n_bits & (n_bits - 1) == 0 and n_classes <= 2 * n_bits


def hash_centers(n_classes: int, n_bits: int, *, seed: int = 0) -> np.ndarray:
    """CSQ centres of C classes with K bits.

    Returns
    -------
    (C, K) int8 with values +-1; row c is the centre of class c.
    """
    n_classes = _count(n_classes, "n_classes")
    n_bits = _count(n_bits, "n_bits")
    if is_hadamard_case(n_classes, n_bits):
        h = hadamard(n_bits, dtype=np.int8)
        return np.concatenate([h, -h])[:n_classes]
    rng = np.random.default_rng(seed)
    negatives = np.argsort(rng.random((n_classes, n_bits)), axis=1)[:, : n_bits // 2]
    centers = np.ones((n_classes, n_bits), dtype=np.int8)
    np.put_along_axis(centers, negatives, -1, axis=1)
    return centers


def multilabel_centers(labels, centers, *, seed: int = 0) -> np.ndarray:
    """Centres of multi-label items: ``sign(sum of their classes' centres)``.

    Parameters
    ----------
    labels : (N, C) multi-hot 0/1.
    centers : (C, K) +-1 class centres, from :func:`hash_centers`.
    seed : seed of the fixed +-1 vector that breaks ties (a bit summing to 0).

    Returns
    -------
    (N, K) int8 with values +-1.
    """
    y = check_labels(labels, name="labels")
    if y.ndim != 2:
        raise ValueError(f"labels: expected (N, C) multi-hot labels, got shape {y.shape}")
    c = np.asarray(centers)
    if c.ndim != 2 or c.shape[0] != y.shape[1] or not np.all(np.abs(c) == 1):
        raise ValueError(f"centers: expected ({y.shape[1]}, K) values +-1, got shape {c.shape}")
    tie_breaker = np.where(np.random.default_rng(seed).random(c.shape[1]) < 0.5, -1, 1).astype(np.int8)
    total = y.astype(np.int64) @ c.astype(np.int64)
    return np.where(total > 0, 1, np.where(total < 0, -1, tie_breaker)).astype(np.int8)
