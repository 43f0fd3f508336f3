"""The metric-learning attack suite of robrank (Zhou et al.): CA+, CA-, QA+, QA-, TMA, ES, LTM, GTM, GTT.

Protocol (robrank; REFERENCE §3). The test split is both the queries and the gallery; the
embeddings are l2-normalised (``F.normalize`` of the model's outputs, a no-op for an
embedding head) and compared by Euclidean distance; each query leaves its own item out of
its ranking. The gallery is the clean test embeddings throughout. Every attack is
white-box L-inf PGD on the engine :func:`minrr.backends.attacks.pgd`: eps 8/255, alpha
("step") 3/255, 32 sign steps, no random start, model in eval mode with frozen parameters.
The whole loop runs on the model's device; only the per-item results leave it.

Each test item of the run (all N, or a seeded subset of ``max_queries``) is one trial of
each attack, as in robrank's evaluation over the test loader with M = W = 1:

====== =========== ========================================================================
attack perturbs    per trial (losses are robrank's, maximised here as their negatives)
====== =========== ========================================================================
CA+    candidate c a query q drawn uniformly from the other N - 1 items; c' is pulled ahead
                   of q's gallery: maximise ``-mean_j relu(d(c', q) - d(x_j, q))``
CA-    candidate c q drawn uniformly from c's own top 1% (the ``int(0.01 N)`` nearest other
                   items, at least 1); maximise ``-mean_j relu(d(x_j, q) - d(c', q))``
QA+    query q     a candidate c drawn uniformly from the other N - 1 items;
                   maximise ``-mean_j relu(d(q', c) - d(q', x_j))``
QA-    query q     c drawn uniformly from q's top 1%; maximise ``-mean_j relu(d(q', x_j) - d(q', c))``
TMA    query q     a target t drawn uniformly from the other items; maximise ``cos(h(q'), h(t))``
ES     query q     maximise ``||h(q') - h(q)||`` (``F.pairwise_distance``: its 1e-6 offset gives
                   a nonzero gradient at the start, as robrank's 1e-7 does)
LTM    query q     maximise ``-relu(max_n d(q', n) - min_p d(q', p))`` over the negatives n
                   (other labels) and positives p (the query's label, its own item excluded)
GTM    query q     pull q' towards t, the nearest clean item whose label differs from q's:
                   maximise ``-d(q', t)``
GTT    query q     push out t, q's clean top-1 item: maximise ``-mean_j relu(d(q', x_j) - d(q', t))``
====== =========== ========================================================================

The means over j run over the gallery without the query's own item and the candidate. The
draws use one generator per (item, attack), seeded with ``SeedSequence(seed,
spawn_key=(index, k))`` (= ``query_seed(seed, index).spawn(k + 1)[k]``, k the attack's
position in :data:`~minrr.scores.ATTACKS`), so they depend neither on the batch size nor on
the other items or attacks of the run.

Measurements (float64, on the device; ties go to the smaller gallery index, as in
:mod:`minrr.metrics.retrieval`):

* rank (CA, QA): the number of the other N - 2 items (neither the query's own item nor the
  candidate) ranked before the candidate in the query's ranking, divided by N - 2: 0 is the
  top, 1 the bottom. robrank counts the query's own item and the candidate's clean copy too
  and divides by N, which differs by at most 2/N;
* R@1 (ES, LTM, GTM): the attacked query's nearest gallery item (its own item excluded) has
  its label; queries whose label has no other item are left out, as in ``recall_at_k``;
* GTT: the fraction of queries whose clean top-1 item is still among their first 4;
* TMA: the mean cosine to the target; ES: the mean shift ``||h(q') - h(q)||`` in [0, 2].

robrank's two known quirks, reproduced with ``robrank_compat=True``:

* GTM: robrank picks the target as the position of the nearest non-matching item *within
  the subset of non-matching items*, then uses that position as a gallery index, so the
  target is item ``k`` where k counts the non-matching items before the intended one. It
  also calls "non-matching" the items whose label differs from the clean top-1's (not the
  query's); the two agree whenever the clean top-1 is correct. The fix uses the intended
  item and the query's label.
* LTM: robrank's ``mask_same.scatter(...)`` is not in place, so the query's own clean item
  stays among its positives (``min_p d(q', p)`` starts at 0 and the attack first pushes q'
  away from its own clean embedding). The fix leaves it out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

import minrr
from minrr.data.loaders import check_images, to_unit_float
from minrr.progress import progress_bar
from minrr.scores import ATTACKS, RECORD_FORMAT, parse_attack_record

from .attacks import frozen, pgd
from .base import check_attack, check_whole
from .torch_backend import default_device

__all__ = ["ROBRANK_EPS", "ROBRANK_ALPHA", "ROBRANK_STEPS", "TOP_FRACTION", "RETAIN_TOP", "RankingSetup",
           "prepare", "exact_distances", "rank_fraction", "nearest_other", "retained_in_top", "top1_hits",
           "gtm_targets", "ltm_masks", "attack_items", "run_attack", "robrank_suite"]

ROBRANK_EPS = 8 / 255
ROBRANK_ALPHA = 3 / 255
ROBRANK_STEPS = 32
TOP_FRACTION = 0.01
"""CA- and QA- draw from the ``int(TOP_FRACTION N)`` nearest other items (robrank's "top 1%")."""
RETAIN_TOP = 4
"""GTT counts a query as keeping its clean top-1 item when it stays among the first RETAIN_TOP."""

_PERTURBS = {"CA+": "candidate", "CA-": "candidate"}  # every other attack perturbs the query
_COMPAT_ATTACKS = ("LTM", "GTM")


@dataclass(frozen=True)
class RankingSetup:
    """One retrieval problem of the protocol, with its clean gallery on the device.

    model : the embedding network (any ``nn.Module`` mapping images to (B, dim)).
    images : (N, C, H, W) uint8 or float in [0, 1], on the host.
    labels : (N,) int64 on the device.
    gallery : (N, dim) float l2-normalised clean embeddings on the device (the model's dtype).
    gallery64 : the same values in float64, for the measurements.
    batch_size : items attacked at once.
    """

    model: torch.nn.Module
    images: np.ndarray
    labels: torch.Tensor
    gallery: torch.Tensor
    gallery64: torch.Tensor
    batch_size: int

    @property
    def device(self) -> torch.device:
        return self.gallery.device

    def __len__(self) -> int:
        return len(self.labels)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """l2-normalised embeddings of a batch on the device (differentiable)."""
        return F.normalize(self.model(x), dim=1)

    def batch(self, items: np.ndarray) -> torch.Tensor:
        """Images ``items`` as floats in [0, 1] on the device, in the gallery's dtype."""
        return _device_batch(self.images, items, self.gallery)


def _device_batch(images: np.ndarray, items: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(to_unit_float(images[items])).to(like.device, like.dtype)


def prepare(model: torch.nn.Module, images, labels, *, device=None, batch_size: int = 128) -> RankingSetup:
    """Embed the test split once (the clean gallery) and check the problem.

    Parameters
    ----------
    model : ``nn.Module``; moved to ``device`` (default: cuda when available).
    images : (N, C, H, W) uint8 or float in [0, 1].
    labels : (N,) int, at least two classes (LTM and GTM need other-label items).
    batch_size : items per forward pass and per attack batch.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch nn.Module, got {type(model).__name__}")
    images = check_images(images, name="images")
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels: expected ({len(images)},) integer labels, got shape {labels.shape}, "
                         f"dtype {labels.dtype}")
    if len(images) < 3:
        raise ValueError(f"images: the protocol needs at least 3 test items (a query, a candidate and "
                         f"another item), got {len(images)}")
    if len(np.unique(labels)) < 2:
        raise ValueError("labels: the test split has one class; LTM and GTM need items of other labels")
    batch_size = check_whole(batch_size, "batch_size", 1)
    try:
        device = torch.device(default_device() if device is None else device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ValueError(f"device: {device!r} is not usable here ({str(exc).splitlines()[0]})") from None
    model = model.to(device)
    like = next(model.parameters())
    parts = []
    with torch.no_grad(), frozen(model):
        for start in range(0, len(images), batch_size):
            x = _device_batch(images, np.arange(start, min(start + batch_size, len(images))), like)
            parts.append(F.normalize(model(x), dim=1))
    gallery = torch.cat(parts)
    return RankingSetup(model, images, torch.as_tensor(labels, dtype=torch.int64, device=device), gallery,
                        gallery.double(), batch_size)


# ---- measurements (float64, ties to the smaller gallery index) --------------------------------------

def exact_distances(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """(B, N) Euclidean distances from coordinate differences (identical vectors are at exactly 0)."""
    return torch.cdist(queries, gallery, compute_mode="donot_use_mm_for_euclid_dist")


def _ranked_before(d: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: item j precedes ``item[b]`` in row b (closer, or as close with a smaller index)."""
    at = d.gather(1, item[:, None])
    index = torch.arange(d.shape[1], device=d.device)
    return (d < at) | ((d == at) & (index[None, :] < item[:, None]))


def rank_fraction(d: torch.Tensor, candidate: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Rank of ``candidate[b]`` in row b, as a fraction of the other N - 2 items (0 top, 1 bottom).

    d : (B, N) distances of the query (or, for a candidate attack, from the query to the
        gallery with the candidate's entry replaced by its attacked distance).
    candidate, query : (B,) gallery indices; neither counts among the items ranked before.
    """
    before = _ranked_before(d, candidate)
    before.scatter_(1, query[:, None], False)
    before.scatter_(1, candidate[:, None], False)
    return before.sum(1).double() / (d.shape[1] - 2)


def nearest_other(d: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's nearest item other than ``query[b]`` (ties: the smaller index)."""
    masked = d.scatter(1, query[:, None], math.inf)
    return masked.argmin(1)  # argmin returns the first minimum


def retained_in_top(d: torch.Tensor, query: torch.Tensor, item: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) bool: ``item[b]`` is among the first k of row b once ``query[b]`` is left out."""
    before = _ranked_before(d, item)
    before.scatter_(1, query[:, None], False)
    return before.sum(1) < k


def top1_hits(d: torch.Tensor, query: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall@1 per query: (hit, answerable), (B,) bools each.

    hit: the nearest other item has the query's label; answerable: the query's label has
    another item in the gallery (the others are left out of R@1, as in ``recall_at_k``).
    """
    own = labels[query]
    hit = labels[nearest_other(d, query)] == own
    answerable = (labels[None, :] == own[:, None]).sum(1) > 1
    return hit, answerable


# ---- selections -------------------------------------------------------------------------------------

def _item_generators(seed: int, items: np.ndarray, attack: str) -> list[np.random.Generator]:
    k = ATTACKS.index(attack)
    return [np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(int(i), k))) for i in items]


def _uniform_other(generators, items: np.ndarray, n: int, device) -> torch.Tensor:
    """An index drawn uniformly from the n - 1 items other than each item."""
    draw = np.array([g.integers(n - 1) for g in generators], dtype=np.int64)
    return torch.as_tensor(draw + (draw >= items), device=device)


def _from_top(generators, d_clean: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """An index drawn uniformly from each row's ``max(1, int(0.01 N))`` nearest other items."""
    top = max(1, int(TOP_FRACTION * d_clean.shape[1]))
    order = d_clean.scatter(1, items[:, None], math.inf).sort(dim=1, stable=True).indices[:, :top]
    pick = torch.as_tensor([g.integers(top) for g in generators], device=d_clean.device)
    return order.gather(1, pick[:, None])[:, 0]


def gtm_targets(d_clean: torch.Tensor, query: torch.Tensor, labels: torch.Tensor, *,
                robrank_compat: bool = False) -> torch.Tensor:
    """GTM's target per query: the nearest clean item whose label differs from the query's.

    d_clean : (B, N) clean distances of the queries; query : (B,) their indices.
    robrank_compat : robrank's choice instead: with U the items whose label differs from
        the clean top-1's, the position within U (in index order) of U's nearest item,
        used as a gallery index.
    """
    d = d_clean.scatter(1, query[:, None], math.inf)
    reference = labels[d.argmin(1)] if robrank_compat else labels[query]
    other = labels[None, :] != reference[:, None]
    intended = torch.where(other, d, math.inf).argmin(1)
    if not robrank_compat:
        return intended
    index = torch.arange(d.shape[1], device=d.device)
    return (other & (index[None, :] < intended[:, None])).sum(1)


def ltm_masks(query: torch.Tensor, labels: torch.Tensor, *,
              robrank_compat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """LTM's (positives, negatives), (B, N) bools: the query's label without / with other labels.

    The query's own item is not a positive, unless ``robrank_compat`` (robrank keeps it).
    """
    same = labels[None, :] == labels[query][:, None]
    positives = same if robrank_compat else same.scatter(1, query[:, None], False)
    return positives, ~same


# ---- the attacks ------------------------------------------------------------------------------------

def _cross_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, N) Euclidean distances of unit vectors, ``sqrt(2 - 2 a.b)``, differentiable (gradient 0 at 0)."""
    return (2.0 - 2.0 * a @ b.T).clamp_min(1e-12).sqrt()


def _mean_over(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return (values * keep).sum(1) / keep.sum(1).clamp_min(1)


def _others(n: int, *excluded: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: every item but the excluded indices of each row."""
    keep = torch.ones(len(excluded[0]), n, dtype=torch.bool, device=excluded[0].device)
    for index in excluded:
        keep.scatter_(1, index[:, None], False)
    return keep


def _attack_batch(setup: RankingSetup, name: str, items: np.ndarray, settings: dict, seed: int,
                  robrank_compat: bool) -> dict[str, torch.Tensor]:
    """Attack ``name`` on one batch of test items; per-item measurements on the device."""
    n = len(setup)
    own = torch.as_tensor(items, device=setup.device)
    gallery, gallery64, labels = setup.gallery, setup.gallery64, setup.labels
    d_clean = exact_distances(gallery64[own], gallery64)
    generators = _item_generators(seed, items, name)
    x = setup.batch(items)
    sign = 1.0 if name.endswith("+") else -1.0

    def attack(loss):
        """The attacked items' embeddings, float64."""
        adv = pgd(setup.model, x, loss, forward=setup.embed, **settings)
        with torch.no_grad():
            return setup.embed(adv).double()

    if name in ("CA+", "CA-"):
        query = _uniform_other(generators, items, n, setup.device) if name == "CA+" else \
            _from_top(generators, d_clean, own)
        target, row = gallery[query], _cross_distances(gallery[query], gallery)
        keep = _others(n, query, own)
        out = attack(lambda z: -_mean_over(F.relu(sign * ((z - target).norm(dim=1)[:, None] - row)), keep))
        d_query = exact_distances(gallery64[query], gallery64)
        d_after = d_query.scatter(1, own[:, None], (out - gallery64[query]).norm(dim=1)[:, None])
        return {"rank_before": rank_fraction(d_query, own, query), "rank_after": rank_fraction(d_after, own, query)}
    if name in ("QA+", "QA-"):
        candidate = _uniform_other(generators, items, n, setup.device) if name == "QA+" else \
            _from_top(generators, d_clean, own)
        keep = _others(n, own, candidate)

        def loss(z):
            d = _cross_distances(z, gallery)
            return -_mean_over(F.relu(sign * (d.gather(1, candidate[:, None]) - d)), keep)
        out = attack(loss)
        d_after = exact_distances(out, gallery64)
        return {"rank_before": rank_fraction(d_clean, candidate, own),
                "rank_after": rank_fraction(d_after, candidate, own)}
    if name == "TMA":
        target = _uniform_other(generators, items, n, setup.device)
        out = attack(lambda z: (z * gallery[target]).sum(1))
        return {"cosine": (out * gallery64[target]).sum(1) / out.norm(dim=1) / gallery64[target].norm(dim=1)}
    if name == "ES":
        out = attack(lambda z: F.pairwise_distance(z, gallery[own]))
        hit, answerable = top1_hits(exact_distances(out, gallery64), own, labels)
        return {"shift": (out - gallery64[own]).norm(dim=1), "hit": hit, "answerable": answerable}
    if name == "LTM":
        positives, negatives = ltm_masks(own, labels, robrank_compat=robrank_compat)

        def loss(z):
            d = _cross_distances(z, gallery)
            farthest_negative = torch.where(negatives, d, -math.inf).amax(1)
            nearest_positive = torch.where(positives, d, math.inf).amin(1)
            return -F.relu(farthest_negative - nearest_positive)
        out = attack(loss)
    elif name == "GTM":
        target = gtm_targets(d_clean, own, labels, robrank_compat=robrank_compat)
        out = attack(lambda z: -(z - gallery[target]).norm(dim=1))
    elif name == "GTT":
        top1 = nearest_other(d_clean, own)
        keep = _others(n, own, top1)

        def loss(z):
            d = _cross_distances(z, gallery)
            return -_mean_over(F.relu(d - d.gather(1, top1[:, None])), keep)
        out = attack(loss)
        return {"retained": retained_in_top(exact_distances(out, gallery64), own, top1, RETAIN_TOP)}
    else:
        raise ValueError(f"attack: expected one of {', '.join(ATTACKS)}, got {name!r}")
    hit, answerable = top1_hits(exact_distances(out, gallery64), own, labels)
    return {"hit": hit, "answerable": answerable}


def attack_items(n: int, max_queries: int | None, seed: int) -> np.ndarray:
    """The test items attacked: all n, or ``max_queries`` of them drawn without replacement with
    ``default_rng(SeedSequence(seed))``, in increasing order."""
    if max_queries is None or max_queries >= n:
        return np.arange(n)
    max_queries = check_whole(max_queries, "max_queries", 1)
    return np.sort(np.random.default_rng(np.random.SeedSequence(seed)).choice(n, max_queries, replace=False))


def _recall(values: dict[str, np.ndarray]) -> float:
    answerable = values["answerable"]
    if not answerable.any():
        raise ValueError("labels: no attacked query has another item of its label; Recall@1 is undefined")
    return float(values["hit"][answerable].mean())


def _entry(name: str, values: dict[str, np.ndarray]) -> dict:
    """The record fields of one attack from its per-item values (fractions; ranks per trial)."""
    if name in ("CA+", "CA-", "QA+", "QA-"):
        return {"rank_before": values["rank_before"].tolist(), "rank_after": values["rank_after"].tolist()}
    if name == "TMA":
        return {"cosine": float(np.clip(values["cosine"].mean(), -1.0, 1.0))}
    if name == "ES":
        return {"shift": float(np.clip(values["shift"].mean(), 0.0, 2.0)), "r1_after": _recall(values)}
    if name == "GTT":
        return {"retained": float(values["retained"].mean())}
    return {"r1_after": _recall(values)}


def run_attack(setup: RankingSetup, name: str, items=None, *, eps: float = ROBRANK_EPS,
               alpha: float = ROBRANK_ALPHA, steps: int = ROBRANK_STEPS, seed: int = 0,
               robrank_compat: bool = False, bar=None) -> dict:
    """One attack of the suite over ``items``: its ``minrr-attacks/1`` entry.

    Parameters
    ----------
    setup : from :func:`prepare`.
    name : one of CA+, CA-, QA+, QA-, TMA, ES, LTM, GTM, GTT.
    items : (n,) test indices attacked (the candidates of CA+/CA-, the queries otherwise);
        default all.
    eps, alpha, steps : the L-inf PGD settings (robrank: 8/255, 3/255, 32).
    seed : seeds the per-item draws (module docstring).
    robrank_compat : reproduce robrank's GTM and LTM quirks (module docstring).
    bar : an optional tqdm bar, advanced by the items done.

    Returns
    -------
    dict with ``attack``, the measured fields (``rank_before``/``rank_after`` per trial,
    ``cosine``, ``shift``, ``r1_after``, ``retained``; fractions) and ``params``.
    """
    if name not in ATTACKS:
        raise ValueError(f"attack: expected one of {', '.join(ATTACKS)}, got {name!r}")
    eps, alpha, steps, _ = check_attack(eps, alpha, steps, "linf")
    seed = check_whole(seed, "seed", 0)
    items = np.arange(len(setup)) if items is None else np.asarray(items, dtype=np.int64)
    if items.ndim != 1 or len(items) == 0 or items.min() < 0 or items.max() >= len(setup):
        raise ValueError(f"items: expected a non-empty list of test indices in [0, {len(setup)})")
    settings = {"eps": eps, "alpha": alpha, "steps": steps}
    parts: dict[str, list] = {}
    for start in range(0, len(items), setup.batch_size):
        batch = items[start:start + setup.batch_size]
        for key, value in _attack_batch(setup, name, batch, settings, seed, robrank_compat).items():
            parts.setdefault(key, []).append(value.cpu().numpy())
        if bar is not None:
            bar.update(len(batch))
    values = {key: np.concatenate(chunks) for key, chunks in parts.items()}
    params = {"eps": eps, "alpha": alpha, "steps": steps, "norm": "linf", "random_start": False,
              "perturbs": _PERTURBS.get(name, "query"), "trials": len(items)}
    if name in ("CA-", "QA-"):
        params["top"] = max(1, int(TOP_FRACTION * len(setup)))
    if name in _COMPAT_ATTACKS:
        params["robrank_compat"] = bool(robrank_compat)
    return {"attack": name, **_entry(name, values), "params": params}


def _benign_recall(setup: RankingSetup, items: np.ndarray) -> float:
    hits, answerable = [], []
    for start in range(0, len(items), setup.batch_size):
        own = torch.as_tensor(items[start:start + setup.batch_size], device=setup.device)
        hit, ok = top1_hits(exact_distances(setup.gallery64[own], setup.gallery64), own, setup.labels)
        hits.append(hit.cpu().numpy())
        answerable.append(ok.cpu().numpy())
    return _recall({"hit": np.concatenate(hits), "answerable": np.concatenate(answerable)})


def robrank_suite(model: torch.nn.Module, images, labels, *, attacks=ATTACKS, eps: float = ROBRANK_EPS,
                  alpha: float = ROBRANK_ALPHA, steps: int = ROBRANK_STEPS, max_queries: int | None = None,
                  seed: int = 0, batch_size: int = 128, device=None, robrank_compat: bool = False,
                  progress: bool = False, meta: dict | None = None, finished=None, on_attack=None) -> dict:
    """Run the robrank attack suite on a test split; returns the ``minrr-attacks/1`` record.

    Parameters
    ----------
    model : the embedding network; images : (N, C, H, W) uint8 or float in [0, 1]; labels : (N,) int.
    attacks : the attacks to run (default all nine; a record that ``minrr score`` reads needs all).
    eps, alpha, steps : L-inf PGD settings (robrank: 8/255, 3/255, 32).
    max_queries : attack a seeded subset of that many test items (:func:`attack_items`);
        the gallery is always the whole split.
    seed : seeds the subset and the per-item draws.
    batch_size : items per attack batch; changes nothing but speed and memory.
    device : torch device (default: cuda when available).
    robrank_compat : reproduce robrank's GTM and LTM quirks.
    progress : report progress on stderr (:func:`minrr.progress.progress_bar`).
    meta : extra provenance (model, data...) merged into the record's ``meta``.
    finished : ``{name: entry}`` of attacks already run with these same settings (a resumed
        run); they are taken as they are.
    on_attack : called with each new entry as soon as its attack is done (e.g. to save it).

    Returns
    -------
    dict: ``format``, ``benign_r1`` (Recall@1 of the attacked queries, clean), ``attacks``
    (one entry per attack in the order of ``attacks``, see :func:`run_attack`) and ``meta``.
    Every proportion is a fraction. A record of all nine attacks is checked with
    :func:`minrr.scores.parse_attack_record`.
    """
    attacks = tuple(attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks or len(set(attacks)) != len(attacks):
        raise ValueError(f"attacks: expected distinct names among {', '.join(ATTACKS)}, got {', '.join(attacks)}")
    finished = dict(finished or {})
    if any(name not in attacks for name in finished):
        raise ValueError(f"finished: attacks outside {', '.join(attacks)}: {', '.join(sorted(finished))}")
    check_attack(eps, alpha, steps, "linf")
    seed = check_whole(seed, "seed", 0)
    setup = prepare(model, images, labels, device=device, batch_size=batch_size)
    items = attack_items(len(setup), max_queries, seed)
    record = {"format": RECORD_FORMAT, "benign_r1": _benign_recall(setup, items), "attacks": [],
              "meta": {**(meta or {}), "protocol": "robrank", "seed": seed, "n_gallery": len(setup),
                       "n_queries": len(items), "max_queries": max_queries, "robrank_compat": bool(robrank_compat),
                       "device": str(setup.device), "minrr": minrr.__version__, "torch": torch.__version__}}
    with progress_bar(len(items) * len(attacks), progress, "trial", initial=len(items) * len(finished),
                      desc="minrr attack") as bar:
        for name in attacks:
            if name not in finished:
                finished[name] = run_attack(setup, name, items, eps=eps, alpha=alpha, steps=steps, seed=seed,
                                            robrank_compat=robrank_compat, bar=bar)
                if on_attack is not None:
                    on_attack(finished[name])
            record["attacks"].append(finished[name])
    if set(attacks) == set(ATTACKS):
        parse_attack_record(record)
    return record
