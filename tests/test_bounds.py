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

from minrr.certify import bounds
from minrr.certify import error_bound
from minrr.certify.smoothing import from_samples

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


def _quadratic_root(n, log_term, f, variance):
    """The t solving n t^2 = L (2 v + 4 F t / 3), by the quadratic formula (not the code's c + sqrt(c^2 + ...))."""
    b = 4.0 * f * log_term / 3.0
    return (b + np.sqrt(b * b + 8.0 * n * variance * log_term)) / (2.0 * n)


def test_each_bound_pinned_to_an_independent_value():
    """n = 500, delta = 0.01, F = 2, dim = 7, v = 0.8; the values were computed from REFERENCE section 1's
    formulas in a separate script (scipy's brentq for the variance-adaptive v_bar)."""
    n, delta, f = 500, 0.01, 2.0
    assert bounds.hoeffding(n, delta, f) == pytest.approx(0.3608883360765961, rel=1e-12)
    assert bounds.bernstein(n, delta, f, 0.8) == pytest.approx(0.14510304175030786, rel=1e-12)
    assert bounds.bernstein(n, delta, f) == pytest.approx(0.3056296218892529, rel=1e-12)  # v = F^2
    assert bounds.matrix_bernstein(n, delta, f, 7, 0.8) == pytest.approx(0.16516371412694633, rel=1e-12)
    assert bounds.paper_eps(5000, 0.01, f, 7) == pytest.approx(0.13121712155589305, rel=1e-12)
    # Maurer-Pontil: squared norms with mean 2.5 and variance 0.3 (range F^2 = 4).
    assert bounds.second_moment_upper(n, delta, f, 2.5, 0.3) == pytest.approx(2.678837072195553, rel=1e-12)
    # Variance-adaptive, ||g_hat|| = 1.5: with E||h||^2 <= F^2 (v_bar = 2.4143) and with Maurer-Pontil at
    # delta / 2 (S = min(F^2, 2.697), v_bar = 0.9143, the bound itself at delta / 2).
    assert bounds.empirical_bernstein(n, delta, f, [1.5], second_moment=4.0)[0] == pytest.approx(
        0.2407729153178224, rel=1e-9)
    assert bounds.empirical_bernstein(n, delta, f, [1.5], sq_norm_mean=[2.5], sq_norm_var=[0.3])[0] == pytest.approx(
        0.16486078364369117, rel=1e-9)
    for log_term, v in ((np.log(2 / delta), 0.8), (np.log(8 / delta), 0.8), (np.log(2 / delta), 4.0)):
        assert bounds._bernstein_eps(n, log_term, f, v) == pytest.approx(_quadratic_root(n, log_term, f, v), rel=1e-12)


def test_constant_norm_draws_bound_the_second_moment_by_f_squared():
    """Issue 14, fix 4: draws that all have norm 0.5 under F = 1 say nothing about E||h||^2 beyond F^2.

    +-0.5 e1 in equal numbers: g_hat = 0, so v_bar = F^2 and eps is Bernstein's worst case (the old code
    took 0.25, the largest squared norm seen).
    """
    x = np.zeros((2, 50, 3))
    x[:, :, 0] = 0.5 * np.repeat([1.0, -1.0], 25)
    est = from_samples(x)
    assert np.all(est.constant_norm())
    want = _quadratic_root(50, np.log(2 / 0.01), 1.0, 1.0)
    np.testing.assert_allclose(error_bound(est, "empirical-bernstein", 0.01, 1.0), want, rtol=1e-9)


@pytest.mark.parametrize("case", [_two_point, _nearly_constant], ids=["two_point", "nearly_constant"])
@pytest.mark.parametrize("bound", ["empirical-bernstein", "bernstein"])
def test_coverage_at_small_delta_sees_a_factor_two(case, bound):
    """At delta = 0.01 with 6,000 trials the check holds, and half the bound fails it (two-point case)."""
    trials, delta = 6000, 0.01
    rng = np.random.default_rng(zlib.crc32(f"{case.__name__}{bound}small".encode()))
    x, mean = case(rng, trials, N, 4)
    est = from_samples(x)
    eps = error_bound(est, bound, delta, F)
    err = np.linalg.norm(est.mean - mean, axis=1)
    allowance = binom.ppf(1 - 1e-6, trials, delta)
    assert np.sum(err > eps) <= allowance
    if case is _two_point:
        assert np.sum(err > eps / 2) > allowance
