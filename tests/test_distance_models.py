"""Lemma 1 and Theorem 1 against simulated codes, and the frozen-distribution interface."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from minrr.hashing import distance_models as dm
from minrr.hashing.detect import THREE_SIGMA
from minrr.hashing.hash_centers import hash_centers

TRIALS = 2000
# Dvoretzky-Kiefer-Wolfowitz: sup |F_n - F| exceeds this with probability below 1e-6.
DKW_EPS = np.sqrt(np.log(2 / 1e-6) / (2 * TRIALS))


def balanced_codebooks(n_classes, n_bits, trials, rng):
    """``trials`` independent codebooks of Lemma 1: every bit has C/2 classes at +1, C/2 at -1."""
    column = np.repeat(np.array([1, -1], dtype=np.int8), n_classes // 2)
    return rng.permuted(np.broadcast_to(column, (trials, n_bits, n_classes)), axis=2).transpose(0, 2, 1)


def assert_distribution(samples, model):
    """Empirical CDF within the DKW band of the model's, and the mean within 5 standard errors."""
    support = np.arange(model.n_bits + 1)
    empirical = np.searchsorted(np.sort(samples), support, side="right") / len(samples)
    assert np.max(np.abs(empirical - model.cdf(support))) < DKW_EPS
    assert abs(samples.mean() - model.mean) <= 5 * np.sqrt(model.var / len(samples)) + 1e-12


@given(n_bits=st.integers(4, 96), half_classes=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_lemma_1_inter_class_distance_is_binomial(n_bits, half_classes, seed):
    n_classes = 2 * half_classes
    books = balanced_codebooks(n_classes, n_bits, TRIALS, np.random.default_rng(seed))
    distances = np.count_nonzero(books[:, 0] != books[:, 1], axis=1)
    assert_distribution(distances, dm.inter_class(n_bits, n_classes))


@given(n_bits=st.integers(4, 96), half_classes=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_theorem_1_untargeted_distance_is_binomial_one_minus_p(n_bits, half_classes, seed):
    n_classes = 2 * half_classes
    books = balanced_codebooks(n_classes, n_bits, TRIALS, np.random.default_rng(seed))
    attacked = -books[:, 0]  # the ideal untargeted attack: distance K from its own class
    distances = np.count_nonzero(attacked != books[:, 1], axis=1)
    assert_distribution(distances, dm.untargeted(n_bits, n_classes, approximation="binomial"))


def test_the_model_tells_apart_a_wrong_p():
    """The simulation check has power: p = 1/2 instead of C / (2 (C - 1)) fails it for C = 4."""
    books = balanced_codebooks(4, 64, TRIALS, np.random.default_rng(1))
    distances = np.count_nonzero(books[:, 0] != books[:, 1], axis=1)
    with pytest.raises(AssertionError):
        assert_distribution(distances, dm.inter_class(64, 10**6))


def test_hadamard_centres_do_not_follow_the_model():
    """CSQ's Hadamard centres sit at exactly K / 2 (or K): variance 0, not K p (1 - p)."""
    centres = hash_centers(16, 64).astype(int)
    distances = (64 - centres @ centres.T) // 2
    off_diagonal = distances[~np.eye(16, dtype=bool)]
    assert set(off_diagonal.tolist()) <= {32, 64}
    assert dm.inter_class(64, 16).var > 15


def test_paper_example_three_sigma_interval_is_20_to_44():
    model = dm.untargeted(64, 10**9)
    low, high = model.interval(THREE_SIGMA)
    assert (low, high) == pytest.approx((20.0, 44.0), abs=1e-6)
    assert model.mean == pytest.approx(32.0) and model.std == pytest.approx(4.0)


@pytest.mark.parametrize("n_classes", [2, 3, 10, 100])
def test_p_and_moments(n_classes):
    p = n_classes / (2 * (n_classes - 1))
    assert dm.bit_difference_probability(n_classes) == pytest.approx(p)
    inter, attack = dm.inter_class(48, n_classes), dm.untargeted(48, n_classes, approximation="binomial")
    assert inter.mean == pytest.approx(48 * p) and attack.mean == pytest.approx(48 * (1 - p))
    assert inter.var == attack.var == pytest.approx(48 * p * (1 - p))


@pytest.mark.parametrize("kind", dm.KINDS)
def test_binomial_form_matches_scipy(kind):
    model = dm.HammingDistanceModel(40, 6, kind)
    exact = stats.binom(40, model.q)
    d = np.arange(-1, 42)
    np.testing.assert_allclose(model.pmf(d), exact.pmf(d))
    np.testing.assert_allclose(model.cdf(d), exact.cdf(d))
    np.testing.assert_allclose(model.sf(d), exact.sf(d))
    assert model.pmf(np.arange(41)).sum() == pytest.approx(1.0)
    assert model.interval(0.9) == exact.interval(0.9)


def test_normal_form():
    model = dm.untargeted(64, 10)
    normal = stats.norm(model.mean, model.std)
    assert model.cdf(25.3) == pytest.approx(normal.cdf(25.3))
    assert model.pmf(30) == pytest.approx(normal.cdf(30.5) - normal.cdf(29.5))
    assert model.pmf(30.5) == 0.0
    assert model.pmf(np.arange(-200, 300)).sum() == pytest.approx(1.0)
    # Normal approximation of the binomial, within the usual continuity error
    exact = dm.untargeted(64, 10, approximation="binomial")
    assert np.max(np.abs(model.pmf(np.arange(65)) - exact.pmf(np.arange(65)))) < 0.01


@pytest.mark.parametrize("approximation", dm.APPROXIMATIONS)
def test_pvalues(approximation):
    model = dm.untargeted(64, 10, approximation=approximation)
    d = np.array([10.0, 28.0, 40.0])
    less, greater = model.pvalue(d, "less"), model.pvalue(d, "greater")
    np.testing.assert_allclose(less, model.cdf(d))
    if approximation == "binomial":
        np.testing.assert_allclose(greater, 1 - model.cdf(d - 1))
    else:
        np.testing.assert_allclose(greater, model.sf(d))
    np.testing.assert_allclose(model.pvalue(d), np.minimum(1, 2 * np.minimum(less, greater)))
    assert model.pvalue(10.0) < 1e-3 < model.pvalue(28.0)


@pytest.mark.parametrize("call, message", [
    (lambda: dm.inter_class(0, 10), "n_bits: expected a whole number >= 1"),
    (lambda: dm.inter_class(64, 1), "n_classes: expected a whole number >= 2"),
    (lambda: dm.inter_class(64, 2.5), "n_classes: expected a whole number"),
    (lambda: dm.untargeted(64, 2), "n_classes: the normal approximation needs n_classes >= 3"),
    (lambda: dm.HammingDistanceModel(64, 10, "targeted"), "kind: expected one of"),
    (lambda: dm.HammingDistanceModel(64, 10, approximation="poisson"), "approximation: expected one of"),
    (lambda: dm.inter_class(64, 10).interval(1.0), "confidence: expected a number strictly between"),
    (lambda: dm.inter_class(64, 10).pvalue(3, "both"), "alternative: expected one of"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
