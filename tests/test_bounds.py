"""Coverage of every concentration bound, and the reference's numbers.

Each bound claims P(||g_hat - g|| > eps) <= delta. Over many simulated draws
of bounded vectors with a known mean, the share of failures must stay within
a binomial allowance of delta. The hard cases are the ones where a wrong
bound shows: two-point distributions (maximal variance), points on a sphere,
nearly constant draws (variance close to 0, where the variance-adaptive bound
is smallest), and norms that vary (the Maurer-Pontil path).
"""

import zlib

import numpy as np
import pytest
from scipy.stats import binom

from minrr import bounds
from minrr.certify import error_bound
from minrr.smoothing import from_samples

TRIALS = 2000
N = 200
F = 1.0


def _two_point(rng, trials, n, dim):
    """+-F e_1 with probability 1/2 each: mean 0, variance F^2."""
    signs = rng.choice([-1.0, 1.0], size=(trials, n))
    x = np.zeros((trials, n, dim))
    x[..., 0] = F * signs
    return x, np.zeros(dim)


def _sphere(rng, trials, n, dim):
    """Uniform on the sphere of radius F: mean 0."""
    x = rng.normal(size=(trials, n, dim))
    return F * x / np.linalg.norm(x, axis=2, keepdims=True), np.zeros(dim)


def _nearly_constant(rng, trials, n, dim):
    """F u with probability 0.99, F w otherwise (w = -u): variance about 0.04 F^2."""
    u = np.zeros(dim)
    u[0] = F
    rare = rng.random((trials, n)) < 0.01
    x = np.where(rare[..., None], -u, u)
    return x, u * (1 - 2 * 0.01)


def _skewed_two_point(rng, trials, n, dim):
    """F u with probability 0.9, F w with w orthogonal to u: constant norm, small variance."""
    u, w = np.zeros(dim), np.zeros(dim)
    u[0], w[1] = F, F
    rare = rng.random((trials, n)) < 0.1
    return np.where(rare[..., None], w, u), 0.9 * u + 0.1 * w


def _ball(rng, trials, n, dim):
    """Radius uniform in [0, F] times a uniform direction: mean 0, norms vary."""
    x, _ = _sphere(rng, trials, n, dim)
    return x * rng.random((trials, n, 1)), np.zeros(dim)


def _ball_shifted(rng, trials, n, dim):
    """Radius uniform in [0.8 F, F] along a fixed direction, plus a sign flip with probability 0.05."""
    u = np.zeros(dim)
    u[0] = 1.0
    r = F * (0.8 + 0.2 * rng.random((trials, n)))
    sign = np.where(rng.random((trials, n)) < 0.05, -1.0, 1.0)
    return (r * sign)[..., None] * u, u * F * 0.9 * (1 - 2 * 0.05)


CASES = [_two_point, _sphere, _nearly_constant, _skewed_two_point, _ball, _ball_shifted]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.strip("_"))
@pytest.mark.parametrize("bound", ["empirical-bernstein", "bernstein", "matrix-bernstein", "hoeffding"])
@pytest.mark.parametrize("delta", [0.05, 0.3])
def test_bound_covers_the_mean(case, bound, delta):
    rng = np.random.default_rng(zlib.crc32(f"{case.__name__}{bound}{delta}".encode()))
    x, mean = case(rng, TRIALS, N, 4)
    est = from_samples(x)
    eps = error_bound(est, bound, delta, F)
    failures = int(np.sum(np.linalg.norm(est.mean - mean, axis=1) > eps))
    allowance = binom.ppf(1 - 1e-6, TRIALS, delta)
    assert failures <= allowance, f"{failures} failures in {TRIALS} trials at delta = {delta}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.strip("_"))
def test_paper_eps_covers_its_share_of_alpha(case):
    """Each of the paper's four errors is bounded at alpha / 4 (n above its validity limit)."""
    alpha, dim = 0.8, 4
    n = bounds.paper_min_samples(alpha, dim)
    rng = np.random.default_rng(7)
    x, mean = case(rng, TRIALS, n, dim)
    err = np.linalg.norm(x.mean(axis=1) - mean, axis=1)
    failures = int(np.sum(err > bounds.paper_eps(n, alpha, F, dim)))
    assert failures <= binom.ppf(1 - 1e-6, TRIALS, alpha / 4)


def test_the_coverage_check_has_power():
    """A bound one third the size of Bernstein's fails the same check on the two-point case."""
    rng = np.random.default_rng(0)
    x, mean = _two_point(rng, TRIALS, N, 4)
    est = from_samples(x)
    eps = bounds.bernstein(N, 0.3, F) / 3
    failures = int(np.sum(np.linalg.norm(est.mean - mean, axis=1) > eps))
    assert failures > binom.ppf(1 - 1e-6, TRIALS, 0.3)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.strip("_"))
def test_variance_adaptive_bound_is_never_looser_than_bernstein(case):
    """With one norm throughout it holds at delta; with varying norms it splits delta in two."""
    est = from_samples(case(np.random.default_rng(1), 50, N, 4)[0])
    constant = est.constant_norm()
    worst = np.where(constant, bounds.bernstein(N, 0.01, F), bounds.bernstein(N, 0.005, F))
    assert np.all(error_bound(est, "empirical-bernstein", 0.01, F) <= worst + 1e-12)


def test_reference_sizes_of_the_margin_lost():
    """REFERENCE.md section 1: F = 1, alpha = 1e-3, k = 128."""
    a, k = 1e-3, 128
    assert 4 * bounds.paper_eps(1e4, a, 1.0, k) == pytest.approx(0.237, abs=5e-4)
    expected = {1e4: (0.079, 0.040, 0.019), 1e5: (0.025, 0.012, 0.006)}
    for n, sizes in expected.items():
        for v, size in zip((1.0, 0.25, 0.05), sizes):
            assert 2 * bounds.bernstein(n, a, 1.0, v) == pytest.approx(size, abs=6e-4)
    assert 4 * bounds.paper_eps(1e5, a, 1.0, k) == pytest.approx(0.075, abs=5e-4)


def test_bound_ordering_and_paper_validity_limit():
    n, delta = 5000, 1e-3
    assert bounds.bernstein(n, delta, 1.0) < bounds.matrix_bernstein(n, delta, 1.0, 128)
    assert bounds.bernstein(n, delta, 1.0, 0.1) < bounds.bernstein(n, delta, 1.0)
    # (32/3) ln(4 (k + 1) / alpha) at k = 128, alpha = 1e-3
    assert bounds.paper_min_samples(1e-3, 128) == int(np.ceil(32 / 3 * np.log(4 * 129 / 1e-3)))
