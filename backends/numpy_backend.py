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
from .base import Backend

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

    def train_step(self, model, optimizer, loss, x, y, *, noise_sigma: float = 0.0, noise_seed=0) -> float:
        raise TypeError("model: the numpy backend cannot train (a NumPy callable has no parameters); "
                        "train with the torch backend")


BACKEND_CLASS = NumpyBackend
