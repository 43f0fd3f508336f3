"""CSQ hash centres: one +-1 code of K bits per class, far apart in Hamming distance.

Central Similarity Quantization (Yuan et al., CVPR 2020) trains a hashing
network to put each image's code near its class centre. The centres are
(REFERENCE §2):

* Hadamard: when K is a power of two and C <= 2K, the first C rows of
  ``[H; -H]`` with H the Sylvester Hadamard matrix of order K. Any two rows of
  H are at Hamming distance exactly K/2, and a row and its negation at K.
* random: otherwise, balanced codes (exactly floor(K/2) bits set to -1,
  positions uniform) drawn from ``seed`` one at a time, each kept only if it is
  at Hamming distance >= :func:`minimum_distance` (20 K / 64 rounded down to an
  even number: two balanced codes are always an even distance apart) from every
  centre kept before; the whole set is redrawn while its mean pairwise distance
  is below that of two independent balanced codes, ``2 floor(K/2) ceil(K/2) / K``
  (K/2 for even K). At K = 64 this is the rule of the CSQ reference code (min >= 20,
  mean >= 32). Checking each code as it is drawn, instead of redrawing the whole
  set until it passes, is what makes e.g. K = 16, C = 100 reachable. After
  ``MAX_DRAWS`` codes in all without a passing set, :func:`hash_centers` raises
  ValueError (too few bits for C).

A multi-label item's centre is the sign of the sum of its classes' centres,
with each tied bit taken from one fixed random +-1 vector (from ``seed``).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import hadamard

from ..labels import check_labels

__all__ = ["hash_centers", "multilabel_centers", "is_hadamard_case", "minimum_distance", "mean_distance",
           "MAX_DRAWS"]

MAX_DRAWS = 1_000_000
"""Most random codes :func:`hash_centers` draws (over all its attempts) before giving up."""
_BLOCK = 4096
_ATTEMPTS = 100


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
    least = minimum_distance(n_bits)
    drawn = 0
    for _ in range(_ATTEMPTS):
        centers, drawn = _far_apart(n_classes, n_bits, least, rng, drawn)
        if centers is None:
            break
        distance = (n_bits - centers.astype(np.int64) @ centers.T.astype(np.int64)) // 2
        if n_classes == 1 or distance[np.triu_indices(n_classes, 1)].mean() >= mean_distance(n_bits):
            return centers
    raise ValueError(f"n_classes: cannot draw {n_classes} balanced {n_bits}-bit centres at Hamming distance "
                     f">= {least} from each other (mean >= {mean_distance(n_bits):g}) in {MAX_DRAWS} draws; "
                     "use more bits")


def minimum_distance(n_bits: int) -> int:
    """The least Hamming distance between two random CSQ centres of K bits: ``20 K / 64`` rounded
    down to an even number, and at least 2 (20 at K = 64, 4 at K = 16)."""
    return max(2, 2 * (20 * n_bits // 128))


def mean_distance(n_bits: int) -> float:
    """The least mean pairwise distance of random CSQ centres: the expected distance of two
    independent balanced codes, ``2 floor(K/2) ceil(K/2) / K`` (K/2 for even K)."""
    return 2 * (n_bits // 2) * ((n_bits + 1) // 2) / n_bits


def _balanced(count: int, n_bits: int, rng) -> np.ndarray:
    """(count, K) int8 +-1 codes with exactly floor(K/2) bits -1, positions uniform."""
    negatives = np.argsort(rng.random((count, n_bits)), axis=1)[:, : n_bits // 2]
    codes = np.ones((count, n_bits), dtype=np.int8)
    np.put_along_axis(codes, negatives, -1, axis=1)
    return codes


def _far_apart(n_classes: int, n_bits: int, least: int, rng, drawn: int):
    """C codes, each at distance >= least from the earlier ones, drawn in order; (None, drawn) once
    ``MAX_DRAWS`` codes have been drawn in all."""
    kept = np.empty((0, n_bits), dtype=np.int64)
    while len(kept) < n_classes:
        if drawn >= MAX_DRAWS:
            return None, drawn
        block = _balanced(min(_BLOCK, MAX_DRAWS - drawn), n_bits, rng).astype(np.int64)
        far = ((n_bits - block @ kept.T) // 2 >= least).all(axis=1)
        for i in range(len(block)):
            if not far[i]:
                continue
            kept = np.vstack([kept, block[i]])
            if len(kept) == n_classes:
                drawn += i + 1
                break
            far[i + 1:] &= (n_bits - block[i + 1:] @ block[i]) // 2 >= least
        else:
            drawn += len(block)
    return kept.astype(np.int8), drawn


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
