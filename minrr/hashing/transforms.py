"""Input transforms t(x) for UMCD's C3 and the feature-squeezing baselines.

Every transform takes an image batch ``(n, C, H, W)`` or ``(n, H, W)`` with pixels in
[0, 1] and returns a batch of the same shape and floating dtype (float32 stays float32;
other inputs become float64). Filters act on the last two (spatial) axes of each image and
channel; only :func:`non_local_means` and :func:`fs_adaptive` look across channels.

==================  ===========================================================  ==============
transform           what it does                                                 used by
==================  ===========================================================  ==============
mean_blur           size x size box average (3 x 3 default)                     UMCD C3, MeanBlur
median_filter       size x size median (2 x 2 default)                          FS-Median
bit_depth           round to 2^bits levels (5 bits default)                      feature squeezing
non_local_means     patch-similarity weighted average (13-3-2 default)           FS-NLM
fs_adaptive         entropy-chosen quantisation, cross-shaped mean filter        FS-Adaptive
==================  ===========================================================  ==============

Each docstring says where minrr departs from the original implementation.
"""

from __future__ import annotations

import numba
import numpy as np
from scipy import ndimage

from ..io import as_float_array

__all__ = ["mean_blur", "median_filter", "bit_depth", "non_local_means", "image_entropy", "fs_adaptive",
           "TRANSFORMS"]


def _check_images(x, name: str = "x") -> np.ndarray:
    arr = np.asarray(x)
    dtype = np.float32 if arr.dtype == np.float32 else np.float64
    arr = as_float_array(arr, name=name, ndim=(3, 4), dtype=dtype)
    low, high = arr.min(), arr.max()
    if low < 0 or high > 1:
        raise ValueError(f"{name}: pixel values must lie in [0, 1]; found {low if low < 0 else high:g}")
    return arr


def _window(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected a whole number >= {minimum}, got {value!r}")
    return int(value)


def _spatial(arr: np.ndarray, size: int) -> tuple[int, ...]:
    """A filter size acting on the last two axes only."""
    return (1,) * (arr.ndim - 2) + (size, size)


def mean_blur(x, size: int = 3) -> np.ndarray:
    """Box filter: each pixel becomes the mean of the size x size window around it.

    The MeanBlur of Li and Li (ICCV 2017) that UMCD uses for t in C3. Borders are
    mirrored with the edge pixel repeated (``scipy.ndimage`` ``"reflect"``); an even size
    puts the extra row and column before the pixel.
    """
    arr = _check_images(x)
    out = ndimage.uniform_filter(arr, size=_spatial(arr, _window(size, "size")), mode="reflect")
    return np.clip(out, 0.0, 1.0, out=out)


def median_filter(x, size: int = 2) -> np.ndarray:
    """Median of the size x size window, as feature squeezing's median smoothing.

    Feature squeezing (Xu, Evans, Qi, NDSS 2018) calls ``scipy.ndimage.median_filter`` with
    ``mode="reflect"`` and 2 x 2 windows on CIFAR-10, and so does minrr: for an even window
    the median is the upper of the two middle values and the window spans offsets
    -(size // 2) .. size - 1 - size // 2 around the pixel.
    """
    arr = _check_images(x)
    return ndimage.median_filter(arr, size=_spatial(arr, _window(size, "size")), mode="reflect")


def bit_depth(x, bits: int = 5) -> np.ndarray:
    """Reduce each pixel to 2^bits levels: round(x (2^bits - 1)) / (2^bits - 1).

    Feature squeezing's bit-depth reduction, exactly (5 bits on CIFAR-10).
    """
    arr = _check_images(x)
    bits = _window(bits, "bits")
    if bits > 24:
        raise ValueError(f"bits: expected at most 24 bits, got {bits}")
    levels = 2**bits - 1
    return (np.rint(arr * levels) / levels).astype(arr.dtype, copy=False)


def non_local_means(x, search: int = 13, patch: int = 3, strength: float = 2 / 255) -> np.ndarray:
    """Non-local means: a weighted mean of the pixels in a search window around each pixel.

    Feature squeezing's "13-3-2" non-local means: search window 13 x 13, patch 3 x 3,
    filter strength h = 2 on 0..255 pixels, i.e. ``strength = 2 / 255`` on [0, 1] pixels.
    Pixel q in the search window of p gets the weight

        w(p, q) = exp(-d^2(p, q) / h^2),

    with d^2 the mean over the patch pixels and channels of the squared differences between
    the patches around p and q; weights below 0.001 are dropped, as OpenCV does. Borders
    are mirrored without repeating the edge pixel (OpenCV's default).

    Simplifications against ``cv2.fastNlMeansDenoisingColored``, which feature squeezing
    calls: no conversion to CIELAB (OpenCV denoises the L channel with h and the a, b
    channels with hColor; with h = hColor minrr treats all channels jointly in the given
    colour space), no rounding of the input to 8 bits, and float weights instead of OpenCV's
    fixed-point table (whose patch mean divides by the next power of two of the patch area).

    Parameters
    ----------
    search, patch : odd window sides in pixels.
    strength : h in [0, 1] pixel units, > 0.
    """
    arr = _check_images(x)
    search, patch = _window(search, "search"), _window(patch, "patch")
    for name, value in (("search", search), ("patch", patch)):
        if value % 2 == 0:
            raise ValueError(f"{name}: expected an odd window side, got {value}")
    strength = float(strength)
    if not (np.isfinite(strength) and strength > 0):
        raise ValueError(f"strength: expected a finite number above 0, got {strength:g}")
    images = arr.reshape(arr.shape[0], -1, *arr.shape[-2:]).astype(np.float64)
    border = search // 2 + patch // 2
    padded = np.pad(images, ((0, 0), (0, 0), (border, border), (border, border)), mode="reflect")
    out = np.empty_like(images)
    _non_local_means(padded, search // 2, patch // 2, 1.0 / strength**2, out)
    return out.reshape(arr.shape).astype(arr.dtype, copy=False)


@numba.njit(parallel=True, cache=True)
def _non_local_means(padded, search_half, patch_half, inv_h2, out):
    """padded: (n, C, H + 2B, W + 2B) mirrored images, B = search_half + patch_half;
    out: (n, C, H, W). One offset (dy, dx) at a time: squared differences of the whole image
    against its shifted copy, patch sums by running sums, then weights for every pixel."""
    n, channels, height, width = out.shape
    border = search_half + patch_half
    side = 2 * patch_half + 1
    scale = inv_h2 / (side * side * channels)
    rows, cols = height + 2 * patch_half, width + 2 * patch_half
    for i in numba.prange(n):
        image = padded[i]
        total = np.zeros((height, width))
        acc = np.zeros((channels, height, width))
        diff = np.empty((rows, cols))
        column_sums = np.empty((height, cols))
        for dy in range(-search_half, search_half + 1):
            for dx in range(-search_half, search_half + 1):
                for y in range(rows):
                    for x in range(cols):
                        s = 0.0
                        for c in range(channels):
                            d = image[c, search_half + y, search_half + x] - image[c, search_half + y + dy,
                                                                                  search_half + x + dx]
                            s += d * d
                        diff[y, x] = s
                for x in range(cols):
                    s = 0.0
                    for y in range(side):
                        s += diff[y, x]
                    column_sums[0, x] = s
                    for y in range(1, height):
                        s += diff[y + side - 1, x] - diff[y - 1, x]
                        column_sums[y, x] = s
                for y in range(height):
                    s = 0.0
                    for x in range(side):
                        s += column_sums[y, x]
                    for x in range(width):
                        if x > 0:
                            s += column_sums[y, x + side - 1] - column_sums[y, x - 1]
                        weight = np.exp(-max(s, 0.0) * scale)
                        if weight < 1e-3:
                            continue
                        total[y, x] += weight
                        for c in range(channels):
                            acc[c, y, x] += weight * image[c, border + y + dy, border + x + dx]
        for c in range(channels):
            out[i, c] = acc[c] / total


def image_entropy(x) -> np.ndarray:
    """1-D entropy in bits of each image's 8-bit histogram, averaged over its channels: ``(n,)``.

    Pixels are rounded to 0..255 first (Liang et al.'s reference code reads 8-bit values).
    """
    arr = _check_images(x)
    levels = np.rint(arr * 255).astype(np.int64).reshape(arr.shape[0], -1, arr.shape[-2] * arr.shape[-1])
    n, channels, pixels = levels.shape
    offsets = (np.arange(n * channels) * 256).reshape(n, channels, 1)
    counts = np.bincount((levels + offsets).ravel(), minlength=n * channels * 256).reshape(n, channels, 256)
    p = counts / pixels
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(counts > 0, -p * np.log2(p), 0.0)
    return terms.sum(axis=2).mean(axis=1)


def fs_adaptive(x, radius: int = 3) -> np.ndarray:
    """FS-Adaptive (Liang et al., TDSC 2018): quantisation chosen by the image's entropy H.

    On 8-bit pixels v = round(255 x), each image is quantised to the left end of
    intervals of width w, v -> floor(v / w) w:

    * H < 4: w = 128 (2 intervals);
    * 4 <= H < 5: w = 64 (4 intervals);
    * H >= 5: w = 43 (6 intervals), then a cross-shaped mean filter (the pixel and
      ``radius`` pixels up, down, left and right: 1 + 4 radius pixels) smooths the
      quantised image, and each value keeps whichever of the quantised and the smoothed
      value is closer to the original. A band of ``radius`` pixels at the border stays
      unfiltered.

    This follows the authors' reference code (``DeepDetector``, ImageNet tests), which
    uses H of :func:`image_entropy` and radius 3. Simplification: the input is in [0, 1]
    rather than 0..255, so the output is the quantised 8-bit value divided by 255.
    """
    arr = _check_images(x)
    radius = _window(radius, "radius")
    entropy = image_entropy(arr)
    v = np.rint(arr.astype(np.float64) * 255)
    width = np.where(entropy < 4, 128, np.where(entropy < 5, 64, 43)).reshape((-1,) + (1,) * (arr.ndim - 1))
    quantised = np.floor(v / width) * width
    smooth = entropy >= 5
    if smooth.any():
        cross = np.zeros((2 * radius + 1, 2 * radius + 1))
        cross[radius, :] = cross[:, radius] = 1.0 / (4 * radius + 1)
        block = quantised[smooth]
        filtered = ndimage.correlate(block, cross.reshape((1,) * (arr.ndim - 2) + cross.shape), mode="nearest")
        inner = (Ellipsis, slice(radius, -radius), slice(radius, -radius))
        smoothed = block.copy()
        smoothed[inner] = filtered[inner]
        original = v[smooth]
        quantised[smooth] = np.where(np.abs(block - original) < np.abs(smoothed - original), block, smoothed)
    return (quantised / 255).astype(arr.dtype, copy=False)


TRANSFORMS = {"mean-blur": mean_blur, "median": median_filter, "bit-depth": bit_depth,
              "non-local-means": non_local_means, "fs-adaptive": fs_adaptive}
"""The transforms by name, each with its defaults (the names of ``minrr.hashing.detection_baselines.OUTPUT_TRANSFORMS``)."""
