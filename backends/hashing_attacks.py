"""Attacks on deep-hashing retrieval, as UMCD evaluates its detector (REFERENCE §2), on the PGD engine.

A hashing model gives f(x) = tanh(u(x)) in (-1, 1)^K and the code b(x) = sign(f(x)), sign(0) = +1.
D(a, c) = (K - <a, c>) / 2 is the relaxed Hamming distance (the Hamming distance on +-1 codes).
Every attack but CW is :func:`minrr.backends.attacks.pgd` (l-inf sign steps, projection onto the
eps-ball and [0, 1]) with the objective below, maximised per item:

============  ===================================================================  =========================
attack        objective maximised over x' (x: the clean image)                      defaults
============  ===================================================================  =========================
``hamming``   -<f(x'), b(x)> / K: away from the clean code (Yang et al. [46])       eps 8/255, alpha 1/255,
                                                                                    100 steps
``dhta``      <tanh(s u(x')), a> / K: towards the anchor code a of a target class   eps 8/255, alpha 1/255,
              (Bai et al. [6]); s the tanh scale of DHTA's schedule                 100 steps, n_t = 9
``cw``        minimised with Adam: ||x' - x||_2^2 + c max(<f(x'), b(x)> / K, -kappa)  lr 0.01, 500 steps,
                                                                                    c = 10, kappa = 0
``detector``  -L, L = D(f(x'), h_t) - lambda1 ||b(x') - f(x')||_1                   eps 32/255, alpha 1/255,
                  + lambda2 D(f(t(x')), f(x')): UMCD's white-box attacker (Eq. 13)  100 steps, lambda1 0.0075,
                                                                                    lambda2 0.3
============  ===================================================================  =========================

The settings of ``hamming`` and ``dhta`` are UMCD's (Sec. 4.1: step 1 and eps 8 on 0..255 pixels,
100 steps); CW's learning rate and steps too. Every attack takes tensors on the model's device
and returns the adversarial images there; every random draw of item i (random start, target
label, anchor members) depends only on (seed, first_index + i), so results do not depend on the
batch size. The model runs in eval mode with frozen parameters (:func:`~minrr.backends.attacks.frozen`)
and is left as it was.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from .attacks import frozen, pgd, project
from .base import check_whole, query_seed

__all__ = ["ATTACKS", "DEFAULTS", "N_T", "DHTA_SCHEDULE", "mean_blur", "hash_logits", "codes_of", "dhta_scale",
           "dhta_targets", "hamming_attack", "dhta", "cw", "detector_attack", "hashing_attack"]

N_T = 9
"""DHTA's anchor: the sign of the sum of n_t = 9 target-class database codes."""

DHTA_SCHEDULE = ((0, 0.1), (1000, 0.2), (1200, 0.3), (1400, 0.5), (1600, 0.7), (1800, 1.0))
"""(first step, tanh scale s) of DHTA's original schedule over its 2000 steps (Bai et al.'s code)."""

DEFAULTS = {
    "hamming": {"eps": 8 / 255, "alpha": 1 / 255, "steps": 100, "random_start": False},
    "dhta": {"eps": 8 / 255, "alpha": 1 / 255, "steps": 100, "random_start": False, "n_t": N_T, "scale": "dhta"},
    "cw": {"lr": 0.01, "steps": 500, "c": 10.0, "kappa": 0.0, "eps": None},
    "detector": {"eps": 32 / 255, "alpha": 1 / 255, "steps": 100, "random_start": False, "lambda1": 0.0075,
                 "lambda2": 0.3, "blur": 3},
}
"""Each attack's settings and their defaults (UMCD's, REFERENCE §2)."""
ATTACKS = tuple(DEFAULTS)


def mean_blur(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    """UMCD's transform t: the size x size box average of each channel, on x's device.

    The torch twin of :func:`minrr.hashing.transforms.mean_blur` (borders mirrored with the edge pixel
    repeated, an even size puts the extra row and column before the pixel), differentiable.

    x : (N, C, H, W) images in [0, 1]; returns the same shape.
    """
    size = check_whole(size, "blur", 1)
    before, after = size // 2, size - 1 - size // 2
    if x.dim() != 4 or max(before, after) > min(x.shape[-2:]):
        raise ValueError(f"blur: a {size} x {size} window needs (N, C, H, W) images of at least "
                         f"{max(before, after)} pixels a side, got shape {tuple(x.shape)}")
    if size == 1:
        return x
    for axis in (-2, -1):
        n = x.shape[axis]
        x = torch.cat([x.narrow(axis, 0, before).flip(axis), x, x.narrow(axis, n - after, after).flip(axis)], axis)
    return F.avg_pool2d(x, size, stride=1).clamp(0.0, 1.0)


def hash_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """u(x), the outputs of a hashing :class:`~minrr.backends.models.RetrievalNet` before the tanh: (N, K)."""
    spec = getattr(model, "spec", None)
    if spec is None or spec.head != "hash":
        raise TypeError(f"model: a tanh scale other than 1 needs a minrr hashing model (RetrievalNet with a hash "
                        f"head), whose outputs before the tanh it rescales; got {type(model).__name__}")
    return model.head(model.trunk(model.normalize(x)))


def codes_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """b(x) = sign(f(x)), sign(0) = +1, as a float +-1 tensor (N, K) on x's device (eval mode)."""
    with torch.no_grad(), frozen(model):
        return torch.where(model(x) >= 0, 1.0, -1.0).to(x.dtype)


def dhta_scale(step: int) -> float:
    """s at ``step`` (counted from 0) of DHTA's schedule: 0.1 before step 1000, ..., 1.0 from step 1800."""
    return next(scale for first, scale in reversed(DHTA_SCHEDULE) if step >= first)


class _ScaledCodes:
    """``forward`` for :func:`pgd`: tanh(s_t u(x')) at the t-th call; pgd calls it once per step, in order."""

    def __init__(self, model, scale):
        self.model, self.scale, self.calls = model, scale, 0

    def __call__(self, z):
        s = dhta_scale(self.calls) if self.scale == "dhta" else self.scale
        self.calls += 1
        return self.model(z) if s == 1.0 else torch.tanh(s * hash_logits(self.model, z))


def _draws(seed: int, index: int) -> np.random.Generator:
    """Query ``index``'s generator for targets and anchors (a child of its seed, apart from its random start)."""
    return np.random.default_rng(query_seed(seed, index).spawn(1)[0])


def dhta_targets(labels, database_codes, database_labels, *, target=None, n_t: int = N_T, seed: int = 0,
                 first_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Target labels and DHTA anchor codes of queries.

    Query i (query ``first_index + i`` of the run) draws from its own generator: its target label
    (when ``target`` is None) uniformly among the database classes other than its own with at
    least n_t codes, then n_t distinct codes of that class; its anchor is the sign of their sum
    (component voting, sign(0) = +1).

    Parameters
    ----------
    labels : (n,) int, the queries' labels (single-label data).
    database_codes : (N, K) codes in {-1, 1} or {0, 1} (the bit is value > 0).
    database_labels : (N,) int.
    target : one target label for every query, or None (drawn per query).

    Returns
    -------
    target_labels : (n,) int64.
    anchors : (n, K) int8 +-1.
    """
    n_t = check_whole(n_t, "n_t", 1)
    codes = np.asarray(database_codes)
    db_labels = np.asarray(database_labels)
    labels = np.asarray(labels)
    if codes.ndim != 2 or codes.dtype.kind not in "iubf":
        raise ValueError(f"database: expected (N, K) numeric codes, got shape {codes.shape}, dtype {codes.dtype}")
    if db_labels.shape != (len(codes),) or db_labels.dtype.kind not in "iu":
        raise ValueError(f"database_labels: expected ({len(codes)},) integer labels (one per database code), "
                         f"got shape {db_labels.shape}, dtype {db_labels.dtype}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels: expected (n,) integer labels, got shape {labels.shape}, dtype {labels.dtype}")
    bits = np.where(codes > 0, 1, -1).astype(np.int64)
    classes, counts = np.unique(db_labels, return_counts=True)
    members = {int(c): np.flatnonzero(db_labels == c) for c in classes}
    eligible = classes[counts >= n_t]
    if target is not None and int(target) not in set(eligible.tolist()):
        have = len(members.get(int(target), ()))
        raise ValueError(f"targeted_label: class {target} has {have} database codes; DHTA draws n_t = {n_t}")
    target_labels = np.empty(len(labels), dtype=np.int64)
    anchors = np.empty((len(labels), codes.shape[1]), dtype=np.int8)
    for i, own in enumerate(labels):
        rng = _draws(seed, first_index + i)
        if target is None:
            others = eligible[eligible != own]
            if len(others) == 0:
                raise ValueError(f"database: no class other than {own} has n_t = {n_t} codes to draw a target from")
            chosen = int(others[rng.integers(len(others))])
        else:
            chosen = int(target)
        picked = rng.choice(members[chosen], size=n_t, replace=False)
        target_labels[i] = chosen
        anchors[i] = np.where(bits[picked].sum(axis=0) >= 0, 1, -1)
    return target_labels, anchors


def _check_targets(targets: torch.Tensor, x: torch.Tensor, n_bits: int) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor) or targets.shape != (len(x), n_bits):
        raise ValueError(f"targets: expected a ({len(x)}, {n_bits}) tensor of +-1 codes, one per image, "
                         f"got {getattr(targets, 'shape', type(targets).__name__)}")
    return targets.to(x.device, x.dtype)


def hamming_attack(model: torch.nn.Module, x: torch.Tensor, *, eps: float = 8 / 255, alpha: float = 1 / 255,
                   steps: int = 100, random_start: bool = False, seed: int = 0, first_index: int = 0) -> torch.Tensor:
    """Untargeted Hamming-maximising PGD: maximise -<f(x'), b(x)> / K (UMCD's untargeted attack [46]).

    x : (N, C, H, W) clean images in [0, 1] on the model's device. Returns (N, C, H, W).
    """
    codes = codes_of(model, x)
    n_bits = codes.shape[1]
    return pgd(model, x, lambda f: -(f * codes).sum(1) / n_bits, eps=eps, alpha=alpha, steps=steps,
               random_start=random_start, seed=seed, first_index=first_index)


def dhta(model: torch.nn.Module, x: torch.Tensor, anchors: torch.Tensor, *, eps: float = 8 / 255,
         alpha: float = 1 / 255, steps: int = 100, scale="dhta", random_start: bool = False, seed: int = 0,
         first_index: int = 0) -> torch.Tensor:
    """Targeted DHTA: maximise <tanh(s u(x')), a> / K, a the anchor code (:func:`dhta_targets`).

    ``scale="dhta"`` is the original schedule by step number (:data:`DHTA_SCHEDULE`: s = 0.1 for the
    first 1000 steps, rising to 1.0 from step 1800 of 2000): at UMCD's 100 steps (the default) the
    whole attack runs at s = 0.1, exactly as the original code does with 100 iterations; pass
    ``steps=2000`` for DHTA's own setting. A small s keeps the bits that already saturated in the
    wrong direction from losing their gradient. A number fixes s (1 attacks f itself).

    anchors : (N, K) +-1 tensor. Returns (N, C, H, W) adversarial images.
    """
    if scale != "dhta" and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected 'dhta' or a number above 0, got {scale!r}")
    n_bits = anchors.shape[-1] if isinstance(anchors, torch.Tensor) and anchors.dim() == 2 else -1
    anchors = _check_targets(anchors, x, n_bits)
    return pgd(model, x, lambda f: (f * anchors).sum(1) / n_bits, eps=eps, alpha=alpha, steps=steps,
               random_start=random_start, seed=seed, first_index=first_index,
               forward=_ScaledCodes(model, scale if scale == "dhta" else float(scale)))


def cw(model: torch.nn.Module, x: torch.Tensor, *, lr: float = 0.01, steps: int = 500, c: float = 10.0,
       kappa: float = 0.0, eps: float | None = None) -> torch.Tensor:
    """Untargeted Carlini-Wagner attack on the code: Adam on x', minimising per item

        ||x' - x||_2^2 + c max(<f(x'), b(x)> / K, -kappa),

    CW's untargeted objective (Carlini and Wagner, S&P 2017, loss f6 with the l2 distortion
    term) with the classifier's logit margin replaced by the relaxed code similarity
    <f(x'), b(x)> / K in [-1, 1]: positive while the relaxed code still agrees with b(x) on more
    than half of the bits. An item succeeds once that similarity is <= -kappa; the attack returns
    its successful iterate of least distortion (as CW does), or its last iterate when none
    succeeded. Departure from CW: x' is kept in [0, 1] (and in the l-inf ball of radius ``eps``
    when given) by projection after each Adam step, not by CW's tanh change of variables (whose
    gradient vanishes at pixels of exactly 0 or 1, common in Fashion-MNIST), and there is no
    binary search over c. UMCD's settings: Adam, lr 0.01, 500 steps.

    x : (N, C, H, W) clean images in [0, 1] on the model's device. Returns (N, C, H, W).
    """
    steps = check_whole(steps, "steps", 0)
    for name, value, low in (("lr", lr, 0.0), ("c", c, 0.0), ("kappa", kappa, None)):
        number = isinstance(value, (int, float)) and math.isfinite(value)
        if not number or (value <= low if low is not None else value < 0):
            raise ValueError(f"{name}: expected a finite number {'above 0' if low is not None else '>= 0'}, "
                             f"got {value!r}")
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite number above 0 or None, got {eps!r}")
    radius = 1.0 if eps is None else float(eps)  # the l-inf ball of radius 1 is the whole box
    codes = codes_of(model, x)
    n_bits = codes.shape[1]
    x_orig = x.detach()
    shape = (-1,) + (1,) * (x.dim() - 1)
    with frozen(model):
        delta = torch.zeros_like(x_orig, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=lr)
        best = x_orig.clone()
        best_size = torch.full((len(x),), math.inf, device=x.device, dtype=x.dtype)
        for t in range(steps + 1):
            adv = x_orig + delta
            similarity = (model(adv) * codes).sum(1) / n_bits
            size = delta.flatten(1).pow(2).sum(1)
            with torch.no_grad():
                better = (similarity <= -kappa) & (size < best_size)
                best_size = torch.where(better, size, best_size)
                best = torch.where(better.view(shape), adv, best)
            if t == steps:
                break
            optimizer.zero_grad(set_to_none=True)
            (size + c * similarity.clamp_min(-kappa)).sum().backward()
            optimizer.step()
            with torch.no_grad():
                delta.copy_(project(x_orig + delta, x_orig, radius, "linf") - x_orig)
        found = torch.isfinite(best_size).view(shape)
        return torch.where(found, best, adv.detach()).detach()


def detector_attack(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor | None = None, *,
                    eps: float = 32 / 255, alpha: float = 1 / 255, steps: int = 100, lambda1: float = 0.0075,
                    lambda2: float = 0.3, blur: int = 3, random_start: bool = False, seed: int = 0,
                    first_index: int = 0) -> torch.Tensor:
    """UMCD's white-box attack on its own detector (Sec. 4.3, Eq. 13): PGD that maximises -L,

        L = D(f(x'), h_t) - lambda1 ||b(x') - f(x')||_1 + lambda2 D(f(t(x')), f(x')),

    t the detector's 3 x 3 mean blur (:func:`mean_blur`, size ``blur``). The first term reaches
    the target code h_t (defeating C1, which flags codes far from every database code); the
    second keeps the quantization loss C2 = ||b - f||_1 = sum_i (1 - |f_i|) large (C2 flags a small
    one; b = sign(f) has zero gradient, so the term is differentiated as sum_i (1 - |f_i|)); the
    third keeps the blur disagreement C3 small (C3 flags a large one). With ``targets`` None the
    attack is untargeted: h_t = -b(x), the code farthest from the clean one, so the first term
    is K - D(f(x'), b(x)) and the attack moves away from b(x). The paper sweeps lambda1 over
    [0, 0.03] at lambda2 in {0.3, 3}; its Table 4 uses lambda1 = 0.0075, the default here.

    targets : (N, K) +-1 tensor of target codes h_t (e.g. DHTA anchors), or None.
    Returns (N, C, H, W) adversarial images.
    """
    for name, value in (("lambda1", lambda1), ("lambda2", lambda2)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    mean_blur(x[:1], blur)  # checks the window against the image size
    if targets is None:
        targets = -codes_of(model, x)
    n_bits = targets.shape[-1] if isinstance(targets, torch.Tensor) and targets.dim() == 2 else -1
    targets = _check_targets(targets, x, n_bits)
    n = len(x)

    def forward(z):  # f(x') and f(t(x')) in one batch
        out = model(torch.cat([z, mean_blur(z, blur)]))
        return out[:n], out[n:]

    def loss(out):
        f, f_t = out
        reach = (n_bits - (f * targets).sum(1)) / 2
        quantization = (1.0 - f.abs()).sum(1)
        disagreement = (n_bits - (f_t * f).sum(1)) / 2
        return -(reach - lambda1 * quantization + lambda2 * disagreement)

    return pgd(model, x, loss, eps=eps, alpha=alpha, steps=steps, random_start=random_start, seed=seed,
               first_index=first_index, forward=forward)


def hashing_attack(name: str, model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor | None = None, *,
                   seed: int = 0, first_index: int = 0, **settings) -> torch.Tensor:
    """The attack ``name`` (one of :data:`ATTACKS`) with its :data:`DEFAULTS` updated by ``settings``.

    targets : (N, K) +-1 target codes: required by "dhta" (its anchors), optional for "detector"
        (None: untargeted), refused by "hamming" and "cw".

    dhta's ``n_t`` is a setting of its anchors (:func:`dhta_targets`), not of the attack; it is
    accepted here, and ignored, so that one settings dict describes a whole run.
    """
    if name not in DEFAULTS:
        raise ValueError(f"attack: expected one of {', '.join(ATTACKS)}, got {name!r}")
    unknown = sorted(set(settings) - set(DEFAULTS[name]))
    if unknown:
        raise ValueError(f"{unknown[0]}: not a setting of the {name} attack (its settings: "
                         f"{', '.join(DEFAULTS[name])})")
    options = {**DEFAULTS[name], **settings}
    if name == "dhta":
        if targets is None:
            raise ValueError("targets: the dhta attack needs anchor codes (see dhta_targets)")
        options.pop("n_t")
        return dhta(model, x, targets, seed=seed, first_index=first_index, **options)
    if name == "detector":
        return detector_attack(model, x, targets, seed=seed, first_index=first_index, **options)
    if targets is not None:
        raise ValueError(f"targets: the {name} attack is untargeted; it takes no target codes")
    if name == "cw":
        return cw(model, x, **options)
    return hamming_attack(model, x, seed=seed, first_index=first_index, **options)
