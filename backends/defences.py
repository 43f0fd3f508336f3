"""Adversarial training: naive AT, ACT, HM and COLO-TRIDE for triplet models, FreeAT for CSQ hashing.

REFERENCE §3 (metric learning) and §2 (FreeAT). Every inner maximisation is the PGD engine
:func:`minrr.backends.attacks.pgd` on the model's device; FreeAT, whose input step shares
its gradient with the weight step, runs its own loop on the device with
:func:`~minrr.backends.attacks.project`. Nothing goes through the host inside an attack.

Triplets (metric learning). In each batch the items of a class are, in batch order,
alternately *anchors* and *candidates*; every anchor a is paired with every candidate p of
its class, and each pair gets a semi-hard negative n among the candidates of the other
classes: a random one of those with ``d(a, p) < d(a, n) < d(a, p) + m`` (the band), else
the nearest one farther than p, else the farthest one (distances of the clean
embeddings, model in eval mode). Splitting roles means every image is perturbed at most
once per step and one forward pass gives the training loss, so an adversarially trained
epoch costs about (steps + 1) plain epochs.

Defences (perturbed items -> objective maximised by PGD; training loss):

* ``naive``: a, p, n -> mean hardness ``H = d(a', p') - d(a', n')``; triplet loss. Collapses.
* ``act``: p, n -> ``-mean d(p', n')`` (pull candidates together); triplet(a, p', n').
* ``hm``: a, p, n -> ``-mean(min(0, H' - H_dest)^2)`` with the gradual destination
  ``H_dest = -0.2 clip(previous loss, 0, 0.2) / 0.2``; triplet + 0.5 ICS, with
  ``ICS = mean max(0, d(a', a) - d(a', p'))`` (a: the clean anchor embedding, detached).
* ``colo-tride``: CAP (even steps) perturbs p, n to minimise ``max(0, -C)`` and stops once
  the batch collapses (C >= 0); ANP (odd steps) perturbs a to minimise
  ``max(0, C) + gamma max(0, T_an - D_aa)``. Loss: triplet, plus on ANP batches the
  top-ranked term ``0.5 max(0, mean of the smallest half of d_ap - mean of the smallest half
  of d_an + 0.04)``. Step ``(1/255) t / T`` and band ``m(t) = 0.2 (1 - t / (2T))^2`` in
  epoch t = 1..T of T.
* ``freeat`` (hashing): each batch is replayed m times; on every replay one backward pass
  gives the weight gradient and the input gradient, the weights take their Adam step and
  ``delta <- clip(delta + eps sign(grad_x))``; delta carries over to the next batch.

:func:`fit` runs the epochs, logs the collapse diagnostics of :mod:`minrr.collapse` on a
held-out split after each, and can stop and resume at any epoch boundary with identical
results (:meth:`FitState.state_dict`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from minrr.collapse import embedding_diagnostics, random_triplets
from minrr.data.loaders import check_images
from minrr.hashing.hash_centers import hash_centers
from minrr.io import check_positive

from .attacks import frozen, pgd, project
from .base import check_whole, progress_bar
from .torch_backend import TorchBackend
from .training import HEAD_OF_TASK, TASKS, csq_loss, pairwise_distances, training_batches, triplet_semihard_loss

__all__ = ["DEFENCES", "DIAGNOSTICS", "defence_settings", "hardness", "collapseness", "smallest_half_mean",
           "cap_objective", "anp_objective", "top_ranked_loss", "hm_destination", "hm_objective", "ics_loss",
           "split_roles", "mine_triplets", "ramp", "TripletBatch", "triplet_batch", "cap_attack", "anp_attack",
           "FitState", "fit"]

DEFENCES = {"dml": ("none", "naive", "act", "hm", "colo-tride"), "hash": ("none", "freeat")}
DIAGNOSTICS = ("epoch", "loss", "hardness", "collapseness", "mean_pairwise_distance", "separability",
               "recall_at_1", "train_mean_pairwise_distance", "train_separability")
"""Columns of the per-epoch diagnostics: the held-out split's clean embeddings (hardness to recall_at_1),
and the training mean of the loss and of the per-minibatch spread and separability (``train_``: on the
embeddings the model is trained on, adversarial under a defence, over the batch's mined triplets, as
COLO-TRIDE's Fig. 3 measures them; NaN for plain and hashing training)."""

_PIXEL = 1.0 / 255.0
_DEFAULTS = {
    "none": {},
    "naive": {"attack_eps": 8 * _PIXEL, "attack_alpha": _PIXEL, "attack_steps": 8},
    "act": {"attack_eps": 8 * _PIXEL, "attack_alpha": _PIXEL, "attack_steps": 8},
    "hm": {"attack_eps": 8 * _PIXEL, "attack_alpha": _PIXEL, "attack_steps": 8, "ics_weight": 0.5},
    "colo-tride": {"attack_eps": 8 * _PIXEL, "attack_alpha": _PIXEL, "attack_steps": 16, "collapse_lambda": 10.0,
                   "top_ranked_weight": 0.5, "top_ranked_margin": 0.04},
    "freeat": {"attack_eps": 8 * _PIXEL, "replays": 4},
}
_WHOLE_BATCH = ("naive", "hm")  # defences whose attack perturbs every item from the clean start
_DIAGNOSTIC_LAMBDA = 10.0  # collapseness of the diagnostics when the defence has no lambda (CUB's value)


def defence_settings(task: str, defense: str, **given) -> dict:
    """The settings of ``defense`` for ``task``: its defaults (REFERENCE §3, §2) updated with ``given``.

    given : any of attack_eps, attack_alpha, attack_steps, collapse_lambda, replays, ics_weight
        (None: the default). A setting the defence does not use is a ValueError.

    Returns
    -------
    dict with "defense" and the defence's settings (``attack_alpha`` of colo-tride is the
    full step, ramped by t / T).
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    if defense not in DEFENCES[task]:
        raise ValueError(f"defense: expected one of {', '.join(DEFENCES[task])} for task {task!r}, got {defense!r}")
    settings = dict(_DEFAULTS[defense])
    for name, value in given.items():
        if value is None:
            continue
        if name not in settings:
            raise ValueError(f"{name}: does not apply to defense {defense!r}")
        if name in ("attack_steps", "replays"):
            settings[name] = check_whole(value, name, 1)
        elif name == "collapse_lambda" or name == "ics_weight":
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value}")
            settings[name] = float(value)
        else:
            settings[name] = check_positive(value, name=name)
    return {"defense": defense, **settings}


# ---- differentiable quantities (torch, on the device) ------------------------------------------

def _distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(T,) Euclidean distances of rows, with a zero (not NaN) gradient at 0."""
    return (u - v).pow(2).sum(dim=1).clamp_min(1e-12).sqrt()


def hardness(d_ap: torch.Tensor, d_an: torch.Tensor) -> torch.Tensor:
    """H = d(a, p) - d(a, n) per triplet, (T,); H > 0: the negative is nearer than the positive."""
    return d_ap - d_an


def collapseness(d_ap: torch.Tensor, d_an: torch.Tensor, lam: float) -> torch.Tensor:
    """C = D_ap - D_an (a scalar), ``D_ap = sum_i w_i d_ap_i / sum_i w_i``,
    ``w_i = exp(lambda (d_ap_i - max_j d_ap_j))``, D_an likewise (COLO-TRIDE Eq. 5-7).

    C > 0: the batch is collapsing. lambda = 0 gives the mean hardness.
    """
    return torch.softmax(lam * d_ap, dim=0) @ d_ap - torch.softmax(lam * d_an, dim=0) @ d_an


def smallest_half_mean(d: torch.Tensor) -> torch.Tensor:
    """Mean of the smallest half (at least one) of the (T,) values ``d`` (top-ranked items)."""
    return torch.topk(d, max(1, len(d) // 2), largest=False).values.mean()


def cap_objective(c: torch.Tensor) -> torch.Tensor:
    """CAP's value to maximise, ``-max(0, -C)``: raises C up to 0 (collapse), then flat."""
    return -F.relu(-c)


def anp_objective(c: torch.Tensor, d_an: torch.Tensor, d_aa: torch.Tensor) -> torch.Tensor:
    """ANP's value to maximise, ``-(max(0, C) + gamma max(0, T_an - D_aa))``.

    c : C of the perturbed anchors a' against the clean candidates.
    d_an : (T,) d(a', n); T_an is the mean of its smallest half.
    d_aa : (A,) ``||f(a') - f(a)||`` per anchor; D_aa is their mean.
    gamma = ``exp(-max(0, -C))``, held constant (no gradient flows through it).
    """
    gamma = torch.exp(-F.relu(-c)).detach()
    return -(F.relu(c) + gamma * F.relu(smallest_half_mean(d_an) - d_aa.mean()))


def top_ranked_loss(d_ap: torch.Tensor, d_an: torch.Tensor, margin: float = 0.04) -> torch.Tensor:
    """COLO-TRIDE's top-ranked term ``max(0, mean_small_half(d_ap) - mean_small_half(d_an) + margin)``."""
    return F.relu(smallest_half_mean(d_ap) - smallest_half_mean(d_an) + margin)


def hm_destination(previous_loss: float, margin: float = 0.2) -> float:
    """HM's gradual destination hardness ``H_dest = -margin clip(previous loss, 0, margin) / margin``."""
    return -margin * min(max(previous_loss, 0.0), margin) / margin


def hm_objective(h: torch.Tensor, h_dest: float) -> torch.Tensor:
    """HM's value to maximise, ``-mean(min(0, H' - H_dest)^2)``: raises each H' up to H_dest."""
    return -F.relu(h_dest - h).pow(2).mean()


def ics_loss(anchor_adv: torch.Tensor, anchor_clean: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """HM's intra-class structure term ``mean max(0, d(a', a) - d(a', p))`` of (T, dim) embeddings."""
    return F.relu(_distance(anchor_adv, anchor_clean) - _distance(anchor_adv, positive)).mean()


def _triplet(emb: torch.Tensor, triplets, margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triplet loss ``mean max(0, d_ap - d_an + margin)`` with its (T,) d_ap, d_an."""
    a, p, n = triplets
    d_ap, d_an = _distance(emb[a], emb[p]), _distance(emb[a], emb[n])
    return F.relu(d_ap - d_an + margin).mean(), d_ap, d_an


# ---- triplets of a batch -------------------------------------------------------------------------

def split_roles(labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: True for anchors, the 1st, 3rd, ... item of each class in batch order."""
    same = labels[:, None] == labels[None, :]
    earlier = torch.ones_like(same).tril(-1)
    return (same & earlier).sum(dim=1) % 2 == 0


def mine_triplets(emb: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor, band: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, p, n) index tensors: every anchor with every candidate of its class, each with a semi-hard
    negative candidate (see the module docstring; ``band`` is m). Empty when the batch has none."""
    d = pairwise_distances(emb)
    same = labels[:, None] == labels[None, :]
    candidate = ~anchors
    a, p = (same & anchors[:, None] & candidate[None, :]).nonzero(as_tuple=True)
    neg = (~same)[a] & candidate[None, :]                          # (P, B)
    d_ap, d_an = d[a, p][:, None], d[a]
    farther = neg & (d_an > d_ap)
    in_band = farther & (d_an < d_ap + band)
    score = torch.rand(d_an.shape, generator=generator, device=d.device, dtype=d.dtype)
    inf = torch.tensor(float("inf"), device=d.device, dtype=d.dtype)
    random_in_band = torch.where(in_band, score, -inf).argmax(dim=1)
    nearest_farther = torch.where(farther, d_an, inf).argmin(dim=1)
    farthest = torch.where(neg, d_an, -inf).argmax(dim=1)
    n = torch.where(in_band.any(dim=1), random_in_band, torch.where(farther.any(dim=1), nearest_farther, farthest))
    keep = neg.any(dim=1)
    return a[keep], p[keep], n[keep]


def ramp(epoch: int, epochs: int) -> tuple[float, float]:
    """COLO-TRIDE's (step factor t / T, semi-hard band m(t) = 0.2 (1 - t / (2T))^2) in epoch t of T."""
    t = epoch / epochs
    return t, 0.2 * (1.0 - t / 2.0) ** 2


# ---- one step of each defence --------------------------------------------------------------------

@dataclasses.dataclass
class TripletBatch:
    """A training batch with its mined triplets (:func:`triplet_batch`)."""

    x: torch.Tensor           # (B, C, H, W) clean, in [0, 1]
    clean: torch.Tensor       # (B, dim) clean embeddings, eval mode, detached
    triplets: tuple           # (a, p, n) index tensors into the batch
    anchors: torch.Tensor     # (B,) bool
    clean_graph: torch.Tensor | None = None  # clean with its graph from x (a leaf requiring grad), or None


def triplet_batch(model, x: torch.Tensor, labels: torch.Tensor, band: float,
                  generator: torch.Generator, *, keep_graph: bool = False) -> TripletBatch:
    """Clean embeddings (eval mode), roles (:func:`split_roles`) and triplets (:func:`mine_triplets`).

    ``keep_graph``: run the clean pass with gradients to x, kept as the first step of an attack that
    perturbs the whole batch from the clean start (the mining pass is then no extra forward pass).
    """
    with torch.set_grad_enabled(keep_graph), frozen(model):
        if keep_graph:
            x = x.detach().requires_grad_(True)
        graph = model(x)
    clean = graph.detach()
    anchors = split_roles(labels)
    return TripletBatch(x, clean, mine_triplets(clean, labels, anchors, band, generator), anchors,
                        graph if keep_graph else None)


def _replace(base: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``base`` with rows ``index`` replaced by ``values`` (differentiable in ``values``)."""
    return base.index_put((index,), values)


def _attack(model, batch: TripletBatch, eps: float, alpha: float, steps: int, index: torch.Tensor,
            objective: Callable, stop: Callable | None = None) -> torch.Tensor:
    """PGD on the items ``index`` of the batch; ``objective(emb)`` sees the whole batch's embeddings
    (clean rows for the items not perturbed) and returns a scalar to maximise."""
    n = len(index)
    whole = n == len(batch.x)
    forward = model if whole else (lambda z: _replace(batch.clean, index, model(z)))

    def loss(emb):
        value = objective(emb)
        return value.expand(n) / n if stop is not None else value

    start_output = batch.clean_graph if whole else None
    adv = pgd(model, batch.x if start_output is not None else batch.x[index], loss, eps=eps, alpha=alpha, steps=steps,
              forward=forward, stop=None if stop is None else (lambda emb: stop(emb).expand(n)),
              start_output=start_output)
    return batch.x.detach().index_put((index,), adv)


def cap_attack(model, batch: TripletBatch, *, eps: float, alpha: float, steps: int, lam: float) -> torch.Tensor:
    """COLO-TRIDE's CAP: the batch with its candidates (p, n) moved by PGD to minimise ``max(0, -C)``,
    anchors clean; PGD stops as soon as the batch collapses (C >= 0), and a collapsed batch is left as is."""
    a, p, n = batch.triplets

    def c_of(e):
        return collapseness(_distance(e[a], e[p]), _distance(e[a], e[n]), lam)

    return _attack(model, batch, eps, alpha, steps, (~batch.anchors).nonzero().flatten(),
                   lambda e: cap_objective(c_of(e)), stop=lambda e: c_of(e) >= 0)


def anp_attack(model, batch: TripletBatch, *, eps: float, alpha: float, steps: int, lam: float) -> torch.Tensor:
    """COLO-TRIDE's ANP: the batch with its anchors moved by PGD to minimise
    ``max(0, C) + gamma max(0, T_an - D_aa)`` (:func:`anp_objective`), candidates clean."""
    a, p, n = batch.triplets
    anchors_at = batch.anchors.nonzero().flatten()

    def objective(e):
        c = collapseness(_distance(e[a], e[p]), _distance(e[a], e[n]), lam)
        return anp_objective(c, _distance(e[a], e[n]), _distance(e[anchors_at], batch.clean[anchors_at]))

    return _attack(model, batch, eps, alpha, steps, anchors_at, objective)


def _dml_step(model, optimizer, batch: TripletBatch, settings: dict, margin: float, step: int, epoch: int, epochs: int,
              memory: dict) -> float:
    """One defended triplet step; returns the training loss. ``memory`` carries HM's previous loss and
    collects the epoch's per-batch (spread, separability) of the trained-on embeddings."""
    defense = settings["defense"]
    a, p, n = batch.triplets
    candidates_at = (~batch.anchors).nonzero().flatten()
    everything = torch.arange(len(batch.x), device=batch.x.device)
    eps, alpha, steps = settings["attack_eps"], settings["attack_alpha"], settings["attack_steps"]
    extra = None
    if defense == "naive":
        x = _attack(model, batch, eps, alpha, steps, everything,
                    lambda e: hardness(_distance(e[a], e[p]), _distance(e[a], e[n])).mean())
    elif defense == "act":
        x = _attack(model, batch, eps, alpha, steps, candidates_at, lambda e: -_distance(e[p], e[n]).mean())
    elif defense == "hm":
        destination = hm_destination(memory.get("previous_loss", margin), margin)
        x = _attack(model, batch, eps, alpha, steps, everything,
                    lambda e: hm_objective(hardness(_distance(e[a], e[p]), _distance(e[a], e[n])), destination))

        def extra(e, d_ap, d_an):
            return settings["ics_weight"] * ics_loss(e[a], batch.clean[a], e[p])
    else:  # colo-tride
        attack = cap_attack if step % 2 == 0 else anp_attack  # TRIDE: CAP and ANP on alternate batches
        x = attack(model, batch, eps=eps, alpha=alpha * ramp(epoch, epochs)[0], steps=steps,
                   lam=settings["collapse_lambda"])
        if attack is anp_attack:
            def extra(e, d_ap, d_an):
                return settings["top_ranked_weight"] * top_ranked_loss(d_ap, d_an, settings["top_ranked_margin"])
    model.train()
    optimizer.zero_grad(set_to_none=True)
    emb = model(x)
    loss, d_ap, d_an = _triplet(emb, batch.triplets, margin)
    memory["previous_loss"] = float(loss.detach())
    if extra is not None:
        loss = loss + extra(emb, d_ap, d_an)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        spread = pairwise_distances(emb.detach()).sum() / (len(emb) * (len(emb) - 1))
        separation = (d_an.detach().mean() - d_ap.detach().mean()) / spread.clamp_min(1e-12)
    memory.setdefault("batch_diagnostics", []).append(torch.stack([spread, separation]))
    return float(loss.detach())


class _ConvInputGradient(torch.autograd.Function):
    """Identity on a conv2d's output whose backward also gives the conv's input gradient, as
    ``col2im(W^T g)`` (a matmul and :func:`F.fold`): the transposed convolution, the same sum as
    autograd's in another order. See :func:`_cheap_input_gradient`."""

    @staticmethod
    def forward(ctx, out, inp, weight, geometry):
        ctx.save_for_backward(weight)
        ctx.geometry = geometry
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        size, kernel, dilation, padding, stride = ctx.geometry
        cols = torch.matmul(weight.reshape(len(weight), -1).t(), grad.flatten(2))  # (B, C kh kw, H' W')
        return grad, F.fold(cols, size, kernel, dilation=dilation, padding=padding, stride=stride), None, None


def _cheap_input_gradient(model, x: torch.Tensor) -> list:
    """Hooks (their handles) on the model's first ``nn.Conv2d`` that compute the gradient with respect
    to its input with :class:`_ConvInputGradient` instead of oneDNN; none where that does not apply.

    FreeAT needs the gradient with respect to the images, so the first convolution, on 1-3 image
    channels, computes its input gradient, which plain training never does; oneDNN does that about
    3.5 times slower than a matmul and col2im on the CPU (small CNN, 1 channel, 32 filters, 28 x 28,
    batch 128: 9 ms against 2.6, a tenth of a whole training step). Used on the CPU for an ungrouped,
    zero-padded convolution with ``C kh kw <= O`` (the matmul's result no larger than the output).
    """
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if (type(conv) is not torch.nn.Conv2d or x.device.type != "cpu" or conv.groups != 1
            or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
            or conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] > conv.out_channels):
        return []
    held = []

    def before(module, args):
        if not args[0].requires_grad:
            return None
        held.append(args[0])
        return (args[0].detach(), *args[1:])  # the conv itself then computes its weight gradient only

    def after(module, args, out):
        if not held:
            return None
        inp = held.pop()
        geometry = (tuple(inp.shape[-2:]), module.kernel_size, module.dilation, module.padding, module.stride)
        return _ConvInputGradient.apply(out, inp, module.weight.detach(), geometry)

    return [conv.register_forward_pre_hook(before), conv.register_forward_hook(after)]


def _freeat_step(model, optimizer, x: torch.Tensor, centers: torch.Tensor, csq_lambda: float, settings: dict,
                 memory: dict) -> list[float]:
    """FreeAT: ``replays`` weight steps on the batch, each also updating the kept perturbation delta.

    x : (B, C, H, W) clean images in [0, 1]; centers : (B, K) their hash centres. The perturbed
    images keep x's strides, so the model runs in the same memory format as plain training on x
    (a 1-channel batch from NumPy fancy indexing looks channels-last to oneDNN; NCHW made each
    replay 1.5 times a plain step), and the first convolution's input gradient is
    :func:`_cheap_input_gradient`'s.
    """
    eps = settings["attack_eps"]
    delta = memory.get("delta")
    if delta is None or delta.shape[1:] != x.shape[1:] or len(delta) < len(x):
        delta = torch.zeros_like(x) if delta is None else torch.cat([delta, torch.zeros_like(x[len(delta):])])
    losses = []
    model.train()
    hooks = _cheap_input_gradient(model, x)
    try:
        for _ in range(settings["replays"]):
            adv = torch.add(x, delta[:len(x)], out=torch.empty_like(x)).clamp_(0.0, 1.0).requires_grad_(True)
            optimizer.zero_grad(set_to_none=True)
            loss = csq_loss(model(adv), centers, csq_lambda)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                delta[:len(x)] = project(adv.detach() + eps * adv.grad.sign(), x, eps, "linf") - x
            losses.append(float(loss.detach()))
    finally:
        for hook in hooks:
            hook.remove()
    memory["delta"] = delta
    return losses


# ---- the epochs ------------------------------------------------------------------------------------

@dataclasses.dataclass
class FitState:
    """Where a run stands after ``epoch`` completed epochs: enough to resume it exactly.

    history : loss of every weight step so far.
    diagnostics : one row per epoch, the values of :data:`DIAGNOSTICS`.
    memory : the defence's carry-over (HM's previous loss, FreeAT's delta).
    """

    epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    diagnostics: list = dataclasses.field(default_factory=list)
    memory: dict = dataclasses.field(default_factory=dict)

    def state_dict(self, model, optimizer) -> dict:
        """Tensors and plain values only (loadable with ``torch.load(weights_only=True)``): a copy, which
        later steps of the run do not change (``.cpu()`` alone would share a CPU tensor's storage)."""
        memory = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in self.memory.items()}
        return copy.deepcopy({
            "epoch": self.epoch, "history": torch.tensor(self.history, dtype=torch.float64),
            "diagnostics": torch.tensor(self.diagnostics, dtype=torch.float64).reshape(-1, len(DIAGNOSTICS)),
            "memory": memory, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict()})

    @classmethod
    def restore(cls, state: dict, model, optimizer, device) -> FitState:
        """The state saved by :meth:`state_dict`, loading the model's and optimiser's states."""
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        memory = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in state["memory"].items()}
        return cls(int(state["epoch"]), state["history"].tolist(), state["diagnostics"].tolist(), memory)


def _diagnostics(backend, model, probe, lam: float) -> dict:
    """Collapse diagnostics and Recall@1 (each item its own query, left out) of the probe split."""
    from minrr.metrics.retrieval import recall_at_k

    images, labels, triplets = probe
    emb = backend.embed(model, images)
    threads = torch.get_num_threads()
    try:
        recall = float(recall_at_k(emb, labels, 1))
    finally:  # numba's OpenMP threads share libgomp with torch and change its thread count
        torch.set_num_threads(threads)
    return {**embedding_diagnostics(emb, labels, triplets, lam), "recall_at_1": recall}


def fit(model, images, labels, *, task: str, defense: str = "none", epochs: int = 10, batch_size: int = 128,
        lr: float = 1e-3, margin: float = 0.2, noise_sigma: float = 0.0, per_class: int = 4,
        csq_lambda: float = 1e-4, seed: int = 0, settings: dict | None = None, held_out=None,
        backend: TorchBackend | None = None, progress: bool = False, resume: dict | None = None,
        on_epoch: Callable | None = None) -> FitState:
    """Train ``model`` in place with ``defense``; returns the final :class:`FitState`.

    Parameters
    ----------
    model, images, labels, task, epochs, batch_size, lr, margin, noise_sigma, per_class, csq_lambda,
    seed : as :func:`minrr.backends.training.train` (``defense="none"`` gives its exact steps).
    defense : one of ``DEFENCES[task]``.
    settings : :func:`defence_settings` of the defence (default: its defaults).
    held_out : (images, labels) for the per-epoch diagnostics, or None for none.
    resume : a :meth:`FitState.state_dict` of this same run, to continue after its epoch.
    on_epoch : called after each epoch with the :class:`FitState` and the optimiser.
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    settings = settings or defence_settings(task, defense)
    if settings.get("defense") != defense:
        raise ValueError(f"settings: they are those of defense {settings.get('defense')!r}, not {defense!r}")
    spec = getattr(model, "spec", None)
    if spec is None:
        raise TypeError(f"model: expected a RetrievalNet (see build_model), got {type(model).__name__}")
    if spec.head != HEAD_OF_TASK[task]:
        raise ValueError(f"task: {task!r} trains a model with a {HEAD_OF_TASK[task]} head, not a {spec.head} head")
    epochs = check_whole(epochs, "epochs", 1)
    batch_size = check_whole(batch_size, "batch_size", 2)
    per_class = check_whole(per_class, "per_class", 2)
    for name, value in (("noise_sigma", noise_sigma), ("margin", margin), ("csq_lambda", csq_lambda)):
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name}: expected a finite number >= 0, got {value}")
    if noise_sigma > 0 and defense != "none":
        raise ValueError(f"noise_sigma: Gaussian noise training is not combined with defense {defense!r}")
    lr = check_positive(lr, name="lr")
    images = check_images(images, name="images")
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels: expected ({len(images)},) integer labels, got shape {labels.shape}, "
                         f"dtype {labels.dtype}")
    backend = backend or TorchBackend()
    classes, y = np.unique(labels, return_inverse=True)
    if task == "dml":
        def plain_loss(out, target):
            return triplet_semihard_loss(out, target, margin)
    else:
        centers = torch.as_tensor(hash_centers(len(classes), spec.dim, seed=seed), dtype=backend.dtype,
                                  device=backend.device)

        def plain_loss(out, target):
            return csq_loss(out, centers[target], csq_lambda)
    probe = None
    if held_out is not None:
        probe_images = check_images(held_out[0], name="held_out")
        probe_labels = np.asarray(held_out[1])
        probe = (probe_images, probe_labels, random_triplets(probe_labels, np.random.default_rng(seed)))
    lam = settings.get("collapse_lambda", _DIAGNOSTIC_LAMBDA)
    model.to(backend.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    streams = np.random.SeedSequence(seed)
    schedule = [training_batches(y, batch_size, per_class if task == "dml" else None, rng) for _ in range(epochs)]
    state = FitState()
    if resume is not None:
        state = FitState.restore(resume, model, optimizer, backend.device)
        streams.spawn(sum(map(len, schedule[:state.epoch])))  # the streams the finished epochs used
    step = sum(map(len, schedule[:state.epoch]))
    with progress_bar(sum(map(len, schedule)), progress, "step", initial=step) as bar:
        for epoch in range(state.epoch, epochs):
            losses = []
            for index in schedule[epoch]:
                stream = streams.spawn(1)[0]
                if defense == "none":
                    losses.append(backend.train_step(model, optimizer, plain_loss, images[index], y[index],
                                                     noise_sigma=noise_sigma, noise_seed=stream))
                elif defense == "freeat":
                    x = backend._to_input(images[index])
                    losses += _freeat_step(model, optimizer, x, centers[torch.as_tensor(y[index], device=x.device)],
                                           csq_lambda, settings, state.memory)
                else:
                    x = backend._to_input(images[index])
                    band = ramp(epoch + 1, epochs)[1] if defense == "colo-tride" else margin
                    batch = triplet_batch(model, x, torch.as_tensor(y[index], device=x.device), band,
                                          backend._generator(stream), keep_graph=defense in _WHOLE_BATCH)
                    if len(batch.triplets[0]) > 0:
                        losses.append(_dml_step(model, optimizer, batch, settings, margin, step, epoch + 1, epochs,
                                                state.memory))
                step += 1
                if bar is not None:
                    bar.update(1)
            state.history += losses
            state.epoch = epoch + 1
            batches = state.memory.pop("batch_diagnostics", [])
            spread, separation = torch.stack(batches).mean(0).tolist() if batches else (float("nan"),) * 2
            if probe is not None:
                row = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                       **_diagnostics(backend, model, probe, lam), "train_mean_pairwise_distance": spread,
                       "train_separability": separation}
                state.diagnostics.append([row[k] for k in DIAGNOSTICS])
            if on_epoch is not None:
                on_epoch(state, optimizer)
    model.eval()
    return state
