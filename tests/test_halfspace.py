"""The halfspace certificate: hand-computed radii, a slow oracle, the theorems behind it, and validity.

* Pair radii pinned to values computed by hand (exact gallery, Monte-Carlo
  threshold shift, Recall@k) and to a slow float64 oracle on random galleries.
* The 1/sigma-Lipschitz property of Phi^-1(p) on models whose smoothing has a
  closed form.
* Dominance over RetrievalGuard's radius for the nearest e+.
* End to end: for a closed-form smoothed model in two input dimensions, no
  perturbation shorter than the certified radius (a dense fan of directions,
  and the worst direction of every binding pair) changes Recall@k.
* Coverage at a small alpha: the radius from Monte-Carlo estimates exceeds the
  exact one no more often than alpha allows, and a factor-2 error in eps shows.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import ndtr, ndtri
from scipy.stats import binom

from minrr.certify import bounds
from minrr.certify import certify
from minrr.certify.halfspace import halfspace_radii, ndtri as fast_ndtri, pair_radius
from minrr.labels import relevance
from minrr.certify.radius import certified_radius

seeds = st.integers(0, 2**32 - 1)


def oracle(q, eps, gallery, q_labels, g_labels, sigma, f, k=1, candidates=1, gallery_eps=None):
    """REFERENCE section 1b written out pair by pair in float64 (no rounding allowances)."""
    m = len(gallery)
    g_eps = np.zeros(m) if gallery_eps is None else gallery_eps
    rel = relevance(np.asarray(q_labels), np.asarray(g_labels))
    out = np.zeros(len(q))
    for i in range(len(q)):
        dist = np.linalg.norm(gallery - q[i], axis=1)
        same = np.flatnonzero(rel[i])
        others = np.flatnonzero(~rel[i])
        for plus in same[np.lexsort((same, dist[same]))][:candidates]:
            radii = []
            for minus in others:
                diff = gallery[minus] - gallery[plus]
                length = np.linalg.norm(diff)
                if length == 0:
                    radii.append(0.0)
                    continue
                shift = (g_eps[plus] + g_eps[minus]) * (2 * f + np.linalg.norm(gallery[plus])
                                                         + np.linalg.norm(gallery[minus])) / (2 * length)
                c = (gallery[minus] @ gallery[minus] - gallery[plus] @ gallery[plus]) / (2 * length) - shift
                t = (c + f) / (2 * f)
                p = min(1.0, (diff @ q[i] / length + eps[i] + f) / (2 * f))
                radii.append(np.inf if t >= 1 else max(0.0, sigma * (ndtri(t) - ndtri(p))))
            radii = np.sort(radii)
            out[i] = max(out[i], radii[k - 1] if len(radii) >= k else np.inf)
    return out


def test_pair_radius_by_hand():
    """q = (0.3, 0), e+ = (1, 0), e- = (-1, 0), F = 1, eps = 0.1, sigma = 0.5:
    u = (-1, 0), c = 0, t = 1/2, u.q = -0.3, p = (1 - 0.3 + 0.1) / 2 = 0.4, r = -0.5 Phi^-1(0.4)."""
    gallery = np.array([[1.0, 0.0], [-1.0, 0.0]])
    got = halfspace_radii(np.array([[0.3, 0.0]]), [0.1], gallery, [0], np.array([0, 1]), sigma=0.5,
                          norm_bound=1.0, precision="float64")
    assert got.radius[0] == pytest.approx(0.5 * 0.2533471031357997, rel=1e-12)
    assert got.positive[0] == 0
    # Gallery errors 0.01 and 0.02 shift c by 0.03 (2F + 1 + 1) / (2 * 2) = 0.03: t = 0.485.
    shifted = halfspace_radii(np.array([[0.3, 0.0]]), [0.1], gallery, [0], np.array([0, 1]), sigma=0.5,
                              norm_bound=1.0, gallery_eps=np.array([0.01, 0.02]), precision="float64")
    assert shifted.radius[0] == pytest.approx(0.5 * (ndtri(0.485) - ndtri(0.4)), rel=1e-12)
    # float32: the rounding is taken off, by a little.
    f32 = halfspace_radii(np.array([[0.3, 0.0]]), [0.1], gallery, [0], np.array([0, 1]), sigma=0.5, norm_bound=1.0)
    assert 0.5 * 0.2533471031357997 * (1 - 1e-5) < f32.radius[0] <= 0.5 * 0.2533471031357997


def test_recall_at_k_takes_the_kth_pair_and_t_above_one_is_infinite():
    """Items at -1, 0.5 e2 scaled: k = 2 takes the second smallest pair radius; a far item never binds."""
    q = np.array([[0.3, 0.0]])
    gallery = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.9], [-40.0, 0.0]])
    labels = np.array([0, 1, 1, 1])
    want = oracle(q, [0.05], gallery, [0], labels, 0.25, 1.0, k=2)
    got = halfspace_radii(q, [0.05], gallery, [0], labels, sigma=0.25, norm_bound=1.0, k=2, precision="float64")
    assert got.radius[0] == pytest.approx(want[0], rel=1e-12)
    # The far item has c = (1600 - 1) / 82 > F: t > 1, an infinite pair radius; with k = 3 it is the third.
    assert halfspace_radii(q, [0.05], gallery, [0], labels, sigma=0.25, norm_bound=40.0, k=3,
                           precision="float64").radius[0] < np.inf
    only_far = halfspace_radii(q, [0.05], gallery[[0, 3]], [0], np.array([0, 1]), sigma=0.25, norm_bound=1.0,
                               precision="float64")
    assert only_far.radius[0] == np.inf


def test_ndtri_matches_scipy_and_pair_radius_edges():
    ps = np.concatenate([np.logspace(-300, -1, 300), np.linspace(0.01, 0.99, 197), 1 - np.logspace(-16, -1, 100)])
    got = np.array([fast_ndtri(p) for p in ps])
    assert np.all(np.abs(got - ndtri(ps)) <= 4e-15 * (1 + np.abs(ndtri(ps))))
    assert fast_ndtri(0.0) == -np.inf and fast_ndtri(1.0) == np.inf and fast_ndtri(0.5) == 0.0
    assert pair_radius(1.0, 0.9, 1.0) == np.inf      # u.g < c holds everywhere
    assert pair_radius(0.4, 0.4, 1.0) == 0.0         # a tie is not certified
    assert pair_radius(0.6, 0.3, 2.0) == pytest.approx(2 * (ndtri(0.6) - ndtri(0.3)), rel=1e-13)
    assert pair_radius(0.6, 0.3, 2.0) < 2 * (ndtri(0.6) - ndtri(0.3))  # never rounded up


def _problem(rng, n, m, dim, classes, multi):
    gallery = rng.normal(size=(m, dim))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True) * rng.uniform(1, 1.5, (m, 1))
    q = rng.normal(size=(n, dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True) * rng.uniform(1, 3, (n, 1))
    if multi:
        g_labels = rng.random((m, classes)) < 0.4
        q_labels = rng.random((n, classes)) < 0.5
        g_labels[0, :] = q_labels.any(axis=0) | g_labels[0]  # every query has a relevant item
    else:
        g_labels = rng.integers(0, classes, m)
        q_labels = g_labels[rng.integers(0, m, n)]
    return q, gallery, q_labels, g_labels


@given(seed=seeds, m=st.integers(2, 30), dim=st.integers(1, 5), k=st.integers(1, 3), candidates=st.integers(1, 4),
       multi=st.booleans(), slacked=st.booleans(), block=st.integers(1, 5), chunk=st.integers(1, 9))
def test_radii_match_the_oracle(seed, m, dim, k, candidates, multi, slacked, block, chunk):
    """float64: equal to the oracle; float32: never above it, and close."""
    rng = np.random.default_rng(seed)
    q, gallery, q_labels, g_labels = _problem(rng, 5, m, dim, 3, multi)
    eps = rng.uniform(0, 0.05, 5)
    g_eps = rng.uniform(0, 0.02, m) if slacked else None
    want = oracle(q, eps, gallery, q_labels, g_labels, 0.5, 1.0, k, candidates, g_eps)
    kwargs = dict(sigma=0.5, norm_bound=1.0, k=k, candidates=candidates, gallery_eps=g_eps,
                  query_block=block, gallery_chunk=chunk)
    exact = halfspace_radii(q, eps, gallery, q_labels, g_labels, precision="float64", **kwargs)
    np.testing.assert_allclose(exact.radius, want, rtol=1e-9, atol=1e-12)
    assert np.all(exact.radius <= want)
    rounded = halfspace_radii(q, eps, gallery, q_labels, g_labels, **kwargs)
    assert np.all(rounded.radius <= want)
    np.testing.assert_allclose(rounded.radius, want, rtol=1e-3, atol=1e-4)


@given(seed=seeds, m=st.integers(2, 40), dim=st.integers(1, 6), k=st.integers(1, 3), multi=st.booleans(),
       sigma=st.floats(0.05, 2.0), f=st.floats(1.5, 4.0))
def test_dominates_retrievalguard(seed, m, dim, k, multi, sigma, f):
    """REFERENCE 1b: with the nearest e+ and the same eps, every pair radius is >= RetrievalGuard's radius."""
    rng = np.random.default_rng(seed)
    q, gallery, q_labels, g_labels = _problem(rng, 6, m, dim, 3, multi)
    eps = rng.uniform(0, 0.1, 6)
    got = halfspace_radii(q, eps, gallery, q_labels, g_labels, sigma=sigma, norm_bound=f, k=k, precision="float64")
    guard = certified_radius(got.margins.margin_floor - 2 * eps, sigma, f)
    assert np.all(got.radius >= guard * (1 - 1e-9) - 1e-12)


# h(x) = F sum_i a_i v_i sign(w_i.x - b_i) with unit w_i and sum a_i <= 1 has ||h|| <= F and the closed-form
# smoothing g(x) = F sum_i a_i v_i (2 Phi((w_i.x - b_i) / sigma) - 1).
def _smoothed(x, w, b, a, v, sigma, f):
    return f * ((2 * ndtr((x @ w.T - b) / sigma) - 1) * a) @ v


@given(seed=seeds, sigma=st.floats(0.05, 3.0), f=st.floats(0.2, 5.0), dim=st.integers(1, 6), parts=st.integers(1, 3),
       scale=st.floats(1e-2, 10.0))
def test_phi_inverse_of_the_projection_is_lipschitz(seed, sigma, f, dim, parts, scale):
    """Phi^-1((u.g + F) / 2F) moves by at most ||x - y|| / sigma; with one part and u = v it moves by exactly that."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(parts, dim))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    b = rng.normal(size=parts)
    a = rng.dirichlet(np.ones(parts)) * rng.uniform(0.5, 1.0)
    v = rng.normal(size=(parts, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    u = rng.normal(size=3)
    u /= np.linalg.norm(u)
    x = rng.normal(size=(40, dim)) * scale
    y = x + rng.normal(size=(40, dim)) * scale * rng.random((40, 1))
    with np.errstate(invalid="ignore"):  # inf - inf where Phi saturates; those pairs are left out
        gap = np.abs(ndtri((_smoothed(x, w, b, a, v, sigma, f) @ u + f) / (2 * f))
                     - ndtri((_smoothed(y, w, b, a, v, sigma, f) @ u + f) / (2 * f)))
        tight = np.abs(ndtri((_smoothed(x, w[:1], b[:1], np.ones(1), v[:1], sigma, f) @ v[0] + f) / (2 * f))
                       - ndtri((_smoothed(y, w[:1], b[:1], np.ones(1), v[:1], sigma, f) @ v[0] + f) / (2 * f)))
    finite = np.isfinite(gap)
    assert np.all(gap[finite] <= np.linalg.norm(x - y, axis=1)[finite] / sigma * (1 + 1e-7) + 1e-9)
    # Tight case (one part, u = v): p = Phi((w.x - b) / sigma) exactly, so the gap is |w.(x - y)| / sigma.
    ok = (np.abs(x @ w[0] - b[0]) < 5 * sigma) & (np.abs(y @ w[0] - b[0]) < 5 * sigma)  # Phi not saturated
    np.testing.assert_allclose(tight[ok], np.abs((x - y) @ w[0])[ok] / sigma, rtol=1e-6, atol=1e-9)


def _recall(g, gallery, q_label, g_labels, k):
    order = np.lexsort((np.arange(len(gallery)), np.linalg.norm(gallery - g, axis=1)))
    return bool(np.any(relevance(np.array([q_label]), g_labels[order[:k]])[0]))


@given(seed=seeds, k=st.integers(1, 2), parts=st.integers(1, 3), sigma=st.floats(0.2, 1.5),
       candidates=st.integers(1, 3))
def test_no_perturbation_inside_the_radius_changes_recall(seed, k, parts, sigma, candidates):
    """Closed-form g in two input dimensions; g_hat = g with a tiny eps; perturbations of 0.999 r and shorter."""
    rng = np.random.default_rng(seed)
    f = 1.0
    w = rng.normal(size=(parts, 2))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    b = rng.normal(size=parts) * 0.5
    a = rng.dirichlet(np.ones(parts))
    v = rng.normal(size=(parts, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    gallery = rng.normal(size=(12, 3)) * 0.6
    g_labels = rng.integers(0, 3, 12)
    x0 = rng.normal(size=2) * 0.5
    g0 = _smoothed(x0[None], w, b, a, v, sigma, f)
    q_label = g_labels[np.argmin(np.linalg.norm(gallery - g0, axis=1))]
    if not np.any(g_labels != q_label):
        return
    n = 10**14  # g_hat = g up to the bound's eps (about 4e-7)
    result = certify(g0, [q_label], sigma=sigma, gallery=gallery, gallery_labels=g_labels, n_samples=n,
                     norm_bound=f, bound="hoeffding", top_k=k, candidates=candidates)
    r = result.radius[0]
    if not 0 < r < np.inf:
        return
    # Directions: a fan of 720, and the worst direction of each pair's u.g (its gradient at x0).
    angles = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    directions = [np.stack([np.cos(angles), np.sin(angles)], axis=1)]
    density = f * (2 * np.exp(-0.5 * ((w @ x0 - b) / sigma) ** 2) / (np.sqrt(2 * np.pi) * sigma)) * a
    jacobian = (v.T * density) @ w  # (3, 2): d g / d x at x0
    for plus in np.flatnonzero(g_labels == q_label):
        for minus in np.flatnonzero(g_labels != q_label):
            grad = (gallery[minus] - gallery[plus]) @ jacobian
            if np.linalg.norm(grad) > 0:
                directions.append((grad / np.linalg.norm(grad))[None])
    directions = np.concatenate(directions)
    for frac in (0.25, 0.5, 0.75, 0.9, 0.999):
        moved = _smoothed(x0 + frac * r * directions, w, b, a, v, sigma, f)
        assert all(_recall(g, gallery, q_label, g_labels, k) for g in moved)


def _two_point(rng, trials, n, p):
    e1, e2 = np.eye(3)[0], np.eye(3)[1]
    pick = rng.random((trials, n)) < p
    return np.where(pick[..., None], e1, e2), p * e1 + (1 - p) * e2


@pytest.mark.parametrize("bound", ["empirical-bernstein", "bernstein"])
def test_coverage_at_small_alpha(bound):
    """The Monte-Carlo radius exceeds the exact-g radius (eps = 0) at most alpha of the time.

    Draws are +-e1 (v = F^2, g = 0) and the gallery lies on e1, so all the
    estimation error moves u.g_hat: a factor 2 in eps shows (with eps halved,
    the failures exceed the allowance).
    """
    rng = np.random.default_rng(11)
    trials, n, alpha, sigma = 4000, 400, 0.01, 0.5
    e1 = np.eye(3)[0]
    draws = np.where(rng.random((trials, n, 1)) < 0.5, e1, -e1)
    g = np.zeros(3)
    gallery = np.stack([g + 0.3 * e1, g - 0.5 * e1])
    labels = np.array([0, 1])
    result = certify(draws, np.zeros(trials, int), sigma=sigma, gallery=gallery, gallery_labels=labels, alpha=alpha,
                     bound=bound, precision="float64", candidates=1)
    truth = halfspace_radii(g[None], [0.0], gallery, [0], labels, sigma=sigma, norm_bound=1.0,
                            precision="float64").radius[0]
    allowance = binom.ppf(1 - 1e-6, trials, alpha)
    assert np.sum(result.radius > truth) <= allowance
    from minrr.certify import error_bound
    from minrr.certify.smoothing import from_samples

    est = from_samples(draws)
    half = halfspace_radii(est.mean, error_bound(est, bound, alpha, 1.0) / 2, gallery, np.zeros(trials, int), labels,
                           sigma=sigma, norm_bound=1.0, precision="float64").radius
    assert np.sum(half > truth) > allowance


def test_certify_chooses_the_certificate():
    rng = np.random.default_rng(2)
    draws, g = _two_point(rng, 30, 2000, 0.7)
    axis = (np.eye(3)[0] - np.eye(3)[1]) / np.sqrt(2)
    gallery = np.stack([g + 0.2 * axis, g - 0.3 * axis, g + 0.4 * np.eye(3)[2]])
    args = dict(sigma=0.5, gallery=gallery, gallery_labels=np.array([0, 1, 1]), precision="float64")
    guard = certify(draws, np.zeros(30, int), certificate="retrievalguard", **args)
    half = certify(draws, np.zeros(30, int), **args)
    assert half.settings["certificate"] == "halfspace" and guard.settings["certificate"] == "retrievalguard"
    np.testing.assert_allclose(guard.radius, certified_radius(guard.margin_lower, 0.5, 1.0))
    np.testing.assert_allclose(half.margin_lower, guard.margin_lower, rtol=0, atol=1e-12)
    assert np.all(half.radius >= guard.radius) and np.any(half.radius > guard.radius)
    eps = bounds.empirical_bernstein(2000, 1e-3, 1.0, np.linalg.norm(draws.mean(axis=1), axis=1), second_moment=1.0)
    want = oracle(draws.mean(axis=1), eps, gallery, np.zeros(30, int), np.array([0, 1, 1]), 0.5, 1.0, candidates=5)
    np.testing.assert_allclose(half.radius, np.maximum(want, guard.radius), rtol=1e-9)
    with pytest.raises(ValueError, match="certificate: expected one of halfspace, retrievalguard"):
        certify(draws, np.zeros(30, int), certificate="cohen", **args)
    with pytest.raises(ValueError, match="candidates: expected a whole number >= 1"):
        certify(draws, np.zeros(30, int), candidates=0, **args)


@pytest.mark.parametrize("k, candidates, multi", [(1, 1, False), (2, 3, False), (1, 2, True)])
def test_screened_runs_and_threads_match_the_oracle(monkeypatch, k, candidates, multi):
    """A gallery of several screened runs (SCREEN_RUN items) and chunks, with exact duplicates and a query on a
    pair's bisector, its query blocks on threads: float64 equals the oracle, float32 never exceeds it, and the
    threads change nothing."""
    import minrr.certify.margin as margin_module
    from minrr.certify.halfspace import SCREEN_RUN

    rng = np.random.default_rng(11)
    m = 3 * SCREEN_RUN + 17
    q, gallery, q_labels, g_labels = _problem(rng, 9, m, 4, 3, multi)
    gallery[rng.integers(0, m, m // 4)] = gallery[5]  # exact duplicates, some of them of another label
    rel = relevance(q_labels, g_labels)
    plus, minus = np.flatnonzero(rel[0])[0], np.flatnonzero(~rel[0])[-1]
    q[0] = (gallery[plus] + gallery[minus]) / 2  # a tie: u.q = c
    q[1] = gallery[plus] + 1e-6  # next to an item
    eps = rng.uniform(0, 0.05, 9)
    kwargs = dict(sigma=0.5, norm_bound=1.0, k=k, candidates=candidates, query_block=2, gallery_chunk=150)
    want = oracle(q, eps, gallery, q_labels, g_labels, 0.5, 1.0, k, candidates)
    serial = halfspace_radii(q, eps, gallery, q_labels, g_labels, **kwargs)
    monkeypatch.setattr(margin_module, "THREADS_FROM", 1)
    exact = halfspace_radii(q, eps, gallery, q_labels, g_labels, precision="float64", **kwargs)
    np.testing.assert_allclose(exact.radius, want, rtol=1e-9, atol=1e-12)
    assert np.all(exact.radius <= want) and np.any((want > 0) & np.isfinite(want))
    rounded = halfspace_radii(q, eps, gallery, q_labels, g_labels, **kwargs)
    assert np.all(rounded.radius <= want)
    np.testing.assert_allclose(rounded.radius, want, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(rounded.radius, serial.radius)
    np.testing.assert_array_equal(rounded.positive, serial.positive)
    np.testing.assert_array_equal(rounded.margins.margin_floor, serial.margins.margin_floor)


@pytest.mark.parametrize("apart", [0.1, 0.01])
def test_float32_rounding_is_taken_off_near_ties_in_high_dimension(apart):
    """Pairs ``apart`` in 96 dimensions, queries next to e+: the float32 certificate (e+.e- summed in float64,
    the GEMM's q.e- in float32, both charged Higham's float32 bound) never exceeds the exact one; 0.1 apart it
    loses under 2% to the rounding, 0.01 apart the rounding of ||e- - e+|| takes most certificates."""
    rng = np.random.default_rng(5)
    dim, pairs = 96, 60
    base = rng.normal(size=(pairs, dim))
    base /= np.linalg.norm(base, axis=1, keepdims=True) * 1.05
    step = rng.normal(size=(pairs, dim))
    gallery = np.empty((2 * pairs, dim))
    gallery[0::2], gallery[1::2] = base, base + apart * step / np.linalg.norm(step, axis=1, keepdims=True)
    g_labels = np.arange(2 * pairs) % 2
    q = base[:20] + 1e-4 * rng.normal(size=(20, dim)) / np.sqrt(dim)
    q_labels = np.zeros(20, dtype=int)
    eps = np.full(20, 1e-4)
    want = oracle(q, eps, gallery, q_labels, g_labels, 0.5, 1.0)
    got = halfspace_radii(q, eps, gallery, q_labels, g_labels, sigma=0.5, norm_bound=1.0)
    assert np.all(want > 0) and np.all(got.radius <= want)
    if apart == 0.1:
        assert np.all(got.radius >= 0.98 * want)
    else:
        assert np.mean(got.radius == 0) > 0.5


def test_run_screen_counts_the_distances_within_the_limit_ties_included():
    """The SIMD screen of a run of items (:func:`minrr.certify.halfspace._count_within`) against a float64 count of the
    same squared distances, with the limit set exactly on some of them and one ulp off."""
    from minrr.certify.halfspace import SCREEN_RUN, _count_within

    rng = np.random.default_rng(2)
    dots = rng.normal(size=SCREEN_RUN).astype(np.float32)
    g_sq = rng.uniform(0.5, 2.0, SCREEN_RUN)
    q_sq = 1.3
    s = q_sq + g_sq - 2.0 * dots.astype(np.float64)
    for limit in [s[7], np.nextafter(s[7], -np.inf), np.nextafter(s.min(), -np.inf), s.min(), np.median(s),
                  np.inf, -np.inf]:
        assert _count_within(dots, g_sq, q_sq, limit) == np.sum(s <= limit)
    assert _count_within(dots, g_sq, q_sq, s[7]) == np.sum(s <= s[7]) >= 1
