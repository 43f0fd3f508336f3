"""Input transforms against simple oracles: constants, brute-force windows, exact levels."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage

from minrr.hashing import transforms as T

shapes = st.sampled_from([(2, 5, 6), (1, 3, 7, 5), (2, 1, 4, 4)])


def windows(images, size, mode):
    """Every size x size window of each image: (..., H, W, size, size), padded by ``mode``."""
    before, after = size // 2, size - 1 - size // 2
    pad = [(0, 0)] * (images.ndim - 2) + [(before, after)] * 2
    padded = np.pad(images, pad, mode=mode)
    return np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(-2, -1))


@given(shapes, st.floats(0, 1), st.integers(1, 5))
def test_mean_blur_of_a_constant_image_is_constant(shape, value, size):
    out = T.mean_blur(np.full(shape, value), size)
    np.testing.assert_allclose(out, value, atol=1e-12)


@given(shapes, st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_mean_blur_is_the_window_mean_with_mirrored_edges(shape, size, seed):
    x = np.random.default_rng(seed).random(shape)
    np.testing.assert_allclose(T.mean_blur(x, size), windows(x, size, "symmetric").mean(axis=(-2, -1)),
                               atol=1e-12)


@given(shapes, st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_median_filter_against_sorted_windows(shape, size, seed):
    """Upper median of each window, edges mirrored: what feature squeezing's scipy call computes."""
    x = np.round(np.random.default_rng(seed).random(shape), 1)  # many ties
    w = windows(x, size, "symmetric")
    oracle = np.sort(w.reshape(*w.shape[:-2], -1), axis=-1)[..., size * size // 2]
    np.testing.assert_array_equal(T.median_filter(x, size), oracle)


def test_identity_sizes_and_dtype():
    x = np.random.default_rng(0).random((2, 3, 5, 5)).astype(np.float32)
    for out in (T.mean_blur(x, 1), T.median_filter(x, 1)):
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, x)
    assert T.mean_blur(x.astype(np.float64)).dtype == np.float64
    assert T.bit_depth((x > 0.5).astype(np.int64), 3).dtype == np.float64


@given(shapes, st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_bit_depth_gives_exact_levels(shape, bits, seed):
    x = np.random.default_rng(seed).random(shape)
    levels = 2**bits - 1
    out = T.bit_depth(x, bits)
    np.testing.assert_array_equal(out * levels, np.round(out * levels))  # on the grid k / levels
    assert np.all(np.abs(out - x) <= 0.5 / levels + 1e-12)  # the nearest level
    np.testing.assert_array_equal(T.bit_depth(out, bits), out)
    assert set(np.unique(T.bit_depth(x, 1))) <= {0.0, 1.0}


def nlm_oracle(image, search, patch, h):
    """Non-local means of one (C, H, W) image straight from the formula."""
    s, p = search // 2, patch // 2
    b = s + p
    padded = np.pad(image, ((0, 0), (b, b), (b, b)), mode="reflect")
    out = np.empty_like(image)
    for y in range(image.shape[1]):
        for x in range(image.shape[2]):
            centre = padded[:, b + y - p:b + y + p + 1, b + x - p:b + x + p + 1]
            total, acc = 0.0, 0.0
            for dy in range(-s, s + 1):
                for dx in range(-s, s + 1):
                    other = padded[:, b + y + dy - p:b + y + dy + p + 1, b + x + dx - p:b + x + dx + p + 1]
                    weight = np.exp(-np.mean((centre - other) ** 2) / h**2)
                    if weight >= 1e-3:
                        total += weight
                        acc = acc + weight * padded[:, b + y + dy, b + x + dx]
            out[:, y, x] = acc / total
    return out


@pytest.mark.parametrize("search, patch, h", [(5, 3, 0.3), (3, 1, 0.1), (7, 3, 0.08), (5, 5, 1.0)])
def test_non_local_means_against_the_formula(search, patch, h):
    x = np.random.default_rng(search * patch).random((2, 3, 6, 7))
    out = T.non_local_means(x, search, patch, h)
    for image, result in zip(x, out):
        np.testing.assert_allclose(result, nlm_oracle(image, search, patch, h), atol=1e-12)


def test_non_local_means_limits():
    rng = np.random.default_rng(3)
    x = rng.random((2, 8, 9))
    np.testing.assert_allclose(T.non_local_means(np.full((1, 3, 6, 6), 0.4)), 0.4, atol=1e-12)
    # h -> infinity: every weight is 1, the plain mean of the (mirrored) search window
    np.testing.assert_allclose(T.non_local_means(x, 5, 3, 1e6), ndimage.uniform_filter(x, (1, 5, 5), mode="mirror"),
                               atol=1e-9)
    # the default 13-3-2 on noise: only the pixel's own patch is similar enough, so nothing moves
    np.testing.assert_allclose(T.non_local_means(x), x, atol=1e-12)
    # a bigger image takes the 13 x 13 window without mirroring past its edges
    assert T.non_local_means(rng.random((1, 3, 20, 20)), strength=0.5).shape == (1, 3, 20, 20)


def test_image_entropy():
    flat = np.full((1, 3, 16, 16), 0.5)
    halves = np.zeros((1, 16, 16))
    halves[:, :8] = 1.0
    every_level = (np.arange(256) / 255).reshape(1, 16, 16)
    np.testing.assert_allclose(T.image_entropy(np.concatenate([flat[:, 0], halves, every_level])), [0, 1, 8])
    np.testing.assert_allclose(T.image_entropy(flat), [0.0])


def fs_adaptive_oracle(image, radius):
    """Liang et al.'s steps on one (C, H, W) image of 8-bit values, pixel by pixel."""
    v = np.rint(image * 255)
    entropy = T.image_entropy(image[None])[0]
    width = 128 if entropy < 4 else 64 if entropy < 5 else 43
    q = np.floor(v / width) * width
    if entropy < 5:
        return q / 255
    out = q.copy()
    _, h, w = q.shape
    for c in range(q.shape[0]):
        for y in range(radius, h - radius):
            for x in range(radius, w - radius):
                cross = q[c, y, x] + sum(q[c, y + i, x] + q[c, y - i, x] + q[c, y, x + i] + q[c, y, x - i]
                                         for i in range(1, radius + 1))
                smoothed = cross / (4 * radius + 1)
                closer = abs(q[c, y, x] - v[c, y, x]) < abs(smoothed - v[c, y, x])
                out[c, y, x] = q[c, y, x] if closer else smoothed
    return out / 255


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_fs_adaptive_against_the_reference_steps(radius):
    rng = np.random.default_rng(radius)
    noise = rng.integers(0, 256, (3, 12, 11)) / 255  # entropy near 7: quantise to 6 levels and smooth
    medium = rng.integers(0, 24, (3, 12, 11)) * 10 / 255  # about 24 levels: entropy in [4, 5)
    flat = np.full((3, 12, 11), 0.7)  # entropy 0: two levels
    batch = np.stack([noise, medium, flat])
    entropy = T.image_entropy(batch)
    assert entropy[0] >= 5 and 4 <= entropy[1] < 5 and entropy[2] == 0
    out = T.fs_adaptive(batch, radius)
    for image, result in zip(batch, out):
        np.testing.assert_allclose(result, fs_adaptive_oracle(image, radius), atol=1e-12)
    np.testing.assert_allclose(out[2], 128 / 255)
    np.testing.assert_allclose(T.fs_adaptive(batch[:, 0], radius), out[:, 0], atol=1e-12)  # (n, H, W) too


@pytest.mark.parametrize("call, message", [
    (lambda: T.mean_blur(np.full((1, 4, 4), 1.5)), r"x: pixel values must lie in \[0, 1\]; found 1.5"),
    (lambda: T.mean_blur(np.full((1, 4, 4), -0.5)), r"x: pixel values must lie in \[0, 1\]; found -0.5"),
    (lambda: T.median_filter(np.zeros((4, 4))), "x: expected a 3-D or 4-D array"),
    (lambda: T.mean_blur(np.full((1, 4, 4), np.nan)), "x: contains NaN"),
    (lambda: T.mean_blur(np.zeros((1, 4, 4)), 0), "size: expected a whole number >= 1"),
    (lambda: T.bit_depth(np.zeros((1, 4, 4)), 25), "bits: expected at most 24"),
    (lambda: T.non_local_means(np.zeros((1, 4, 4)), search=4), "search: expected an odd window side"),
    (lambda: T.non_local_means(np.zeros((1, 4, 4)), patch=2), "patch: expected an odd window side"),
    (lambda: T.non_local_means(np.zeros((1, 4, 4)), strength=0), "strength: expected a finite number above 0"),
    (lambda: T.fs_adaptive(np.zeros((1, 4, 4)), 0), "radius: expected a whole number >= 1"),
])
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()
