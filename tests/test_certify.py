"""certify(): the certificate holds with the stated probability, and the plumbing around it."""

import numpy as np
import pytest
from scipy.stats import binom

from minrr import bounds
from minrr.certify import certified_recall, certify, summarize
from minrr.lda import fit_lda
from minrr.margin import margins
from minrr.smoothing import from_means, from_samples

E1, E2 = np.eye(3)[0], np.eye(3)[1]
AXIS = (E1 - E2) / np.sqrt(2)


def _two_point_draws(rng, trials, n, p):
    """Unit-norm draws: e1 with probability p, e2 otherwise; g = p e1 + (1 - p) e2."""
    pick = rng.random((trials, n)) < p
    return np.where(pick[..., None], E1, E2), p * E1 + (1 - p) * E2


@pytest.mark.parametrize("bound", ["empirical-bernstein", "bernstein", "hoeffding", "paper"])
def test_margin_lower_bound_holds_with_probability_one_minus_alpha(bound):
    """Gallery items on the line of the Monte-Carlo error: every error turns into margin at rate 2."""
    rng = np.random.default_rng(3)
    trials, n, p, alpha = 1500, 400, 0.7, 0.3
    draws, g = _two_point_draws(rng, trials, n, p)
    gallery = np.stack([g + 0.3 * AXIS, g - 0.5 * AXIS])  # same label ahead, other label behind
    true_margin = 0.5 - 0.3
    result = certify(draws, np.zeros(trials, int), sigma=0.5, gallery=gallery,
                     gallery_labels=np.array([0, 1]), alpha=alpha, bound=bound, precision="float64")
    failures = int(np.sum(result.margin_lower > true_margin))
    assert failures <= binom.ppf(1 - 1e-6, trials, alpha)
    # The test has power: without the query's error taken off, about half the trials fail.
    assert np.sum(result.margin > true_margin) > binom.ppf(1 - 1e-6, trials, alpha)


def test_monte_carlo_gallery_certificate_holds():
    """Leave-one-out over estimated embeddings: the gallery's errors are taken off too."""
    rng = np.random.default_rng(5)
    trials, n, alpha = 400, 300, 0.3
    ps = np.array([0.7, 0.55, 0.9, 0.95])
    labels = np.array([0, 0, 1, 1])
    true_g = ps[:, None] * E1 + (1 - ps[:, None]) * E2
    true_margin = margins(true_g, true_g, labels, labels, exclude_self=True, precision="float64").margin
    failures = 0
    for _ in range(trials):
        draws = np.stack([_two_point_draws(rng, 1, n, p)[0][0] for p in ps])
        result = certify(draws, labels, sigma=1.0, alpha=alpha, precision="float64")
        failures += int(np.sum(result.margin_lower > true_margin))
    assert failures <= binom.ppf(1 - 1e-6, trials * len(ps), alpha)


def test_paper_mode_is_the_printed_formula_and_refuses_small_n():
    rng = np.random.default_rng(0)
    draws, g = _two_point_draws(rng, 5, 2000, 0.6)
    gallery = np.stack([g + 0.3 * AXIS, g - 0.5 * AXIS])
    result = certify(draws, np.zeros(5, int), sigma=0.25, gallery=gallery, gallery_labels=np.array([0, 1]),
                     alpha=0.01, bound="paper")
    eps = np.sqrt(8 * np.log((3 + 1) / (0.01 / 4)) / (3 * 2000))
    np.testing.assert_allclose(result.margin_lower, result.margin - 4 * eps, rtol=1e-12)
    need = bounds.paper_min_samples(0.01, 3)
    with pytest.raises(ValueError, match=f"n_samples: the paper's bound needs n >= {need}"):
        certify(draws[:, :need - 1], np.zeros(5, int), sigma=0.25, gallery=gallery,
                gallery_labels=np.array([0, 1]), alpha=0.01, bound="paper")


def test_default_bound_is_tighter_than_the_others():
    rng = np.random.default_rng(1)
    draws, g = _two_point_draws(rng, 20, 5000, 0.95)
    gallery = np.stack([g + 0.3 * AXIS, g - 0.5 * AXIS])
    lows = {b: certify(draws, np.zeros(20, int), sigma=0.25, gallery=gallery, gallery_labels=np.array([0, 1]),
                       bound=b).margin_lower for b in bounds.BOUNDS}
    for b in bounds.BOUNDS[1:]:
        assert np.all(lows["empirical-bernstein"] >= lows[b])


def test_means_input_equals_bernstein_with_worst_variance():
    rng = np.random.default_rng(2)
    draws, g = _two_point_draws(rng, 10, 1000, 0.8)
    gallery = np.stack([g + 0.3 * AXIS, g - 0.5 * AXIS])
    args = dict(sigma=0.5, gallery=gallery, gallery_labels=np.array([0, 1]))
    from_means_result = certify(draws.mean(axis=1), np.zeros(10, int), n_samples=1000, norm_bound=1.0, **args)
    bernstein_result = certify(draws, np.zeros(10, int), bound="bernstein", **args)
    np.testing.assert_allclose(from_means_result.margin_lower, bernstein_result.margin_lower, atol=1e-6)
    with pytest.raises(ValueError, match="norm_bound: required"):
        certify(draws.mean(axis=1), np.zeros(10, int), n_samples=1000, **args)


def test_certified_recall_curve_and_summary():
    rng = np.random.default_rng(4)
    draws, g = _two_point_draws(rng, 50, 3000, 0.8)
    gallery = np.stack([g + 0.3 * AXIS, g - 0.5 * AXIS, g + 2 * AXIS])
    result = certify(draws, np.r_[np.zeros(40, int), np.ones(10, int)], sigma=0.5, gallery=gallery,
                     gallery_labels=np.array([0, 1, 1]))
    radii = np.linspace(0, 1, 11)
    curve = certified_recall(result, radii)
    assert np.all(np.diff(curve) <= 0)
    assert curve[0] == pytest.approx(result.certified.mean())
    expected = [np.mean((result.margin_lower > 0) & (result.radius >= r)) for r in radii]
    np.testing.assert_allclose(curve, expected)
    summary = summarize(result, radii)
    assert summary["not_certified"] == pytest.approx(1 - curve[0])
    assert summary["clean_recall"] == pytest.approx(result.correct.mean())
    assert summary["settings"]["gallery"] == "exact" and summary["settings"]["n"] == 3000


def test_noise_streams_do_not_depend_on_batching_or_subset():
    rng = np.random.default_rng(0)
    x = rng.random((40, 20))
    model = fit_lda(x, np.arange(40) % 4)
    full = model.smoothed_estimate(x, 0.3, 500, seed=11, draws_per_batch=500)
    chunked = model.smoothed_estimate(x, 0.3, 500, seed=11, draws_per_batch=37)
    np.testing.assert_allclose(chunked.mean, full.mean, rtol=1e-12)
    np.testing.assert_allclose(chunked.sq_norm_var, full.sq_norm_var, atol=1e-12)
    other_seed = model.smoothed_estimate(x, 0.3, 500, seed=12)
    assert not np.allclose(other_seed.mean, full.mean)


def test_lda_samples_have_the_pixel_space_distribution():
    """Projected noise equals pixel noise in distribution: compare with an explicit pixel draw."""
    rng = np.random.default_rng(0)
    x = rng.random((30, 12))
    model = fit_lda(x, np.arange(30) % 3)
    sigma, n = 0.4, 20000
    projected = model.smoothed_estimate(x[:2], sigma, n, seed=1).mean
    pixels = x[:2, None, :] + sigma * rng.standard_normal((2, n, 12))
    direct = from_samples(np.stack([model.embed(p) for p in pixels])).mean
    np.testing.assert_allclose(projected, direct, atol=0.03)


@pytest.mark.parametrize("change, message", [
    (dict(alpha=1.5), "alpha: expected a number strictly between 0 and 1"),
    (dict(sigma=0.0), "sigma: expected a finite number above 0"),
    (dict(norm_bound=0.5), "norm_bound: an embedding has norm 1"),
    (dict(bound="chernoff"), "bound: expected one of"),
    (dict(gallery=np.zeros((0, 3))), "gallery: is empty"),
    (dict(gallery_labels=np.array([1, 1])), "query_labels: query 0 has no same-label item"),
    (dict(gallery_labels=np.array([0, 1, 1])), "gallery_labels: 3 labels for 2 items"),
    (dict(gallery=np.full((2, 3), np.nan)), "gallery: contains NaN"),
])
def test_bad_input_names_the_argument(change, message):
    rng = np.random.default_rng(0)
    draws, g = _two_point_draws(rng, 3, 100, 0.5)
    args = dict(sigma=0.5, gallery=np.stack([g, -g]), gallery_labels=np.array([0, 1]))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        certify(draws, np.zeros(3, int), **args)


def test_unit_norm_inference_needs_unit_norms():
    draws = np.full((2, 10, 3), 0.5)
    with pytest.raises(ValueError, match="norm_bound: required unless every embedding has norm 1"):
        certify(draws, np.array([0, 0]), sigma=1.0)
    result = certify(draws, np.array([0, 0]), sigma=1.0, norm_bound=1.0)
    assert result.settings["norm_bound"] == 1.0 and result.settings["gallery"] == "leave-one-out"


def test_from_means_validates_sample_count():
    with pytest.raises(ValueError, match="samples"):
        from_means(np.zeros((2, 3)), 1)
