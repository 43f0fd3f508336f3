"""The backend contract: five verbs, NumPy in and NumPy out, shared by every framework.

================  ==========================================  ======================================
verb              numpy backend (any NumPy callable)           torch backend (an ``nn.Module``)
================  ==========================================  ======================================
``embed``         ``model(batch)``                            eval mode, inference mode, on device
``sample_noisy``  noise from NumPy generators                 noise drawn on the device
                  (``noisy_embeddings``: its raw draws, as they come)
``pgd``           needs ``grad``, a callable x -> dL/dx       the device-resident loop of
                                                              :mod:`minrr.backends.attacks`
``attack_step``   one ``pgd`` step from a given point         (the same)
``train_step``    not available (a callable has no            one optimiser step
                  parameters); raises TypeError
================  ==========================================  ======================================

Images are ``(N, *shape)`` arrays, uint8 (divided by 255) or floats in
[0, 1]; a model maps a batch ``(b, *shape)`` to embeddings ``(b, dim)``.

Noise streams. Query ``i`` of a run draws its noise from its own generator,
seeded with ``SeedSequence(seed).spawn(...)[i]`` (``first_index`` shifts i
for a run done in pieces), in blocks of L draws (:func:`noise_block`: about
2**18 numbers, the n draws split into blocks of equal size). Its noise therefore
depends only on (seed, i, n, the image shape, the backend and device), never
on the batch size or on the other queries, and each query goes through the
model in its own batches. Embeddings are accumulated in float64 by
:class:`~minrr.certify.smoothing.EstimateAccumulator`, so memory does not grow with n; on a GPU
the accumulation runs on the device (:meth:`Backend._moments`) and each query's
statistics reach the host once, so the device never waits for the host between batches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from minrr.data.loaders import check_images, to_unit_float
from minrr.io import check_positive
from minrr.progress import progress_bar
from minrr.certify.smoothing import EstimateAccumulator, SmoothedEstimate, batch_moments

from . import is_torch_tensor

__all__ = ["Backend", "pgd_update", "check_attack", "STEPS", "KEEP", "noise_block", "query_seed", "NOISE_BLOCK_ELEMENTS", "MIN_BLOCK_DRAWS", "NORMS"]

NOISE_BLOCK_ELEMENTS = 1 << 18
"""Numbers per noise block (1 MiB of float32, which stays in cache between drawing and use)."""
MIN_BLOCK_DRAWS = 16
"""Draws per block at least, so that large images still draw in few calls (few kernels on a GPU)."""
NORMS = ("linf", "l2")


def noise_block(n_samples: int, numel: int) -> int:
    """L, the draws per noise block: n split into equal blocks of at most
    ``max(MIN_BLOCK_DRAWS, NOISE_BLOCK_ELEMENTS // numel)`` draws."""
    most = max(MIN_BLOCK_DRAWS, NOISE_BLOCK_ELEMENTS // numel)
    blocks = -(-n_samples // most)
    return -(-n_samples // blocks)


def query_seed(seed: int, index: int) -> np.random.SeedSequence:
    """The seed of query ``index``: equal to ``SeedSequence(seed).spawn(m)[index]`` for any m > index."""
    return np.random.SeedSequence(seed, spawn_key=(index,))


def check_whole(value, name: str, minimum: int) -> int:
    """``value`` as an int, if it is a whole number >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected a whole number >= {minimum}, got {value!r}")
    return int(value)


def _as_images(x, name: str) -> np.ndarray:
    if is_torch_tensor(x):
        x = x.detach().cpu().numpy()
    return check_images(x, name=name)


STEPS = ("sign", "normalized")
KEEP = ("last", "best")


def check_attack(eps, alpha, steps, norm, step=None, keep="last") -> tuple[float, float, int, str]:
    """Validated PGD settings: (eps, alpha, steps, step), step defaulting to the norm's usual one
    ("sign" for l-inf, "normalized" for l2)."""
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {', '.join(NORMS)}, got {norm!r}")
    step = ("sign" if norm == "linf" else "normalized") if step is None else step
    if step not in STEPS:
        raise ValueError(f"step: expected one of {', '.join(STEPS)}, got {step!r}")
    if keep not in KEEP:
        raise ValueError(f"keep: expected one of {', '.join(KEEP)}, got {keep!r}")
    return check_positive(eps, name="eps"), check_positive(alpha, name="alpha"), check_whole(steps, "steps", 0), step


def pgd_update(x, grad, x_orig, *, eps: float, alpha: float, norm: str = "linf", step: str | None = None) -> np.ndarray:
    """One projected gradient ascent step on pixels in [0, 1] (NumPy).

    Step: ``alpha sign(grad)`` ("sign", the l-inf default) or ``alpha grad / ||grad||``
    per item ("normalized", the l2 default; a zero gradient stays put). Projection:
    ``linf`` clips ``x' - x_orig`` to [-eps, eps]; ``l2`` scales it onto
    ``||x' - x_orig|| <= eps``. Both then clip to [0, 1], which never leaves the ball
    because ``x_orig`` is inside [0, 1].

    Parameters
    ----------
    x, grad, x_orig : (N, *shape) float; grad is dL/dx of the loss to increase.
    """
    eps, alpha, _, step = check_attack(eps, alpha, 1, norm, step)
    for name, arr in (("x_orig", x_orig), ("grad", grad)):
        if arr.shape != x.shape:
            raise ValueError(f"{name}: expected the shape of x {x.shape}, got {arr.shape}")
    if not np.all(np.isfinite(grad)):
        raise ValueError("grad: contains NaN or infinity")
    axes = tuple(range(1, x.ndim))
    if step == "sign":
        moved = x + alpha * np.sign(grad)
    else:
        length = np.sqrt(np.sum(grad * grad, axis=axes, keepdims=True))
        moved = x + alpha * grad / np.where(length > 0, length, 1.0)
    delta = moved - x_orig
    if norm == "linf":
        delta = np.clip(delta, -eps, eps)
    else:
        size = np.sqrt(np.sum(delta * delta, axis=axes, keepdims=True))
        delta = delta * np.minimum(1.0, eps / np.where(size > 0, size, 1.0))
    return np.clip(x_orig + delta, 0.0, 1.0).astype(x.dtype, copy=False)


class _NoiseStream:
    """Noisy copies ``center + sigma z`` of one query, z drawn from its generator in blocks of L."""

    def __init__(self, backend: "Backend", center, sigma: float, seed: np.random.SeedSequence, block: int):
        self._backend, self._center, self._sigma, self._block = backend, center, sigma, block
        self._generator = backend._generator(seed)
        self._pending = None

    def take(self, count: int):
        """(count, *shape) noisy inputs, the next ``count`` draws of the stream."""
        out, have = None, 0
        while have < count:
            if self._pending is None or len(self._pending) == 0:
                self._pending = self._backend._normal(self._generator, self._block, self._center)
            z = self._pending[: count - have]
            self._pending = self._pending[len(z):]
            if out is None:  # in place when one block holds the whole batch: those draws are used up
                out = z if len(z) == count else self._backend._empty(count, self._center)
            self._backend._shift_scale(self._center, z, self._sigma, out[have:have + len(z)])
            have += len(z)
        return out


def check_outputs(out, batch: int):
    """``out`` if it holds (batch, dim) model outputs (any array with ndim and shape), else a ValueError."""
    if out.ndim != 2 or out.shape[0] != batch:
        raise ValueError(f"model: expected (batch, dim) outputs for a batch of {batch}, got shape {tuple(out.shape)}")
    return out


def _finite(out: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(out)):
        raise ValueError("model: returned NaN or infinity")
    return out


def _check_sampling(x, sigma, n_samples, seed, first_index, batch_size) -> tuple:
    """The sampling arguments of :meth:`Backend.sample_noisy`, checked."""
    return (_as_images(x, "x"), check_positive(sigma, name="sigma"), check_whole(n_samples, "n_samples", 2),
            check_whole(seed, "seed", 0), check_whole(first_index, "first_index", 0),
            check_whole(batch_size, "batch_size", 1))


def _stack(estimates: list[SmoothedEstimate]) -> SmoothedEstimate:
    fields = ("mean", "sq_norm_mean", "sq_norm_var", "norm_min", "norm_max")
    return SmoothedEstimate(n_samples=estimates[0].n_samples,
                            **{f: np.concatenate([getattr(e, f) for e in estimates]) for f in fields})


class Backend(ABC):
    """The four verbs; a subclass supplies the framework primitives (the underscored methods)."""

    name = "base"

    # ---- framework primitives -------------------------------------------------------------
    @abstractmethod
    def _prepare(self, model, *, inference: bool):
        """Context manager yielding the runnable model (device, eval mode; no autograd if inference)."""

    @abstractmethod
    def _to_input(self, images: np.ndarray):
        """A (b, *shape) uint8 or float batch as the model's input array, floats in [0, 1]."""

    @abstractmethod
    def _run(self, model, batch, float64: bool) -> np.ndarray:
        """Model outputs of a batch, as a NumPy array (converted to float64 if asked)."""

    @abstractmethod
    def _generator(self, seed: np.random.SeedSequence):
        """A random generator of the framework, seeded from ``seed``."""

    @abstractmethod
    def _normal(self, generator, count: int, like):
        """(count, *like.shape) standard normals of like's dtype (and device)."""

    @abstractmethod
    def _empty(self, count: int, like):
        """An uninitialised (count, *like.shape) array of like's dtype (and device)."""

    @abstractmethod
    def _shift_scale(self, center, z, sigma: float, out) -> None:
        """``out = center + sigma z`` in one pass; ``out`` may be ``z`` itself."""

    @abstractmethod
    def _input_gradient(self, model, x: np.ndarray, loss, grad) -> np.ndarray:
        """dL/dx, (N, *shape), of the loss given to :meth:`attack_step`."""

    def _forward(self, model, batch, *, float64: bool = False) -> np.ndarray:
        """:meth:`_run`, with the shape of the outputs checked: (batch, dim)."""
        return check_outputs(self._run(model, batch, float64), len(batch))

    # ---- the verbs ------------------------------------------------------------------------
    def embed(self, model, x, *, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Embeddings h(x) of a batch of images.

        Parameters
        ----------
        x : (N, *shape) uint8 or float in [0, 1].

        Returns
        -------
        (N, dim) float array.
        """
        x = _as_images(x, "x")
        batch_size = check_whole(batch_size, "batch_size", 1)
        parts = []
        with self._prepare(model, inference=True) as run, progress_bar(len(x), progress, "img") as bar:
            for start in range(0, len(x), batch_size):
                parts.append(self._forward(run, self._to_input(x[start:start + batch_size])))
                if bar is not None:
                    bar.update(len(parts[-1]))
        return _finite(np.concatenate(parts))

    def sample_noisy(self, model, x, sigma: float, n_samples: int, *, seed: int = 0, first_index: int = 0,
                     batch_size: int = 1000, progress: bool = False) -> SmoothedEstimate:
        """Monte-Carlo estimate of the smoothed embedding ``g(x) = E h(x + z)``, z ~ N(0, sigma^2 I).

        Parameters
        ----------
        x : (N, *shape) uint8 or float in [0, 1]; query j is query ``first_index + j``
            of the run and draws from its stream (module docstring).
        sigma : noise level in pixel units.
        n_samples : n, draws per query (>= 2).
        batch_size : draws per forward pass; changes nothing but speed and memory.

        Returns
        -------
        SmoothedEstimate with ``mean`` (N, dim) = g_hat and the norm statistics the bounds need.
        """
        accumulators = []
        for _, start, moments in self._noisy_batches(model, *_check_sampling(x, sigma, n_samples, seed, first_index,
                                                                             batch_size), progress, self._moments):
            if start == 0:
                accumulators.append(EstimateAccumulator(1, moments[1].shape[1]))
            accumulators[-1].add_moments(*moments)
        estimates = [a.result(to_host=self._to_host) for a in accumulators]
        for estimate in estimates:  # statistics kept on a device are checked here, once per query
            _finite(estimate.mean)
            _finite(estimate.sq_norm_mean)
        return _stack(estimates)

    def noisy_embeddings(self, model, x, sigma: float, n_samples: int, *, seed: int = 0, first_index: int = 0,
                         batch_size: int = 1000, progress: bool = False):
        """The draws behind :meth:`sample_noisy`, as they come: a generator of ``(j, start, h)``.

        Takes the arguments of :meth:`sample_noisy` (checked now, not at the first draw) and
        yields, query by query, ``h``: (b, dim) float64 embeddings h(x_j + z) of draws
        ``start .. start + b - 1`` of query j, b <= ``batch_size``. Query j's draws are those
        whose mean :meth:`sample_noisy` returns, whatever the batch size.
        """
        return self._noisy_batches(model, *_check_sampling(x, sigma, n_samples, seed, first_index, batch_size),
                                   progress, lambda run, batch: _finite(self._forward(run, batch, float64=True)))

    def _moments(self, run, batch) -> tuple:
        """``(b, *moments)`` of the model's outputs on a noisy batch of one query, for
        :meth:`EstimateAccumulator.add_moments`: here float64 NumPy on the host."""
        out = _finite(self._forward(run, batch, float64=True))
        return (len(out), *batch_moments(out[None]))

    def _to_host(self, array) -> np.ndarray:
        """An array of :meth:`_moments`' kind as a NumPy array."""
        return np.asarray(array)

    def _noisy_batches(self, model, x, sigma, n_samples, seed, first_index, batch_size, progress, reduce):
        """Yield ``(j, start, reduce(run, noisy batch))`` for every batch of every query (see noisy_embeddings)."""
        block = noise_block(n_samples, int(np.prod(x.shape[1:])))
        with progress_bar(len(x) * n_samples, progress, "draw") as bar:
            for j in range(len(x)):
                stream = None
                for start in range(0, n_samples, batch_size):
                    with self._prepare(model, inference=True) as run:  # per batch: nothing held between yields
                        if stream is None:
                            center = self._to_input(x[j:j + 1])[0]
                            stream = _NoiseStream(self, center, sigma, query_seed(seed, first_index + j), block)
                        count = min(batch_size, n_samples - start)
                        out = reduce(run, stream.take(count))
                    if bar is not None:
                        bar.update(count)
                    yield j, start, out

    def pgd(self, model, x, *, eps: float, alpha: float, steps: int, loss=None, grad=None, targets=None,
            norm: str = "linf", step: str | None = None, random_start: bool = False, seed: int = 0,
            first_index: int = 0, stop=None, keep: str = "last", batch_size: int = 256,
            progress: bool = False) -> np.ndarray:
        """Projected gradient ascent on the images, within the ``norm`` ball of radius eps and [0, 1].

        The settings are those of :func:`minrr.backends.attacks.pgd` (the torch engine, which
        runs the whole loop on the model's device); images go through in batches of
        ``batch_size``, and item i's random start is seeded by ``(seed, first_index + i)``, so
        the result does not depend on the batch size.

        Parameters
        ----------
        x : (N, *shape) uint8 or float images in [0, 1].
        loss : callable of the (b, dim) embeddings (and, with ``targets``, of the batch's
            targets) returning (b,) values to increase. torch backend: differentiated;
            numpy backend: needed only by ``keep="best"``.
        grad : numpy backend: callable of (x, targets or None) returning dL/dx, (b, *shape).
        targets : optional (N, ...) array passed, a batch at a time, to ``loss`` and ``grad``.
        stop : callable of (embeddings, targets or None) returning (b,) bools (goal reached).

        Returns
        -------
        (N, *shape) float adversarial images (float32 for uint8 input), exactly as attacked.
        """
        x = to_unit_float(_as_images(x, "x"))
        settings = check_attack(eps, alpha, steps, norm, step, keep)
        batch_size = check_whole(batch_size, "batch_size", 1)
        seed, first_index = check_whole(seed, "seed", 0), check_whole(first_index, "first_index", 0)
        if targets is not None and len(targets) != len(x):
            raise ValueError(f"targets: expected {len(x)} rows (one per image), got {len(targets)}")
        parts = []
        with progress_bar(len(x), progress, "img") as bar:
            for start in range(0, len(x), batch_size):
                rows = slice(start, start + batch_size)
                parts.append(self._pgd_batch(model, x[rows], None if targets is None else targets[rows],
                                             settings, norm=norm, loss=loss, grad=grad, random_start=random_start,
                                             seed=seed, first_index=first_index + start, stop=stop, keep=keep))
                if bar is not None:
                    bar.update(len(parts[-1]))
        return np.concatenate(parts)

    @abstractmethod
    def _pgd_batch(self, model, x: np.ndarray, targets, settings, *, norm, loss, grad, random_start, seed,
                   first_index, stop, keep) -> np.ndarray:
        """:meth:`pgd` on one batch; ``settings`` = (eps, alpha, steps, step) from :func:`check_attack`."""

    def attack_step(self, model, x, x_orig, *, eps: float, alpha: float, norm: str = "linf",
                    step: str | None = None, loss=None, grad=None) -> np.ndarray:
        """One PGD step that increases a loss, from ``x``, within the ``norm`` ball of radius eps around x_orig.

        Parameters
        ----------
        x, x_orig : (N, *shape) current and clean images, floats in [0, 1].
        loss : torch backend: a callable of the (N, dim) embeddings returning a scalar tensor.
        grad : numpy backend: a callable of x returning dL/dx, (N, *shape).

        Returns
        -------
        (N, *shape) float, see :func:`pgd_update`. For whole attacks use :meth:`pgd`, which
        keeps every step on the device.
        """
        x = to_unit_float(_as_images(x, "x"))
        x_orig = to_unit_float(_as_images(x_orig, "x_orig"), x.dtype)
        check_attack(eps, alpha, 1, norm, step)
        g = self._input_gradient(model, x, loss, grad)
        return pgd_update(x, g, x_orig, eps=eps, alpha=alpha, norm=norm, step=step)

    @abstractmethod
    def train_step(self, model, optimizer, loss, x, y, *, noise_sigma: float = 0.0, noise_seed=0) -> float:
        """One optimiser step on ``loss(model(x + z), y)``, z ~ N(0, noise_sigma^2 I); returns the loss.

        Parameters
        ----------
        x : (B, *shape) uint8 or float in [0, 1].
        y : (B,) labels (or targets) passed to ``loss``.
        noise_sigma : Gaussian noise augmentation (GDML); 0 trains on clean inputs.
        noise_seed : int or SeedSequence, the seed of this step's noise.
        """
