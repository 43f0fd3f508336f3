"""certify(): the certificate holds with the stated probability, and the plumbing around it."""

import numpy as np
import pytest
from scipy.special import ndtri
from scipy.stats import binom

from minrr.certify import bounds
from minrr.certify import certified_recall, certify, error_bound, summarize
from minrr.lda import fit_lda
from minrr.certify.margin import margins
from minrr.certify.smoothing import from_means, from_samples

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
                     alpha=0.01, bound="paper", certificate="retrievalguard")
    eps = np.sqrt(8 * np.log((3 + 1) / (0.01 / 4)) / (3 * 2000))
    floor = margins(draws.mean(axis=1), gallery, np.zeros(5, int), np.array([0, 1])).margin_floor
    np.testing.assert_allclose(result.margin_lower, floor - 4 * eps, rtol=1e-12)
    np.testing.assert_allclose(result.radius, 2 * 0.25 * ndtri(0.5 + np.maximum(floor - 4 * eps, 0) / 8), rtol=1e-12)
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


# Issue 14: composition of eps per gallery kind, coverage at a small alpha, the norm tolerance at its
# edges, and the five soundness fixes.

def _independent_margin_lower(q, gallery, q_labels, g_labels, eps_q, eps_g, exclude_self=False):
    """min over other-label items of (distance - eps_j) - min over same-label items of (distance + eps_j) - 2 eps_q."""
    out = []
    for i in range(len(q)):
        dist = np.linalg.norm(gallery - q[i], axis=1)
        keep = np.arange(len(gallery)) != i if exclude_self else np.ones(len(gallery), bool)
        same = keep & (g_labels == q_labels[i])
        other = keep & (g_labels != q_labels[i])
        out.append(np.min(dist[other] - eps_g[other]) - np.min(dist[same] + eps_g[same]) - 2 * eps_q)
    return np.array(out)


def test_eps_composition_of_each_gallery_kind():
    """Exact: eps_q at alpha. Monte-Carlo: eps_q at alpha / 2, each item at alpha / (2 M). Leave-one-out: the
    same with M - 1 other items. Hoeffding's eps (pinned in test_bounds) makes the expected values explicit."""
    rng = np.random.default_rng(8)
    n, alpha = 300, 0.01
    hoeff = lambda delta: (1 / np.sqrt(n)) * (1 + np.sqrt(2 * np.log(1 / delta)))  # noqa: E731
    centers = np.linalg.qr(rng.normal(size=(4, 4)))[0]
    labels = np.array([0, 0, 1, 1, 0, 1])
    draws = centers[labels][:, None] + 0.6 * rng.normal(size=(6, n, 4))
    draws /= np.linalg.norm(draws, axis=2, keepdims=True)
    means = draws.mean(axis=1)
    for certificate in ("retrievalguard", "halfspace"):
        kw = dict(sigma=0.5, alpha=alpha, bound="hoeffding", precision="float64", certificate=certificate)
        exact = certify(draws, labels, gallery=centers, gallery_labels=np.arange(4) % 2, **kw)
        want = _independent_margin_lower(means, centers, labels, np.arange(4) % 2, hoeff(alpha), np.zeros(4))
        np.testing.assert_allclose(exact.margin_lower, want, atol=1e-9)
        gallery = draws[[1, 2, 4, 5]]
        mc = certify(draws, labels, gallery=gallery, gallery_labels=labels[[1, 2, 4, 5]], **kw)
        want = _independent_margin_lower(means, means[[1, 2, 4, 5]], labels, labels[[1, 2, 4, 5]], hoeff(alpha / 2),
                                         np.full(4, hoeff(alpha / 8)))
        np.testing.assert_allclose(mc.margin_lower, want, atol=1e-7)  # queries 1, 2, 4, 5 are in the gallery:
        # at distance 0 the rounding allowance E of a squared distance costs sqrt(E), about 3e-8
        loo = certify(draws, labels, **kw)
        want = _independent_margin_lower(means, means, labels, labels, hoeff(alpha / 2), np.full(6, hoeff(alpha / 10)),
                                         exclude_self=True)
        np.testing.assert_allclose(loo.margin_lower, want, atol=1e-9)


@pytest.mark.parametrize("bound", ["empirical-bernstein", "bernstein"])
def test_margin_lower_bound_at_small_alpha_sees_a_factor_two(bound):
    """+-e1 draws (all the error on the gallery's line, v = F^2) at alpha = 0.01 and 4,000 trials: d_low never
    exceeds the true margin more than alpha allows; subtracting eps_q once instead of twice would."""
    rng = np.random.default_rng(21)
    trials, n, alpha = 4000, 400, 0.01
    e1 = np.eye(3)[0]
    draws = np.where(rng.random((trials, n, 1)) < 0.5, e1, -e1)
    gallery = np.stack([0.3 * e1, -0.5 * e1])  # g = 0: true margin 0.5 - 0.3
    result = certify(draws, np.zeros(trials, int), sigma=0.5, gallery=gallery, gallery_labels=np.array([0, 1]),
                     alpha=alpha, bound=bound, precision="float64", certificate="retrievalguard")
    allowance = binom.ppf(1 - 1e-6, trials, alpha)
    assert np.sum(result.margin_lower > 0.2) <= allowance
    eps_q = error_bound(from_samples(draws), bound, alpha, 1.0)
    assert np.sum(result.margin_lower + eps_q > 0.2) > allowance


@pytest.mark.parametrize("top, accepted", [(1 + 0.99e-4, True), (1 + 1.01e-4, False)])
def test_unit_norm_tolerance_at_its_edges(top, accepted):
    draws = np.zeros((2, 4, 3))
    draws[:, :, 0] = 1.0
    draws[0, 1, 0] = top
    draws[1, 2, 0] = 1 - 0.5e-4
    if accepted:
        result = certify(draws, np.array([0, 0]), sigma=1.0)
        assert result.settings["norm_bound"] == top  # F raised to cover the draws seen
    else:
        with pytest.raises(ValueError, match="norm_bound: required unless every embedding has norm 1 within 0.0001"):
            certify(draws, np.array([0, 0]), sigma=1.0)
    low = draws.copy()
    low[1, 2, 0] = 2 - top  # the same distance below 1
    if accepted:
        assert certify(low, np.array([0, 0]), sigma=1.0).settings["norm_bound"] == max(1.0, top)
    else:
        with pytest.raises(ValueError, match="norm_bound: required unless"):
            certify(low, np.array([0, 0]), sigma=1.0)


@pytest.mark.parametrize("factor, accepted", [(1 + 0.99e-4, True), (1 + 1.01e-4, False)])
def test_given_norm_bound_tolerance_at_its_edges(factor, accepted):
    draws = np.full((2, 4, 1), 1.5)
    draws[0, 0, 0] = 2.0 * factor
    if accepted:
        assert certify(draws, np.array([0, 0]), sigma=1.0, norm_bound=2.0).settings["norm_bound"] == 2.0 * factor
    else:
        with pytest.raises(ValueError, match="norm_bound: an embedding has norm 2.0002"):
            certify(draws, np.array([0, 0]), sigma=1.0, norm_bound=2.0)


@pytest.mark.parametrize("gallery_kind", ["monte-carlo", "leave-one-out"])
def test_paper_bound_refuses_galleries_of_estimates(gallery_kind):
    """Fix 1: the paper charges two gallery errors at the query's n, which does not cover estimated galleries."""
    rng = np.random.default_rng(0)
    draws, g = _two_point_draws(rng, 4, 2000, 0.6)
    gallery = None if gallery_kind == "leave-one-out" else _two_point_draws(rng, 2, 2000, 0.5)[0]
    labels = None if gallery is None else np.array([0, 1])
    with pytest.raises(ValueError, match="bound: 'paper' .* Monte-Carlo or leave-one-out gallery"):
        certify(draws, np.array([0, 0, 1, 1]), sigma=0.5, gallery=gallery, gallery_labels=labels, bound="paper",
                alpha=0.01)


def test_paper_bound_takes_the_rounding_off():
    """Fix 2: with the float32 GEMM, d_low of the paper never exceeds the exact margin of g_hat minus 4 eps."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(400, 16))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    near = base + 1e-3 * rng.normal(size=base.shape)  # tiny distances: float32 rounding is large against them
    far = base + 1e-3 * rng.normal(size=base.shape)
    gallery = np.concatenate([near, far])
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    labels = np.r_[np.arange(400), np.arange(400) + 400]
    n, alpha = 10**12, 1e-3
    result = certify(base, np.arange(400), n_samples=n, norm_bound=1.0, sigma=0.5, gallery=gallery,
                     gallery_labels=labels, bound="paper", alpha=alpha, certificate="retrievalguard")
    exact = margins(base, gallery, np.arange(400), labels, precision="float64").margin
    assert np.all(result.margin_lower <= exact - 4 * bounds.paper_eps(n, alpha, 1.0, 16))


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("certificate", ["halfspace", "retrievalguard"])
def test_tiny_and_huge_norms_are_rescaled(certificate, multi):
    """Fix 3: float32 under- and overflow. Norm 1e-25 must not certify a negative true margin (the products
    underflow to 0, and the smaller-norm item looks nearer); norm 1e20 must give the unit-scale certificate
    (certificates are scale-equivariant), not a 'no same-label item' error."""
    rng = np.random.default_rng(1)
    gallery = np.array([[1.0, 0.0], [0.0, 1.2]])  # same label has the smaller norm
    q = np.array([[0.2, 1.0]]) + 0.01 * rng.normal(size=(8, 2))  # nearer the other-label item: margin < 0
    q_labels, g_labels = (np.tile([1, 0], (8, 1)), np.eye(2, dtype=int)) if multi else (np.zeros(8, int), np.arange(2))
    kw = dict(sigma=0.5, gallery_labels=g_labels, n_samples=10**12, certificate=certificate)
    unit = certify(q, q_labels, gallery=gallery, norm_bound=1.3 * 1.1, **kw)
    assert np.all(unit.radius == 0) and np.all(unit.margin < 0)
    for scale in (1e-25, 1e20):
        scaled = certify(q * scale, q_labels, gallery=gallery * scale, norm_bound=1.3 * 1.1 * scale, **kw)
        np.testing.assert_allclose(scaled.margin / scale, unit.margin, rtol=1e-5)
        np.testing.assert_array_equal(scaled.radius, unit.radius)
    # A positive margin at both scales: the same radius.
    q_pos = np.array([[1.0, 0.3]]) + 0.01 * rng.normal(size=(8, 2))
    unit = certify(q_pos, q_labels, gallery=gallery, norm_bound=1.5, **kw)
    for scale in (1e-25, 1e20):
        scaled = certify(q_pos * scale, q_labels, gallery=gallery * scale, norm_bound=1.5 * scale, **kw)
        np.testing.assert_allclose(scaled.radius, unit.radius, rtol=1e-5)
        assert np.all(scaled.radius > 0)


def test_tsv_radius_is_never_rounded_up():
    """Fix 5: the TSV holds the radius in full, so the file (and a summary built from it) never exceeds it."""
    from minrr.cli.certify import TSV_COLUMNS, tsv_row

    rng = np.random.default_rng(3)
    draws, g = _two_point_draws(rng, 40, 3000, 0.8)
    gallery = np.stack([g + 0.3 * AXIS, g - 0.5 * AXIS])
    result = certify(draws, np.zeros(40, int), sigma=0.5, gallery=gallery, gallery_labels=np.array([0, 1]))
    for i in range(40):
        fields = dict(zip(TSV_COLUMNS, tsv_row(i, result, i).rstrip("\n").split("\t")))
        assert float(fields["radius"]) == result.radius[i]
        assert float(fields["margin_lower"]) == result.margin_lower[i]
        assert fields["certificate"] == "halfspace"
