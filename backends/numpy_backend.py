"""The NumPy backend: any callable mapping a float64 batch ``(b, *shape)`` to ``(b, dim)`` embeddings.

Noise comes from NumPy's PCG64, one generator per query (see
:mod:`minrr.backends.base`). A NumPy callable cannot be differentiated or
trained: :meth:`~NumpyBackend.attack_step` takes the gradient from the user
(``grad``), and :meth:`~NumpyBackend.train_step` raises TypeError.
"""

from __future__ import annotations

import contextlib

import numpy as np

from minrr.data.loaders import to_unit_float

from . import is_torch_tensor
from .base import Backend, pgd_update, query_seed

__all__ = ["NumpyBackend"]


class NumpyBackend(Backend):
    """Runs NumPy callables in float64."""

    name = "numpy"

    @contextlib.contextmanager
    def _prepare(self, model, *, inference: bool):
        if not callable(model):
            raise TypeError(f"model: the numpy backend runs a callable, got {type(model).__name__}")
        yield model

    def _to_input(self, images):
        return to_unit_float(images, np.float64)

    def _run(self, model, batch, float64):
        out = model(batch)
        if is_torch_tensor(out):
            raise TypeError("model: returned a torch tensor; run torch models with the torch backend")
        out = np.asarray(out)
        if out.dtype.kind not in "fiu":
            raise TypeError(f"model: expected real numeric outputs, got dtype {out.dtype}")
        return out.astype(np.float64, copy=False) if float64 else out

    def _generator(self, seed):
        return np.random.Generator(np.random.PCG64(seed))

    def _normal(self, generator, count, like):
        return generator.standard_normal((count, *like.shape))

    def _empty(self, count, like):
        return np.empty((count, *like.shape), dtype=like.dtype)

    def _shift_scale(self, center, z, sigma, out):
        np.multiply(z, sigma, out=out)
        out += center

    def _input_gradient(self, model, x, loss, grad):
        if loss is not None:
            raise ValueError("loss: the numpy backend cannot differentiate a NumPy callable; "
                             "pass grad, a callable returning dL/dx")
        if grad is None:
            raise ValueError("grad: required by the numpy backend (a callable of x returning dL/dx of x's "
                             "shape); the torch backend differentiates a loss instead")
        return np.asarray(grad(x), dtype=x.dtype)

    def _pgd_batch(self, model, x, targets, settings, *, norm, loss, grad, random_start, seed, first_index, stop,
                   keep):
        if grad is None:
            raise ValueError("grad: required by the numpy backend (a callable of x returning dL/dx of x's "
                             "shape); the torch backend differentiates a loss instead")
        if keep == "best" and loss is None:
            raise ValueError("loss: keep='best' needs loss, a callable of the embeddings returning (b,) values")
        eps, alpha, steps, step = settings
        extra = () if targets is None else (targets,)
        x = x.astype(np.float64)
        adv = _uniform_start(x, eps, norm, seed, first_index) if random_start else x.copy()
        best = best_value = None
        active = np.ones(len(x), dtype=bool)
        with self._prepare(model, inference=True) as run:
            for t in range(steps + 1):
                if keep == "best" or stop is not None:
                    out = self._forward(run, adv, float64=True)
                    if keep == "best":
                        value = np.asarray(loss(out, *extra), dtype=np.float64).reshape(len(x))
                        better = np.ones(len(x), bool) if best is None else value > best_value
                        best = adv.copy() if best is None else np.where(better.reshape(-1, *[1] * (x.ndim - 1)),
                                                                          adv, best)
                        best_value = value if best_value is None else np.where(better, value, best_value)
                    if stop is not None:
                        active &= ~np.asarray(stop(out, *extra), dtype=bool).reshape(len(x))
                        if not active.any():
                            break
                if t == steps:
                    break
                moved = pgd_update(adv, np.asarray(grad(adv, *extra), dtype=np.float64), x, eps=eps, alpha=alpha,
                                   norm=norm, step=step)
                adv = np.where(active.reshape(-1, *[1] * (x.ndim - 1)), moved, adv)
        return best if keep == "best" else adv

    def train_step(self, model, optimizer, loss, x, y, *, noise_sigma: float = 0.0, noise_seed=0) -> float:
        raise TypeError("model: the numpy backend cannot train (a NumPy callable has no parameters); "
                        "train with the torch backend")


def _uniform_start(x: np.ndarray, eps: float, norm: str, seed: int, first_index: int) -> np.ndarray:
    """x plus a uniform draw from the ball, item i from the generator of ``query_seed(seed, first_index + i)``
    (as :func:`minrr.backends.attacks.uniform_start`, with NumPy's PCG64)."""
    noise = np.empty_like(x)
    for i in range(len(x)):
        rng = np.random.Generator(np.random.PCG64(query_seed(seed, first_index + i)))
        if norm == "linf":
            noise[i] = rng.uniform(-eps, eps, size=x[i].shape)
        else:
            direction = rng.standard_normal(x[i].shape)
            radius = eps * rng.random() ** (1.0 / x[i].size)
            noise[i] = direction * (radius / max(np.linalg.norm(direction), 1e-12))
    return np.clip(x + noise, 0.0, 1.0)


BACKEND_CLASS = NumpyBackend
