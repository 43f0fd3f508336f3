"""Training of base models: metric learning (triplet loss, semi-hard mining, optional GDML) and CSQ hashing.

* ``task="dml"``: the triplet loss with margin m (0.2, REFERENCE §3) over
  every anchor-positive pair of a batch, each with its semi-hard negative
  (FaceNet, Schroff et al. 2015): the nearest negative farther from the
  anchor than the positive, or the farthest negative when none is. Batches
  hold ``per_class`` images of each class they draw, so every batch has
  positives. ``noise_sigma > 0`` adds Gaussian noise to every training image
  (RetrievalGuard's GDML, which trains the base model for the smoothing).
* ``task="hash"``: CSQ (REFERENCE §2): binary cross entropy between
  ``(f + 1) / 2`` and ``(c + 1) / 2`` for the class centre c of
  :func:`minrr.hashing.hash_centers.hash_centers`, plus ``lambda mean((|f| - 1)^2)``.

Steps go through :meth:`TorchBackend.train_step`; the optimiser is Adam. The epoch loop is
:func:`minrr.backends.defences.fit`, shared with adversarial training.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from .torch_backend import TorchBackend

__all__ = ["TASKS", "pairwise_distances", "triplet_semihard_loss", "csq_loss", "training_batches", "train",
           "evaluate"]

TASKS = ("dml", "hash")
HEAD_OF_TASK = {"dml": "embedding", "hash": "hash"}


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, B) Euclidean distances of (B, dim) embeddings, with a finite gradient at 0."""
    sq = embeddings.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * embeddings @ embeddings.T).clamp_min(0.0)
    return d2.clamp_min(1e-12).sqrt() * (d2 > 0)


def triplet_semihard_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Mean of ``max(0, d(a, p) - d(a, n) + margin)`` over all anchor-positive pairs, n semi-hard.

    Parameters
    ----------
    embeddings : (B, dim), l2-normalised.
    labels : (B,) int.

    Memory is O(B^3) booleans (2 MB at B = 128). A batch without positive pairs gives 0.
    """
    d = pairwise_distances(embeddings)
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    negative = ~same
    anchor, pos = positive.nonzero(as_tuple=True)
    if len(anchor) == 0:
        return embeddings.sum() * 0.0
    d_ap = d[anchor, pos]                                   # (P,)
    d_an = d[anchor]                                        # (P, B)
    neg = negative[anchor]                                  # (P, B)
    semi_hard = neg & (d_an > d_ap[:, None])
    inf = torch.tensor(float("inf"), device=d.device, dtype=d.dtype)
    nearest_semi_hard = torch.where(semi_hard, d_an, inf).min(dim=1).values
    farthest = torch.where(neg, d_an, -inf).max(dim=1).values
    chosen = torch.where(semi_hard.any(dim=1), nearest_semi_hard, farthest)
    has_negative = neg.any(dim=1)
    if not has_negative.any():
        return embeddings.sum() * 0.0
    return F.relu(d_ap - chosen + margin)[has_negative].mean()


def csq_loss(codes: torch.Tensor, centers: torch.Tensor, quantization: float = 1e-4) -> torch.Tensor:
    """CSQ loss: ``BCE((f + 1)/2, (c + 1)/2) + lambda mean((|f| - 1)^2)``.

    Parameters
    ----------
    codes : (B, K) f = tanh(u), in (-1, 1).
    centers : (B, K) +-1, each item's hash centre c.
    quantization : lambda (1e-4 in CSQ).
    """
    probability = ((codes + 1.0) / 2.0).clamp(0.0, 1.0)
    center_loss = F.binary_cross_entropy(probability, (centers + 1.0) / 2.0)
    return center_loss + quantization * (codes.abs() - 1.0).pow(2).mean()


def training_batches(labels: np.ndarray, batch_size: int, per_class: int | None, rng) -> list[np.ndarray]:
    """One epoch of index batches; every item once.

    ``per_class`` None: a random permutation cut into batches. Otherwise each
    class's items are shuffled and cut into groups of ``per_class``; the
    groups are shuffled and packed ``batch_size // per_class`` to a batch.
    """
    if per_class is None:
        order = rng.permutation(len(labels))
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    groups = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        groups += [members[i:i + per_class] for i in range(0, len(members), per_class)]
    order = rng.permutation(len(groups))
    per_batch = max(1, batch_size // per_class)
    return [np.concatenate([groups[g] for g in order[i:i + per_batch]]) for i in range(0, len(order), per_batch)]


def train(model, images, labels, *, task: str, epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
          margin: float = 0.2, noise_sigma: float = 0.0, per_class: int = 4, csq_lambda: float = 1e-4,
          seed: int = 0, backend: TorchBackend | None = None, progress: bool = False) -> list[float]:
    """Train ``model`` in place; returns the loss of every step.

    Parameters
    ----------
    model : a :class:`~minrr.backends.models.RetrievalNet` (its head must suit the task).
    images : (N, C, H, W) uint8 or float in [0, 1].
    labels : (N,) int; for "hash" the classes, in sorted order, get the centres 0, 1, ...
    task : "dml" or "hash".
    noise_sigma : GDML's Gaussian noise on the inputs ("dml" and "hash" alike).
    per_class : images per class in a "dml" batch.
    seed : seeds the batches, the noise and the hash centres.
    """
    from .defences import fit  # the one epoch loop, shared with the defences

    return fit(model, images, labels, task=task, epochs=epochs, batch_size=batch_size, lr=lr, margin=margin,
               noise_sigma=noise_sigma, per_class=per_class, csq_lambda=csq_lambda, seed=seed, backend=backend,
               progress=progress).history


def evaluate(model, task: str, queries, query_labels, *, database=None, database_labels=None,
             backend: TorchBackend | None = None, batch_size: int = 256) -> dict:
    """Benign retrieval metrics of a trained model.

    "dml": :func:`minrr.metrics.report.retrieval_metrics` (Recall@1, 2, 4, 8, mAP, mAP@R,
    R-precision, NMI under pytorch-metric-learning's keys, as ``minrr evaluate``) with the
    queries as their own gallery, each leaving itself out (robrank's protocol). "hash":
    ``mean_average_precision`` over the whole database of the Hamming ranking of the codes
    ``sign(f)`` (DeepHash / CSQ convention; ``database`` is required).
    """
    from minrr.metrics.hashing import hamming_map
    from minrr.metrics.report import retrieval_metrics

    backend = backend or TorchBackend()
    queries_out = backend.embed(model, queries, batch_size=batch_size)
    if task == "dml":
        return retrieval_metrics(queries_out, query_labels, ks=(1, 2, 4, 8))
    if task != "hash":
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    if database is None:
        raise ValueError("database: required to evaluate a hashing model")
    database_out = backend.embed(model, database, batch_size=batch_size)
    codes = {name: np.where(out >= 0, 1, -1) for name, out in (("queries", queries_out), ("database", database_out))}
    return {"mean_average_precision": float(hamming_map(codes["queries"], codes["database"], query_labels,
                                                        database_labels))}
