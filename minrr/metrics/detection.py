"""Detection metrics: adversarial queries are the positives, benign queries the negatives.

Scores are oriented so that larger means more suspicious (flip the sign of a criterion
such as UMCD's C2, where small is suspicious, before passing it). Rates that a set of
queries cannot define (TPR without adversarial queries, FPR without benign ones) are NaN.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from minrr.io import as_float_array

__all__ = ["check_adversarial_labels", "detection_rates", "roc_curve", "roc_auc"]


def check_adversarial_labels(labels, n: int | None = None, *, name: str = "is_adversarial") -> np.ndarray:
    """Validate ``(n,)`` 0/1 (or bool) labels, 1 = adversarial; return them as bool."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{name}: expected (n,) labels, 1 = adversarial and 0 = benign, got shape {y.shape}")
    if y.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected 0/1 or boolean labels, got dtype {y.dtype}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"{name}: labels must be 0 (benign) or 1 (adversarial)")
    if n is not None and len(y) != n:
        raise ValueError(f"{name}: {len(y)} labels for {n} queries; the counts must match")
    return y.astype(bool)


def detection_rates(flags, is_adversarial) -> dict[str, float]:
    """TPR, miss rate and FPR of a detector's decisions.

    Parameters
    ----------
    flags : (n,) bool, True where the detector flags the query as adversarial.
    is_adversarial : (n,) 0/1 or bool, the truth.

    Returns
    -------
    dict with ``tpr`` (detection rate, flagged adversarial / adversarial), ``fnr`` (miss
    rate, 1 - tpr), ``fpr`` (flagged benign / benign), ``n_adversarial``, ``n_benign``.
    """
    flags = check_adversarial_labels(flags, name="flags")
    y = check_adversarial_labels(is_adversarial, len(flags))
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tpr = np.count_nonzero(flags & y) / n_pos if n_pos else np.nan
    fpr = np.count_nonzero(flags & ~y) / n_neg if n_neg else np.nan
    return {"tpr": tpr, "fnr": 1.0 - tpr, "fpr": fpr, "n_adversarial": n_pos, "n_benign": n_neg}


def _scores_and_labels(scores, is_adversarial) -> tuple[np.ndarray, np.ndarray]:
    s = as_float_array(scores, name="scores", ndim=1)
    y = check_adversarial_labels(is_adversarial, len(s))
    if y.all() or not y.any():
        raise ValueError("is_adversarial: ROC and AUC need both adversarial (1) and benign (0) queries")
    return s, y


def roc_curve(scores, is_adversarial) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of a suspiciousness score, one point per distinct score value.

    Parameters
    ----------
    scores : (n,) float, larger is more suspicious.
    is_adversarial : (n,) 0/1 or bool.

    Returns
    -------
    fpr, tpr : (m + 1,) float, from (0, 0) to (1, 1); point j flags ``scores >= thresholds[j]``.
    thresholds : (m + 1,) float, +inf followed by the m distinct scores in decreasing order.
    """
    s, y = _scores_and_labels(scores, is_adversarial)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_each_value = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    true_pos = np.cumsum(y)[last_of_each_value]
    false_pos = (last_of_each_value + 1) - true_pos
    tpr = np.r_[0.0, true_pos / y.sum()]
    fpr = np.r_[0.0, false_pos / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[last_of_each_value]]


def roc_auc(scores, is_adversarial) -> float:
    """Exact area under the ROC curve, ties counted half.

    Equals P(s_adv > s_benign) + P(s_adv = s_benign) / 2 over all adversarial-benign
    pairs (the Mann-Whitney U statistic over n_adv n_benign), computed from average ranks.
    """
    s, y = _scores_and_labels(scores, is_adversarial)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    rank_sum = rankdata(s)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
