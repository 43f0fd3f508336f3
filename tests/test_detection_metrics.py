"""Detection metrics: exact AUC against a brute-force pair count, ROC, rates."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minrr.metrics.detection import check_adversarial_labels, detection_rates, roc_auc, roc_curve


def pair_count_auc(scores, labels):
    """P(adversarial > benign) + P(tie) / 2 over every adversarial-benign pair."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))


both_kinds = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 1)), min_size=2, max_size=60).filter(
    lambda rows: len({y for _, y in rows}) == 2)


@given(both_kinds)
def test_auc_counts_ties_half(rows):
    scores, labels = np.array(rows, dtype=float).T
    assert roc_auc(scores, labels) == pytest.approx(pair_count_auc(scores, labels), abs=1e-12)


@given(both_kinds)
def test_roc_curve_area_is_the_auc_and_points_are_rates(rows):
    scores, labels = np.array(rows, dtype=float).T
    fpr, tpr, thresholds = roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)  # trapezoids: a tie is a diagonal step
    assert area == pytest.approx(roc_auc(scores, labels), abs=1e-12)
    for f, t, threshold in zip(fpr[1:], tpr[1:], thresholds[1:]):
        rates = detection_rates(scores >= threshold, labels)
        assert (rates["fpr"], rates["tpr"]) == pytest.approx((f, t))


def test_perfect_and_reversed_scores():
    labels = np.array([0, 0, 1, 1])
    assert roc_auc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], labels) == 0.5


def test_detection_rates():
    flags = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    labels = np.array([1, 1, 1, 0, 0, 0])
    rates = detection_rates(flags, labels)
    assert rates["tpr"] == pytest.approx(2 / 3) and rates["fnr"] == pytest.approx(1 / 3)
    assert rates["fpr"] == pytest.approx(1 / 3)
    assert (rates["n_adversarial"], rates["n_benign"]) == (3, 3)
    only_adversarial = detection_rates(flags[:3], labels[:3])
    assert only_adversarial["tpr"] == pytest.approx(2 / 3) and np.isnan(only_adversarial["fpr"])


@pytest.mark.parametrize("call, message", [
    (lambda: roc_auc([0.1, 0.2], [1, 1]), "is_adversarial: ROC and AUC need both"),
    (lambda: roc_curve([0.1, 0.2], [0, 0]), "is_adversarial: ROC and AUC need both"),
    (lambda: roc_auc([0.1, 0.2, 0.3], [0, 1]), "is_adversarial: 2 labels for 3 queries"),
    (lambda: roc_auc([0.1, np.nan], [0, 1]), "scores: contains NaN"),
    (lambda: check_adversarial_labels([0, 2]), "is_adversarial: labels must be 0"),
    (lambda: check_adversarial_labels([[0, 1]]), r"is_adversarial: expected \(n,\) labels"),
])
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()
