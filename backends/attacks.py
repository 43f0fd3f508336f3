"""The PGD engine: projected gradient ascent on input pixels, run entirely on the model's device.

One loop serves every white-box attack of minrr (deep hashing, the metric-learning suite,
the attack on the UMCD detector) and the inner maximisation of adversarial training:

* threat model: an l-inf or l2 ball of radius ``eps`` around the clean images, intersected
  with the pixel box [0, 1];
* step: ``alpha`` times the sign of the gradient (``step="sign"``, the l-inf default) or
  the gradient divided by its l2 norm per item (``"normalized"``, the l2 default);
* start: the clean images, or (``random_start``) a uniform draw from the ball
  (:func:`uniform_start`), seeded per item with :func:`~minrr.backends.base.query_seed`,
  so the start of item i depends only on (seed, first_index + i), never on its batch;
* objective: ``loss(forward(x'))``, a per-item tensor (N,) to *maximise*; ``forward``
  is the model by default. Targeted attacks pass a negated distance to their target.
  Items do not interact (the model runs in eval mode), so the gradient of the sum is
  each item's own gradient;
* ``stop``: a per-item goal test; an item that reached its goal is frozen there;
* ``keep="best"``: each item returns the iterate with the largest loss seen.

The model runs in eval mode with its parameters frozen (``requires_grad`` off) during the
attack, and every module's mode and every parameter's flag are restored afterwards
(:func:`frozen`). Nothing leaves the device inside the loop; ``stop`` costs one
device-to-host sync per step (to end the loop once every item is done).

:class:`PGD` is the same engine with torchattacks' calling convention, for people who
think that way: ``PGD(model, eps=8/255, alpha=2/255, steps=10, random_start=True)(images,
labels)`` attacks a classifier with the cross-entropy loss, exactly as
``torchattacks.PGD`` does; called on images alone it attacks an embedding model by
maximising the embedding shift ``||h(x') - h(x)||``.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from .base import KEEP, STEPS, check_attack, query_seed

__all__ = ["STEPS", "KEEP", "frozen", "pgd", "PGD", "uniform_start", "project"]

_TINY = 1e-12


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Eval mode and ``requires_grad=False`` for ``model`` inside the block; both restored after.

    Each module's own ``training`` flag and each parameter's own ``requires_grad`` are put
    back as they were, so a model with some frozen layers or some eval-mode submodules
    leaves the block unchanged.
    """
    modes = [(module, module.training) for module in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def _per_item(t: torch.Tensor) -> torch.Tensor:
    """(N, *shape) -> (N, 1, ..., 1) broadcasting view of per-item l2 norms."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(x: torch.Tensor, x_orig: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """``x`` moved onto the ``norm`` ball of radius eps around ``x_orig``, then clipped to [0, 1].

    l-inf clamps ``x - x_orig`` coordinate-wise; l2 scales it by ``min(1, eps / ||x - x_orig||)``.
    Clipping to [0, 1] afterwards never leaves the ball, since ``x_orig`` lies in [0, 1].
    """
    delta = x - x_orig
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_item(delta).clamp_min(_TINY)).clamp(max=1.0)
    return (x_orig + delta).clamp(0.0, 1.0)


def uniform_start(x: torch.Tensor, eps: float, norm: str, *, seed: int = 0, first_index: int = 0) -> torch.Tensor:
    """``x`` plus a uniform draw from the ``norm`` ball of radius eps, clipped to [0, 1].

    Item i draws from its own generator, seeded with ``query_seed(seed, first_index + i)``,
    on x's device: l-inf draws each pixel from U(-eps, eps); l2 draws a direction from the
    standard normal and a radius eps U^(1/D), D the number of pixels (uniform in the ball).
    """
    noise = torch.empty_like(x)
    numel = x[0].numel()
    for i in range(len(x)):
        state = int(query_seed(seed, first_index + i).generate_state(1, np.uint64)[0])
        generator = torch.Generator(device=x.device).manual_seed(state)
        if norm == "linf":
            noise[i].uniform_(-eps, eps, generator=generator)
        else:
            direction = torch.randn(x[i].shape, generator=generator, device=x.device, dtype=x.dtype)
            radius = eps * torch.rand((), generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / numel)
            noise[i] = direction * (radius / direction.norm().clamp_min(_TINY))
    return (x + noise).clamp(0.0, 1.0)


def _values(loss, out, n: int) -> torch.Tensor:
    value = loss(out)
    if not isinstance(value, torch.Tensor) or value.shape not in ((n,), ()):
        raise ValueError(f"loss: expected a tensor of shape ({n},) (one value per item) or a scalar, "
                         f"got {getattr(value, 'shape', type(value).__name__)}")
    return value


def pgd(model: torch.nn.Module, x: torch.Tensor, loss: Callable, *, eps: float, alpha: float, steps: int,
        norm: str = "linf", step: str | None = None, random_start: bool = False, seed: int = 0,
        first_index: int = 0, forward: Callable | None = None, stop: Callable | None = None,
        keep: str = "last", start_output: torch.Tensor | None = None) -> torch.Tensor:
    """Projected gradient ascent of ``loss(forward(x'))`` over ``x'`` in the eps-ball around x and [0, 1].

    Parameters
    ----------
    model : the network; eval mode and frozen parameters during the attack (:func:`frozen`).
    x : (N, *shape) clean images in [0, 1], on the model's device (not modified).
    loss : callable of ``forward(x')`` returning (N,) per-item values to increase (a scalar is
        accepted when neither ``stop`` nor ``keep="best"`` needs per-item values).
    eps : radius of the ball, in pixel units (e.g. 8/255).
    alpha : step size (e.g. 2/255).
    steps : number of gradient steps (0 returns the start).
    norm : "linf" or "l2", the ball.
    step : "sign" or "normalized"; default "sign" for l-inf, "normalized" for l2.
    random_start : start from a uniform point of the ball (:func:`uniform_start`), seeded by
        ``seed`` and ``first_index`` per item.
    forward : callable of x' returning what ``loss`` (and ``stop``) take; default ``model``.
    stop : callable of ``forward(x')`` returning (N,) bools, True where the goal is reached;
        such items keep that iterate and take no more steps.
    keep : "last" iterate or the "best" (largest loss) iterate seen, per item.
    start_output : ``forward(x)``, already computed by the caller with ``x`` a leaf that requires
        grad, in eval mode with frozen parameters (:func:`frozen`): the first step uses it and its
        graph instead of running the forward pass again (adversarial training mines its triplets
        from that pass). Needs the clean start (``random_start`` False).

    Returns
    -------
    (N, *shape) adversarial images, detached, on x's device.
    """
    eps, alpha, steps, step = check_attack(eps, alpha, steps, norm, step, keep)
    if start_output is not None and (random_start or not (x.is_leaf and x.requires_grad)):
        raise ValueError("start_output: needs the clean start (random_start=False) and x a leaf that requires grad")
    forward = model if forward is None else forward
    x_orig = x.detach()
    n = len(x_orig)
    with frozen(model):
        adv = uniform_start(x_orig, eps, norm, seed=seed, first_index=first_index) if random_start else x_orig.clone()
        track = stop is not None or keep == "best"
        best = best_value = active = None
        for t in range(steps + (1 if track else 0)):
            evaluate_only = t == steps
            if t == 0 and start_output is not None:
                adv = x
            else:
                adv.requires_grad_(not evaluate_only)
            with torch.set_grad_enabled(not evaluate_only):
                out = start_output if adv is x else forward(adv)
                value = _values(loss, out, n)
            if track:
                item_value = value.detach() if value.dim() == 1 else None
                if item_value is None:
                    raise ValueError(f"loss: expected ({n},) per-item values with stop= or keep='best'")
                if keep == "best":
                    if best is None:
                        best, best_value = adv.detach().clone(), item_value.clone()
                    else:
                        better = item_value > best_value
                        best_value = torch.where(better, item_value, best_value)
                        best = torch.where(better.view(-1, *([1] * (adv.dim() - 1))), adv.detach(), best)
                if stop is not None:
                    with torch.no_grad():
                        done = torch.as_tensor(stop(out), device=adv.device).reshape(n).bool()
                    active = ~done if active is None else active & ~done
                    if not bool(active.any()):
                        break
            if evaluate_only:
                break
            (gradient,) = torch.autograd.grad(value.sum(), adv)
            with torch.no_grad():
                if step == "sign":
                    direction = gradient.sign()
                else:
                    direction = gradient / _per_item(gradient).clamp_min(_TINY)
                moved = project(adv.detach() + alpha * direction, x_orig, eps, norm)
                if active is not None:
                    moved = torch.where(active.view(-1, *([1] * (adv.dim() - 1))), moved, adv.detach())
                adv = moved
    return (best if keep == "best" else adv).detach()


def _embedding_shift(model: torch.nn.Module, images: torch.Tensor) -> Callable:
    with torch.no_grad(), frozen(model):
        clean = model(images).detach()
    # ||out - clean + 1e-6||: the offset (as in torch's pairwise_distance) gives a gradient at the start,
    # where the plain norm is not differentiable and autograd returns 0.
    return lambda out: F.pairwise_distance(out.flatten(1), clean.flatten(1), eps=1e-6)


class PGD:
    """torchattacks-style PGD: ``PGD(model, eps=8/255, alpha=2/255, steps=10, random_start=True)``.

    Calling the object on ``(images, labels)`` attacks a classifier with the cross-entropy
    loss (untargeted), as ``torchattacks.PGD`` does; on ``images`` alone it attacks an
    embedding model by maximising the shift ``||h(x') - h(x)||`` (robrank's ES attack).
    ``norm="l2"`` gives torchattacks' ``PGDL2`` threat model. Images are (N, *shape)
    tensors in [0, 1]; they are moved to the model's device and the result stays there.
    """

    def __init__(self, model: torch.nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 random_start: bool = True, *, norm: str = "linf", seed: int = 0):
        check_attack(eps, alpha, steps, norm)
        self.model, self.eps, self.alpha, self.steps = model, eps, alpha, steps
        self.random_start, self.norm, self.seed = random_start, norm, seed

    def __repr__(self) -> str:
        return (f"PGD(eps={self.eps:g}, alpha={self.alpha:g}, steps={self.steps}, "
                f"random_start={self.random_start}, norm={self.norm!r})")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        images = images.detach().to(device)
        if labels is None:
            loss = _embedding_shift(self.model, images)
        else:
            labels = labels.detach().to(device)

            def loss(out):
                return F.cross_entropy(out, labels, reduction="none")
        return pgd(self.model, images, loss, eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm,
                   random_start=self.random_start, seed=self.seed)
