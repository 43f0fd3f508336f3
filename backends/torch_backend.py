"""The PyTorch backend: an ``nn.Module`` on CUDA when available, on the CPU otherwise.

Batches go to the device as uint8 or float and become floats in [0, 1] of
the model's dtype there; noise is drawn on the device from one
``torch.Generator`` per query (see :mod:`minrr.backends.base`), so the CPU
and a GPU give different (equally valid) draws. Every verb moves the model
to the device; it runs in eval mode for embeddings, sampling and attacks, and
its train/eval mode is restored afterwards.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .base import Backend, check_outputs

__all__ = ["TorchBackend", "default_device"]


def default_device() -> str:
    """"cuda" when a GPU is available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class TorchBackend(Backend):
    """Runs ``nn.Module`` models on ``device`` (default: :func:`default_device`).

    ``dtype`` ("float32" or "float64") is the dtype of inputs and noise; it must be the model's.
    """

    name = "torch"

    def __init__(self, device=None, dtype: str = "float32"):
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
        self.dtype = getattr(torch, dtype)
        try:
            self.device = torch.device(default_device() if device is None else device)
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as exc:
            raise ValueError(f"device: {device!r} is not usable here ({str(exc).splitlines()[0]})") from None
        self._host_statistics = self.device.type == "cpu"  # sampling statistics in NumPy; else on the device

    def _module(self, model) -> torch.nn.Module:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: the torch backend runs an nn.Module, got {type(model).__name__}")
        return model.to(self.device)

    @contextlib.contextmanager
    def _prepare(self, model, *, inference: bool):
        model = self._module(model)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode(inference):
                yield model
        finally:
            model.train(was_training)

    def _to_input(self, images):
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        if batch.dtype == torch.uint8:
            return batch.to(self.dtype).div_(255.0)
        return batch.to(self.dtype)

    def _run(self, model, batch, float64):
        return self._embeddings(model, batch).to("cpu", torch.float64 if float64 else None).numpy()

    def _embeddings(self, model, batch) -> torch.Tensor:
        out = model(batch)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model: expected a tensor of embeddings, got {type(out).__name__}")
        return out.detach()

    def _moments(self, run, batch) -> tuple:
        """On the CPU, NumPy's (the base class's); elsewhere float64 on the device, the same formulas as
        :func:`minrr.certify.smoothing.batch_moments`, with no copy to the host and no wait for it."""
        if self._host_statistics:
            return super()._moments(run, batch)
        out = check_outputs(self._embeddings(run, batch), len(batch)).to(torch.float64)[None]  # (1, b, dim)
        sq = (out * out).sum(dim=2)
        norms = sq.sqrt()
        sq_mean = sq.mean(dim=1)
        return (len(batch), out.sum(dim=1), sq_mean, ((sq - sq_mean[:, None]) ** 2).sum(dim=1), norms.amin(dim=1),
                norms.amax(dim=1))

    def _to_host(self, array) -> np.ndarray:
        return array.cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)

    def _generator(self, seed):
        # torch's CPU generator (mt19937) keeps the low 32 bits of a seed, so two queries of a
        # very large run may share a stream; each certificate holds on its own all the same.
        state = int(seed.generate_state(1, np.uint64)[0])
        return torch.Generator(device=self.device).manual_seed(state)

    def _normal(self, generator, count, like):
        return torch.randn((count, *like.shape), generator=generator, device=like.device, dtype=like.dtype)

    def _empty(self, count, like):
        return torch.empty((count, *like.shape), dtype=like.dtype, device=like.device)

    def _shift_scale(self, center, z, sigma, out):
        torch.add(center, z, alpha=sigma, out=out)

    def _input_gradient(self, model, x, loss, grad):
        if grad is not None:
            raise ValueError("grad: the torch backend differentiates loss= itself; pass loss, not grad")
        if loss is None:
            raise ValueError("loss: required by the torch backend (a callable of the (N, dim) embeddings "
                             "returning a scalar tensor)")
        with self._prepare(model, inference=False) as run:
            inputs = self._to_input(x).requires_grad_(True)
            value = loss(run(inputs))
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ValueError(f"loss: expected a scalar tensor, got {getattr(value, 'shape', type(value).__name__)}")
            (gradient,) = torch.autograd.grad(value.reshape(()), inputs)
        return gradient.to("cpu", torch.float64).numpy().astype(x.dtype, copy=False)

    def _pgd_batch(self, model, x, targets, settings, *, norm, loss, grad, random_start, seed, first_index, stop,
                   keep):
        from .attacks import pgd

        if grad is not None:
            raise ValueError("grad: the torch backend differentiates loss= itself; pass loss, not grad")
        if loss is None:
            raise ValueError("loss: required by the torch backend (a callable of the (b, dim) embeddings "
                             "returning (b,) values to increase)")
        extra = () if targets is None else (torch.as_tensor(np.asarray(targets), device=self.device),)
        eps, alpha, steps, step = settings
        adv = pgd(self._module(model), self._to_input(x), lambda out: loss(out, *extra), eps=eps, alpha=alpha,
                  steps=steps, norm=norm, step=step, random_start=random_start, seed=seed, first_index=first_index,
                  stop=None if stop is None else (lambda out: stop(out, *extra)), keep=keep)
        return adv.cpu().numpy()

    def train_step(self, model, optimizer, loss, x, y, *, noise_sigma: float = 0.0, noise_seed=0) -> float:
        model = self._module(model)
        model.train()
        inputs = self._to_input(np.asarray(x))
        if noise_sigma > 0:
            seed = noise_seed if isinstance(noise_seed, np.random.SeedSequence) else np.random.SeedSequence(noise_seed)
            inputs += noise_sigma * torch.randn(inputs.shape, generator=self._generator(seed), device=self.device,
                                                dtype=self.dtype)
        targets = torch.as_tensor(np.asarray(y), device=self.device)
        optimizer.zero_grad(set_to_none=True)
        value = loss(model(inputs), targets)
        value.backward()
        optimizer.step()
        return float(value.detach())


BACKEND_CLASS = TorchBackend
