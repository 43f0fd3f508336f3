"""Binomial models of Hamming distances between hash codes (UMCD, Lemma 1 and Theorem 1).

Under UMCD's Assumption 1 every class collapses to one code of K bits. When each bit
is balanced across the C classes (C/2 of them have +1, C/2 have -1), two distinct
classes differ at a bit with probability

    p = (C/2)^2 / binom(C, 2) = C / (2 (C - 1)),

independently across bits, so (REFERENCE §2):

* Lemma 1, inter-class distance: D(h_i, h_j) ~ Binomial(K, p), mean K p, variance
  K p (1 - p).
* Theorem 1, ideal untargeted attack: the attack sends h(x') to -h_i, so the distance
  to another class is K - D(h_i, h_j) ~ Binomial(K, 1 - p), approximately
  Normal(K (1 - p), K p (1 - p)). For K = 64 and large C the three-sigma interval is
  [20, 44].

The model is exact for an even C with bits balanced across classes (for odd C the most
balanced bit gives (C + 1) / (2 C) instead). Learned codes follow it only roughly, and
CSQ's Hadamard centres not at all: every pair of them sits at exactly K / 2.

:class:`HammingDistanceModel` is a frozen distribution in the manner of
``scipy.stats`` frozen objects: ``pmf``, ``cdf``, ``sf``, ``interval``, plus
``pvalue``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["KINDS", "APPROXIMATIONS", "bit_difference_probability", "HammingDistanceModel",
           "inter_class", "untargeted"]

KINDS = ("inter-class", "untargeted")
APPROXIMATIONS = ("binomial", "normal")
ALTERNATIVES = ("two-sided", "less", "greater")


def _whole(value, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected a whole number >= {minimum}, got {value!r}")
    return int(value)


def bit_difference_probability(n_classes: int) -> float:
    """Lemma 1's p = C / (2 (C - 1)): the chance that two distinct classes differ at a bit."""
    c = _whole(n_classes, "n_classes", 2)
    return c / (2 * (c - 1))


@dataclass(frozen=True)
class HammingDistanceModel:
    """Distribution of one Hamming distance D between K-bit codes.

    Parameters
    ----------
    n_bits : K, the code length.
    n_classes : C >= 2, the number of classes.
    kind : ``"inter-class"`` (Lemma 1, D ~ Binomial(K, p)) or ``"untargeted"`` (Theorem 1,
        D ~ Binomial(K, 1 - p)).
    approximation : ``"binomial"`` (exact under the model) or ``"normal"`` (the Normal with
        the same mean and variance, as Theorem 1 states it; needs C >= 3 so the variance
        is positive).

    With the Normal approximation ``pmf(d)`` is the mass the Normal puts on
    [d - 1/2, d + 1/2], and ``cdf``, ``sf`` and ``interval`` are those of the Normal itself.
    """

    n_bits: int
    n_classes: int
    kind: str = "inter-class"
    approximation: str = "binomial"

    def __post_init__(self):
        _whole(self.n_bits, "n_bits", 1)
        _whole(self.n_classes, "n_classes", 2)
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.approximation not in APPROXIMATIONS:
            raise ValueError(f"approximation: expected one of {', '.join(APPROXIMATIONS)}, "
                             f"got {self.approximation!r}")
        if self.approximation == "normal" and self.n_classes == 2:
            raise ValueError("n_classes: the normal approximation needs n_classes >= 3; with 2 classes "
                             "the distance is constant (variance 0)")

    @property
    def p(self) -> float:
        """Lemma 1's p = C / (2 (C - 1))."""
        return bit_difference_probability(self.n_classes)

    @property
    def q(self) -> float:
        """Probability that one bit differs: p (inter-class) or 1 - p (untargeted)."""
        return self.p if self.kind == "inter-class" else 1.0 - self.p

    @property
    def mean(self) -> float:
        """K q."""
        return self.n_bits * self.q

    @property
    def var(self) -> float:
        """K p (1 - p), the same for both kinds."""
        return self.n_bits * self.p * (1.0 - self.p)

    @property
    def std(self) -> float:
        return float(np.sqrt(self.var))

    def _binomial(self):
        return stats.binom(self.n_bits, self.q)

    def _normal(self):
        return stats.norm(self.mean, self.std)

    def pmf(self, d):
        """P(D = d) for integer distances ``d`` (array-like)."""
        d = np.asarray(d, dtype=float)
        if self.approximation == "binomial":
            return self._binomial().pmf(d)
        normal = self._normal()
        return np.where(d == np.round(d), normal.cdf(d + 0.5) - normal.cdf(d - 0.5), 0.0)

    def cdf(self, d):
        """P(D <= d)."""
        return (self._binomial() if self.approximation == "binomial" else self._normal()).cdf(d)

    def sf(self, d):
        """P(D > d) = 1 - cdf(d)."""
        return (self._binomial() if self.approximation == "binomial" else self._normal()).sf(d)

    def interval(self, confidence: float) -> tuple[float, float]:
        """Central interval holding at least ``confidence`` of the mass, as ``scipy.stats``.

        The Normal's is mean +- z std; ``confidence = 2 Phi(3) - 1`` gives the paper's
        three-sigma interval.
        """
        confidence = float(confidence)
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence: expected a number strictly between 0 and 1, got {confidence:g}")
        dist = self._binomial() if self.approximation == "binomial" else self._normal()
        low, high = dist.interval(confidence)
        return float(low), float(high)

    def pvalue(self, d, alternative: str = "two-sided"):
        """p-value of an observed distance ``d`` under the model.

        ``"greater"``: P(D >= d); ``"less"``: P(D <= d); ``"two-sided"``: twice the
        smaller of the two, at most 1.
        """
        if alternative not in ALTERNATIVES:
            raise ValueError(f"alternative: expected one of {', '.join(ALTERNATIVES)}, got {alternative!r}")
        d = np.asarray(d, dtype=float)
        less = self.cdf(d)
        if self.approximation == "binomial":
            greater = self._binomial().sf(np.ceil(d) - 1)
        else:
            greater = self._normal().sf(d)
        if alternative == "less":
            return less
        if alternative == "greater":
            return greater
        return np.minimum(1.0, 2.0 * np.minimum(less, greater))


def inter_class(n_bits: int, n_classes: int, approximation: str = "binomial") -> HammingDistanceModel:
    """Lemma 1: the distance between codes of two distinct classes, Binomial(K, p)."""
    return HammingDistanceModel(n_bits, n_classes, "inter-class", approximation)


def untargeted(n_bits: int, n_classes: int, approximation: str = "normal") -> HammingDistanceModel:
    """Theorem 1: the distance from an ideal untargeted attack to another class,
    Binomial(K, 1 - p), by default in its Normal form N(K (1 - p), K p (1 - p))."""
    return HammingDistanceModel(n_bits, n_classes, "untargeted", approximation)
