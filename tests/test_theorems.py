"""The theorems behind the certificate, checked numerically.

* Robust guarantee: moving a query embedding by less than d_k / 2 never
  changes Recall@k (d = d_1 for the retrieved label).
* Lipschitz bound of a Gaussian-smoothed function with ||h|| <= F, on
  functions whose smoothing has a closed form.
* Radius formulas: Phi^-1 >= linear, monotone, and below 1.349 sigma for F = 1.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import ndtr

from minrr.certify.margin import margins
from minrr.certify.radius import certified_radius, lipschitz_bound

seeds = st.integers(0, 2**32 - 1)


def _recall_at_k(q, gallery, q_label, g_labels, k):
    """Brute force: a same-label item among the k nearest (ties to the smaller index)."""
    order = np.lexsort((np.arange(len(gallery)), np.linalg.norm(gallery - q, axis=1)))
    return bool(np.any(g_labels[order[:k]] == q_label))


@given(seed=seeds, k=st.integers(1, 4), dim=st.integers(2, 6), classes=st.integers(2, 4))
def test_moving_less_than_half_the_margin_keeps_recall(seed, k, dim, classes):
    rng = np.random.default_rng(seed)
    gallery = rng.normal(size=(30, dim))
    g_labels = rng.integers(0, classes, 30)
    q = rng.normal(size=(1, dim))
    q_label = np.array([g_labels[0]])
    d = margins(q, gallery, q_label, g_labels, k=k, precision="float64").margin[0]
    if not d > 0:
        return
    assert _recall_at_k(q[0], gallery, q_label[0], g_labels, k)
    others = np.flatnonzero(g_labels != q_label[0])
    near_other = others[np.argsort(np.linalg.norm(gallery[others] - q[0], axis=1))[:k]]
    directions = [rng.normal(size=dim) for _ in range(20)] + [gallery[j] - q[0] for j in near_other]
    same = np.flatnonzero(g_labels == q_label[0])
    directions.append(q[0] - gallery[same[np.argmin(np.linalg.norm(gallery[same] - q[0], axis=1))]])
    for direction in directions:
        step = (0.5 * d * (1 - 1e-9)) * direction / np.linalg.norm(direction)
        assert _recall_at_k(q[0] + step, gallery, q_label[0], g_labels, k)


@given(seed=seeds, dim=st.integers(1, 5), length=st.floats(0.1, 10), frac=st.floats(0.01, 0.45))
def test_half_margin_is_tight(seed, dim, length, frac):
    """On the line through the two nearest items, a move of (1 + 1e-6) d / 2 flips Recall@1."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=dim)
    u /= np.linalg.norm(u)
    origin = rng.normal(size=dim)
    gallery = np.stack([origin, origin + length * u])
    labels = np.array([0, 1])
    q = origin + frac * length * u
    d = margins(q[None], gallery, np.array([0]), labels, precision="float64").margin[0]
    assert abs(d - length * (1 - 2 * frac)) < 1e-9 * length
    assert _recall_at_k(q + 0.5 * d * (1 - 1e-6) * u, gallery, 0, labels, 1)
    assert not _recall_at_k(q + 0.5 * d * (1 + 1e-6) * u, gallery, 0, labels, 1)


def _smoothed_sign(x, sigma, f):
    """h(x) = F sign(x_1) e_1 has g(x) = F (2 Phi(x_1 / sigma) - 1) e_1."""
    return f * (2 * ndtr(x[..., 0] / sigma) - 1)


def _smoothed_rotation(x, omega, sigma, f):
    """h(x) = F (cos w.x, sin w.x) has g(x) = F exp(-sigma^2 |w|^2 / 2) (cos w.x, sin w.x)."""
    t = x @ omega
    return f * np.exp(-(sigma ** 2) * (omega @ omega) / 2) * np.stack([np.cos(t), np.sin(t)], axis=-1)


@given(seed=seeds, sigma=st.floats(0.05, 3), f=st.floats(0.1, 5), dim=st.integers(1, 6),
       scale=st.floats(1e-3, 10))
def test_lipschitz_bound_of_smoothed_functions(seed, sigma, f, dim, scale):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(50, dim)) * scale
    y = x + rng.normal(size=(50, dim)) * scale * rng.random((50, 1))
    dist = np.linalg.norm(x - y, axis=1)
    phi_bound = lipschitz_bound(dist, sigma, f)
    linear_bound = f * np.sqrt(2 / (np.pi * sigma ** 2)) * dist
    assert np.all(phi_bound <= linear_bound * (1 + 1e-12) + 1e-15)
    sign_gap = np.abs(_smoothed_sign(x, sigma, f) - _smoothed_sign(y, sigma, f))
    assert np.all(sign_gap <= phi_bound * (1 + 1e-9) + 1e-12)
    omega = rng.normal(size=dim) / sigma
    rot_gap = np.linalg.norm(_smoothed_rotation(x, omega, sigma, f) - _smoothed_rotation(y, omega, sigma, f), axis=1)
    assert np.all(rot_gap <= phi_bound * (1 + 1e-9) + 1e-12)


def test_lipschitz_bound_is_attained_by_the_smoothed_sign():
    """For x = -y on the first axis the sign function meets the bound with equality."""
    sigma, f = 0.7, 2.0
    t = np.linspace(0.01, 3, 20)
    x = np.stack([t / 2, np.zeros_like(t)], axis=1)
    gap = _smoothed_sign(x, sigma, f) - _smoothed_sign(-x, sigma, f)
    np.testing.assert_allclose(gap, lipschitz_bound(t, sigma, f), rtol=1e-12)


@given(d=st.floats(1e-6, 2.0), sigma=st.floats(1e-3, 10), f=st.floats(0.5, 3))
def test_radius_formulas(d, sigma, f):
    d = d * f  # margins live in [0, 2F]
    phi = certified_radius(d, sigma, f, "phi")
    linear = certified_radius(d, sigma, f, "linear")
    assert phi >= linear * (1 - 1e-12) > 0
    assert certified_radius(d * 1.01, sigma, f) > phi
    assert certified_radius(d, sigma * 1.01, f) > phi
    assert phi <= 2 * sigma * 0.6744897501960817 * (1 + 1e-12)  # d <= 2F: r <= 2 sigma Phi^-1(3/4)
    # Consistency with the Lipschitz lemma: inside the radius, g moves by less than d / 2.
    assert lipschitz_bound(phi * (1 - 1e-9), sigma, f) < d / 2


def test_radius_not_certified_and_ceiling():
    np.testing.assert_array_equal(certified_radius([-0.1, 0.0, np.nan], 0.5, 1.0), [0.0, 0.0, 0.0])
    assert certified_radius(2.0, 1.0, 1.0) == pytest.approx(1.3489795, abs=1e-7)
    assert np.isinf(certified_radius(4.0, 1.0, 1.0))


def test_radius_forms_pinned_to_independent_values():
    """d_low = 0.3, sigma = 0.5: phi = 2 sigma Phi^-1(1/2 + d/(8F)), linear = d sigma sqrt(pi/2) / (2F),
    at F = 1 and F = 2 (values from scipy.special.ndtri in a separate script)."""
    assert certified_radius(0.3, 0.5, 1.0, "phi") == pytest.approx(0.0941374143235364, rel=1e-12)
    assert certified_radius(0.3, 0.5, 1.0, "linear") == pytest.approx(0.0939985602986625, rel=1e-12)
    assert certified_radius(0.3, 0.5, 2.0, "phi") == pytest.approx(0.04701659657781429, rel=1e-12)
    assert certified_radius(0.3, 0.5, 2.0, "linear") == pytest.approx(0.04699928014933125, rel=1e-12)
