"""Hashing metrics against brute-force implementations of their definitions (REFERENCE.md section 2)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minrr.hashing import hamming
from minrr.metrics import hashing


def _labels(rng, n, n_classes, multi):
    """Single-label integers, or multi-hot rows (some empty: relevant to nothing)."""
    if multi:
        return (rng.random((n, n_classes)) < 0.3).astype(np.int64)
    return rng.integers(0, n_classes, size=n)


def _relevant(query_label, database_label):
    if np.ndim(query_label) == 0:
        return query_label == database_label
    return int(np.dot(query_label, database_label)) > 0


def _brute_ap(ranking, query_label, database_labels):
    """AP = (1 / R_k) sum over relevant positions j of precision@j; 0 when R_k = 0."""
    relevant = [_relevant(query_label, database_labels[i]) for i in ranking]
    precisions = [sum(relevant[: j + 1]) / (j + 1) for j in range(len(ranking)) if relevant[j]]
    return (sum(precisions) / len(precisions) if precisions else 0.0), len(precisions)


def _problem(seed, n, n_queries, k, multi):
    rng = np.random.default_rng(seed)
    database_labels = _labels(rng, n, 4, multi)
    query_labels = _labels(rng, n_queries, 4, multi)
    retrieved = np.stack([rng.permutation(n)[:k] for _ in range(n_queries)])
    return retrieved, query_labels, database_labels


PROBLEMS = dict(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), n_queries=st.integers(1, 8),
                k_fraction=st.floats(0, 1), multi=st.booleans())


@settings(max_examples=60, deadline=None)
@given(**PROBLEMS)
def test_average_precision_and_map_match_the_definition(seed, n, n_queries, k_fraction, multi):
    k = max(1, round(k_fraction * n))
    retrieved, query_labels, database_labels = _problem(seed, n, n_queries, k, multi)
    brute = [_brute_ap(retrieved[q], query_labels[q], database_labels) for q in range(n_queries)]
    ap, n_relevant = hashing.average_precision(retrieved, query_labels, database_labels)
    np.testing.assert_allclose(ap, [a for a, _ in brute], rtol=1e-12)
    np.testing.assert_array_equal(n_relevant, [r for _, r in brute])

    deephash = hashing.map_at_k(retrieved, query_labels, database_labels)
    assert deephash == pytest.approx(np.mean([a for a, _ in brute]), rel=1e-12)
    dhta = hashing.map_at_k(retrieved, query_labels, database_labels, variant="dhta")
    found = [a for a, r in brute if r > 0]
    if found:
        assert dhta == pytest.approx(np.mean(found), rel=1e-12)
        assert dhta >= deephash  # leaving out zeros can only raise the mean
    else:
        assert np.isnan(dhta)
    precision = hashing.precision_at_k(retrieved, query_labels, database_labels)
    assert precision == pytest.approx(np.mean([r / k for _, r in brute]), rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(**PROBLEMS)
def test_precision_recall_curve_matches_the_definition(seed, n, n_queries, k_fraction, multi):
    k = max(1, round(k_fraction * n))
    retrieved, query_labels, database_labels = _problem(seed, n, n_queries, k, multi)
    precision, recall = hashing.precision_recall_curve(retrieved, query_labels, database_labels)
    expected_p, expected_r = np.zeros(k), np.zeros(k)
    for q in range(n_queries):
        total = sum(_relevant(query_labels[q], y) for y in database_labels)
        for j in range(k):
            hits = sum(_relevant(query_labels[q], database_labels[i]) for i in retrieved[q, : j + 1])
            expected_p[j] += hits / (j + 1) / n_queries
            expected_r[j] += (hits / total if total else 0.0) / n_queries
    np.testing.assert_allclose(precision, expected_p, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(recall, expected_r, rtol=1e-12, atol=1e-15)
    if k == n:  # the whole database retrieved: every relevant item found
        has_relevant = [any(_relevant(query_labels[q], y) for y in database_labels) for q in range(n_queries)]
        assert recall[-1] == pytest.approx(np.mean(has_relevant))


def _argsort_map(database_codes, query_codes, database_labels, query_labels, k):
    """The DeepHash-pytorch CalcTopMap loop, with a stable argsort so ties go to the smaller index."""
    total = 0.0
    for q in range(len(query_codes)):
        relevant = np.array([_relevant(query_labels[q], y) for y in database_labels], dtype=float)
        distances = (query_codes[q] != database_codes).sum(axis=1)
        top = relevant[np.argsort(distances, kind="stable")][:k]
        hits = int(top.sum())
        if hits:
            total += np.mean(np.arange(1, hits + 1) / (np.flatnonzero(top) + 1.0))
    return total / len(query_codes)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 300), n_bits=st.integers(1, 40),
       k=st.one_of(st.none(), st.integers(1, 300)), multi=st.booleans())
def test_hamming_map_matches_argsort_implementation(seed, n, n_bits, k, multi):
    rng = np.random.default_rng(seed)
    database = np.where(rng.random((n, n_bits)) < 0.5, 1, -1)
    queries = np.where(rng.random((9, n_bits)) < 0.5, 1, -1)
    database_labels = _labels(rng, n, 3, multi)
    query_labels = _labels(rng, 9, 3, multi)
    k = None if k is None else min(k, n)
    expected = _argsort_map(database, queries, database_labels, query_labels, k or n)
    assert hashing.hamming_map(queries, database, query_labels, database_labels, k) == pytest.approx(expected)
    packed = (np.packbits(queries > 0, axis=1), np.packbits(database > 0, axis=1))
    got = hashing.hamming_map(*packed, query_labels, database_labels, k, packed=True)
    assert got == pytest.approx(expected)
    _, retrieved = hamming.search(queries, database, k or n)
    assert hashing.map_at_k(retrieved, query_labels, database_labels) == pytest.approx(expected)


def test_hand_computed_example():
    # Relevant at positions 1 and 3 of 4: AP = (1/1 + 2/3) / 2.
    retrieved = np.array([[0, 1, 2, 3], [1, 3, 0, 2]])
    database_labels = np.array([5, 6, 5, 6])
    query_labels = np.array([5, 7])  # the second query has no relevant item
    ap, n_relevant = hashing.average_precision(retrieved, query_labels, database_labels)
    np.testing.assert_allclose(ap, [(1 + 2 / 3) / 2, 0.0])
    np.testing.assert_array_equal(n_relevant, [2, 0])
    assert hashing.map_at_k(retrieved, query_labels, database_labels) == pytest.approx(5 / 12)
    assert hashing.map_at_k(retrieved, query_labels, database_labels,
                                          variant="dhta") == pytest.approx(5 / 6)
    precision, recall = hashing.precision_recall_curve(retrieved, query_labels, database_labels)
    np.testing.assert_allclose(precision, [0.5, 0.25, 2 / 6, 0.25])
    np.testing.assert_allclose(recall, [0.25, 0.25, 0.5, 0.5])


def test_bad_inputs_name_the_argument():
    retrieved = np.array([[0, 1]])
    with pytest.raises(ValueError, match=r"retrieved: indices must lie in \[0, 2\)"):
        hashing.average_precision(np.array([[0, 2]]), [0], [0, 1])
    with pytest.raises(ValueError, match="query_labels: 2 labels for 1 items"):
        hashing.average_precision(retrieved, [0, 1], [0, 1])
    with pytest.raises(ValueError, match="one is single-label and the other multi-label"):
        hashing.average_precision(retrieved, [[1, 0]], [0, 1])
    with pytest.raises(TypeError, match="retrieved: expected integer database indices"):
        hashing.average_precision(retrieved.astype(float), [0], [0, 1])
    with pytest.raises(ValueError, match="variant: expected one of deephash, dhta"):
        hashing.map_at_k(retrieved, [0], [0, 1], variant="csq")
    with pytest.raises(ValueError, match="database_labels: 3 labels for 2 items"):
        hashing.hamming_map(np.ones((1, 8)), np.ones((2, 8)), [0], [0, 1, 2])
    with pytest.raises(ValueError, match="query_codes: codes of 7 bits, but the database codes have 8"):
        hashing.hamming_map(np.ones((1, 7)), np.ones((2, 8)), [0], [0, 1])
    with pytest.raises(ValueError, match="database_codes: code values must be"):
        hashing.hamming_map(np.ones((1, 8)), np.full((2, 8), 3), [0], [0, 1])
    with pytest.raises(ValueError, match="k: expected 1 <= k <= 2"):
        hashing.hamming_map(np.ones((1, 8)), np.ones((2, 8)), [0], [0, 1], k=3)
