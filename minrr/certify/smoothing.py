"""Monte-Carlo estimates of a smoothed embedding ``g(x) = E h(x + z)``.

A :class:`SmoothedEstimate` holds, per query, the mean ``g_hat`` of ``n``
noisy embeddings and the statistics that the variance-adaptive bound needs:
the mean and unbiased variance of the squared norms, and the smallest and
largest norm. :class:`EstimateAccumulator` builds one from batches of
samples in float64, so memory does not grow with the number of samples; the
batches can come from any backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SmoothedEstimate", "EstimateAccumulator", "batch_moments", "from_samples", "from_means"]


@dataclass(frozen=True)
class SmoothedEstimate:
    """Monte-Carlo estimate of the smoothed embeddings of N inputs.

    mean : (N, dim) float64, g_hat.
    n_samples : n, draws behind each mean.
    sq_norm_mean, sq_norm_var : (N,) mean and unbiased variance of ||h||^2,
        or None when only the means are known.
    norm_min, norm_max : (N,) smallest and largest ||h|| seen, or None.
    """

    mean: np.ndarray
    n_samples: int
    sq_norm_mean: np.ndarray | None = None
    sq_norm_var: np.ndarray | None = None
    norm_min: np.ndarray | None = None
    norm_max: np.ndarray | None = None

    @property
    def has_sample_statistics(self) -> bool:
        return self.sq_norm_mean is not None

    def constant_norm(self, rtol: float = 1e-5) -> np.ndarray | None:
        """(N,) bool: every draw had the same norm (a normalising model), or None if unknown."""
        if self.norm_max is None:
            return None
        return self.norm_max - self.norm_min <= rtol * np.maximum(self.norm_max, 1e-300)


class EstimateAccumulator:
    """Streaming float64 accumulation of :class:`SmoothedEstimate` statistics.

    ``add(batch)`` takes ``(N, b, dim)`` samples (b draws for each of the N
    inputs, any b, any number of calls); ``add_moments`` takes the same batch
    already reduced to its moments (:func:`batch_moments`), as NumPy arrays or
    as arrays of another framework that supports NumPy's operators (torch
    tensors on a GPU: the running state then stays on the device, and nothing
    waits for the host until :meth:`result`). Squared-norm moments are merged
    with Chan et al.'s pairwise update, so the variance stays accurate.
    """

    def __init__(self, n_inputs: int, dim: int):
        self._shape = (n_inputs, dim)
        self._count = 0
        self._sum = self._sq_mean = self._sq_m2 = self._norm_min = self._norm_max = None

    def add(self, batch) -> None:
        """Fold in ``batch``: (N, b, dim) noisy embeddings."""
        batch = np.asarray(batch, dtype=np.float64)
        if batch.ndim != 3 or batch.shape[0] != self._shape[0] or batch.shape[2] != self._shape[1]:
            raise ValueError(f"samples: expected shape ({self._shape[0]}, b, {self._shape[1]}), got {batch.shape}")
        if batch.shape[1] > 0:
            self.add_moments(batch.shape[1], *batch_moments(batch))

    def add_moments(self, b: int, total, sq_mean, sq_m2, norm_min, norm_max) -> None:
        """Fold in b >= 1 draws per input given by their moments (see :func:`batch_moments`)."""
        if self._sum is None:  # zeros of the moments' kind (and device); min and max start at the first batch's
            self._sum, self._sq_mean, self._sq_m2 = total * 0.0, sq_mean * 0.0, sq_m2 * 0.0
            self._norm_min, self._norm_max = norm_min, norm_max
        else:
            self._norm_min = self._norm_min.clip(max=norm_min)
            self._norm_max = self._norm_max.clip(min=norm_max)
        self._sum = self._sum + total
        count = self._count + b
        delta = sq_mean - self._sq_mean
        self._sq_mean = self._sq_mean + delta * b / count
        self._sq_m2 = self._sq_m2 + (sq_m2 + delta * delta * self._count * b / count)
        self._count = count

    def result(self, to_host=np.asarray) -> SmoothedEstimate:
        """The estimate; ``to_host`` turns the state's arrays into NumPy arrays (e.g. from a GPU)."""
        if self._count < 2:
            raise ValueError(f"samples: need at least 2 draws per input, got {self._count}")
        return SmoothedEstimate(
            mean=np.array(to_host(self._sum / self._count)),
            n_samples=self._count,
            sq_norm_mean=np.array(to_host(self._sq_mean)),
            sq_norm_var=np.array(to_host(self._sq_m2 / (self._count - 1))),
            norm_min=np.array(to_host(self._norm_min)),
            norm_max=np.array(to_host(self._norm_max)),
        )


def batch_moments(batch: np.ndarray) -> tuple:
    """The moments of (N, b, dim) float64 draws that :meth:`EstimateAccumulator.add_moments` folds in:
    ``(total, sq_mean, sq_m2, norm_min, norm_max)``, the (N, dim) sum of the draws, and per input (N,)
    the mean and the sum of squared deviations of ``||h||^2`` and the smallest and largest ``||h||``."""
    sq = np.einsum("nbd,nbd->nb", batch, batch)
    norms = np.sqrt(sq)
    sq_mean = sq.mean(axis=1)
    return batch.sum(axis=1), sq_mean, ((sq - sq_mean[:, None]) ** 2).sum(axis=1), norms.min(axis=1), norms.max(axis=1)


def from_samples(samples, *, name: str = "samples", max_elements: int = 1 << 22) -> SmoothedEstimate:
    """Estimate from ``(N, n, dim)`` noisy embeddings (may be a memory map).

    Blocks of at most ``max_elements`` values are converted to float64 at a
    time, so a memory-mapped array is streamed rather than loaded. ``name``
    starts the error raised for NaN or infinity.
    """
    samples = np.asarray(samples)
    if samples.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D (N, n, dim) array, got shape {samples.shape}")
    n_inputs, n, dim = samples.shape
    draws = max(1, min(n, max_elements // max(dim, 1)))
    rows = max(1, max_elements // (draws * max(dim, 1)))
    parts = []
    for r in range(0, n_inputs, rows):
        acc = EstimateAccumulator(min(rows, n_inputs - r), dim)
        for start in range(0, n, draws):
            block = np.asarray(samples[r:r + rows, start:start + draws], dtype=np.float64)
            if not np.all(np.isfinite(block)):
                raise ValueError(f"{name}: contains NaN or infinity (in items {r} to {r + len(block) - 1})")
            acc.add(block)
        parts.append(acc.result())
    return SmoothedEstimate(
        mean=np.concatenate([p.mean for p in parts]),
        n_samples=n,
        **{field: np.concatenate([getattr(p, field) for p in parts])
           for field in ("sq_norm_mean", "sq_norm_var", "norm_min", "norm_max")},
    )


def from_means(means, n_samples: int) -> SmoothedEstimate:
    """Estimate from ``(N, dim)`` Monte-Carlo means of ``n_samples`` draws each."""
    means = np.asarray(means, dtype=np.float64)
    if means.ndim != 2:
        raise ValueError(f"means: expected a 2-D (N, dim) array, got shape {means.shape}")
    if int(n_samples) != n_samples or n_samples < 2:
        raise ValueError(f"samples: expected the number of draws behind each mean (>= 2), got {n_samples}")
    return SmoothedEstimate(mean=means, n_samples=int(n_samples))
