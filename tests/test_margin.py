"""Margins d_k against a brute-force oracle, and the floor's guarantee."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minrr.labels import relevance
from minrr.certify.margin import margins

seeds = st.integers(0, 2**32 - 1)


def oracle(queries, gallery, q_labels, g_labels, k, exclude_self=False):
    """d_k, and the nearest index (ties to the smaller index), by brute force in float64."""
    dist = np.linalg.norm(queries[:, None, :] - gallery[None, :, :], axis=2)
    if exclude_self:
        np.fill_diagonal(dist, np.inf)
    rel = relevance(q_labels, g_labels)
    same = np.where(rel, dist, np.inf).min(axis=1)
    other = np.sort(np.where(rel, np.inf, dist), axis=1)
    kth = other[:, k - 1] if other.shape[1] >= k else np.full(len(queries), np.inf)
    with np.errstate(invalid="ignore"):
        margin = np.where(np.isinf(same), -np.inf, kth - same)
    nearest = np.array([np.lexsort((np.arange(len(row)), row))[0] for row in dist])
    return margin, nearest


def _assert_nearest(queries, gallery, got, want, dist=None):
    """The reported item is at the smallest distance; where that is unique, it is the oracle's.

    Exact duplicates in different GEMM chunks may round differently, so only
    distance ties within 1e-9 may resolve to another of the tied items.
    """
    if dist is None:
        dist = np.linalg.norm(queries[:, None] - gallery[None], axis=2)
    rows = np.arange(len(dist))
    np.testing.assert_allclose(dist[rows, got], dist[rows, want], atol=1e-9)
    unique = np.sum(dist <= dist[rows, want][:, None] + 1e-9, axis=1) == 1
    np.testing.assert_array_equal(got[unique], want[unique])


def _problem(rng, n, m, dim, classes, multi, duplicates):
    gallery = rng.normal(size=(m, dim))
    if duplicates:
        gallery[rng.integers(0, m, m // 2)] = gallery[0]
        gallery = np.round(gallery, 1)  # many exact ties
    queries = rng.normal(size=(n, dim))
    if multi:
        g_labels = rng.random((m, classes)) < 0.4
        q_labels = rng.random((n, classes)) < 0.4
    else:
        g_labels = rng.integers(0, classes, m)
        q_labels = rng.integers(0, classes, n)
    return queries, gallery, q_labels, g_labels


@given(seed=seeds, n=st.integers(1, 12), m=st.integers(1, 40), dim=st.integers(1, 8),
       classes=st.integers(1, 70), k=st.integers(1, 5), multi=st.booleans(), duplicates=st.booleans(),
       block=st.integers(1, 7), chunk=st.integers(1, 13))
def test_margins_match_oracle(seed, n, m, dim, classes, k, multi, duplicates, block, chunk):
    rng = np.random.default_rng(seed)
    queries, gallery, q_labels, g_labels = _problem(rng, n, m, dim, classes, multi, duplicates)
    got = margins(queries, gallery, q_labels, g_labels, k=k, precision="float64",
                  query_block=block, gallery_chunk=chunk)
    want, nearest = oracle(queries, gallery, q_labels, g_labels, k)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got.margin), finite)
    np.testing.assert_array_equal(got.margin[~finite], want[~finite])
    np.testing.assert_allclose(got.margin[finite], want[finite], atol=1e-9)
    _assert_nearest(queries, gallery, got.nearest, nearest)
    assert np.all((got.margin_floor <= got.margin) | ~finite)


@given(seed=seeds, n=st.integers(2, 25), dim=st.integers(1, 6), k=st.integers(1, 3), multi=st.booleans())
def test_leave_one_out_matches_oracle(seed, n, dim, k, multi):
    rng = np.random.default_rng(seed)
    queries, _, q_labels, _ = _problem(rng, n, 1, dim, 3, multi, False)
    got = margins(queries, queries, q_labels, q_labels, k=k, exclude_self=True, precision="float64",
                  query_block=4, gallery_chunk=3)
    want, nearest = oracle(queries, queries, q_labels, q_labels, k, exclude_self=True)
    np.testing.assert_allclose(got.margin, want, atol=1e-9)
    dist = np.linalg.norm(queries[:, None] - queries[None], axis=2)
    np.fill_diagonal(dist, np.inf)
    _assert_nearest(queries, queries, got.nearest, nearest, dist)


@given(seed=seeds, m=st.integers(2, 60), dim=st.integers(2, 64), k=st.integers(1, 3),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), slacked=st.booleans())
def test_float32_floor_bounds_the_exact_margin(seed, m, dim, k, scale, slacked):
    """The float32 GEMM's floor never exceeds the exact margin of any gallery within the slack."""
    rng = np.random.default_rng(seed)
    queries, gallery, q_labels, g_labels = _problem(rng, 10, m, dim, 3, False, False)
    near = min(3, m)
    queries[:near] = gallery[:near] + 1e-4 * rng.normal(size=(near, dim))  # near-zero distances
    queries, gallery = queries * scale, gallery * scale
    slack = rng.random(m) * 0.1 * scale if slacked else None
    got = margins(queries, gallery, q_labels, g_labels, k=k, gallery_slack=slack)
    moved = gallery
    if slacked:  # any gallery within the slack of the estimate
        step = rng.normal(size=gallery.shape)
        moved = gallery + step / np.linalg.norm(step, axis=1, keepdims=True) * (slack * rng.random(m))[:, None]
    exact, _ = oracle(queries, moved, q_labels, g_labels, k)
    ok = np.isfinite(exact)
    assert np.all(got.margin_floor[ok] <= exact[ok])
    if not slacked:  # away from zero distance, the rounding allowance is negligible
        typical = ok & (np.arange(len(ok)) >= near)
        loss = got.margin[typical] - got.margin_floor[typical]
        assert np.all((loss >= 0) & (loss <= 1e-4 * scale * np.sqrt(dim)))


def test_queries_without_same_label_get_minus_infinity():
    gallery = np.eye(3)
    got = margins(np.zeros((2, 3)), gallery, np.array([0, 7]), np.array([0, 1, 2]))
    assert np.isfinite(got.margin[0]) and got.margin[1] == -np.inf and got.margin_floor[1] == -np.inf


def test_fewer_than_k_other_items_give_infinite_margin():
    gallery = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    got = margins(np.array([[0.1, 0.0]]), gallery, np.array([0]), np.array([0, 1, 0]), k=2)
    assert got.margin[0] == np.inf


@pytest.mark.parametrize("bad, message", [
    (dict(queries=np.zeros((2, 3, 1))), "queries: expected a 2-D"),
    (dict(gallery=np.zeros((4, 2))), "gallery: dimension 2"),
    (dict(query_labels=np.zeros(3, int)), "query labels: 3 labels for 2 items"),
    (dict(k=0), "k: expected a whole number"),
    (dict(exclude_self=True), "exclude_self"),
    (dict(gallery_slack=-np.ones(4)), "gallery_slack"),
    (dict(precision="float16"), "precision"),
    (dict(query_labels=np.zeros((2, 3), bool)), "one is single-label"),
])
def test_bad_arguments_name_themselves(bad, message):
    args = dict(queries=np.zeros((2, 3)), gallery=np.ones((4, 3)), query_labels=np.zeros(2, int),
                gallery_labels=np.zeros(4, int))
    args.update(bad)
    kwargs = {key: args.pop(key) for key in list(args) if key not in ("queries", "gallery", "query_labels", "gallery_labels")}
    with pytest.raises(ValueError, match=message):
        margins(args["queries"], args["gallery"], args["query_labels"], args["gallery_labels"], **kwargs)


@pytest.mark.parametrize("k, multi, slacked", [(1, False, False), (2, False, False), (1, True, True)])
def test_threaded_blocks_match_oracle_and_the_serial_run(monkeypatch, k, multi, slacked):
    """Query blocks on threads (both the grouped and the entry-by-entry reduction): the float64 margins equal the
    oracle, ties included, the float32 floor stays below the exact margin, and the results do not depend on the
    threads."""
    import minrr.certify.margin as margin_module

    rng = np.random.default_rng(7)
    queries, gallery, q_labels, g_labels = _problem(rng, 37, 300, 5, 4, multi, True)
    slack = rng.random(300) * 0.05 if slacked else None
    serial = margins(queries, gallery, q_labels, g_labels, k=k, gallery_slack=slack, query_block=6, gallery_chunk=70)
    monkeypatch.setattr(margin_module, "THREADS_FROM", 1)
    assert margin_module.query_blocks(37, 300, 6)[1] == min(2, margin_module.numba.get_num_threads())
    exact = margins(queries, gallery, q_labels, g_labels, k=k, precision="float64", query_block=6, gallery_chunk=70)
    want, nearest = oracle(queries, gallery, q_labels, g_labels, k)
    np.testing.assert_allclose(exact.margin, want, atol=1e-9)
    _assert_nearest(queries, gallery, exact.nearest, nearest)
    threaded = margins(queries, gallery, q_labels, g_labels, k=k, gallery_slack=slack, query_block=6,
                       gallery_chunk=70)
    for name in ("margin", "margin_floor", "nearest"):
        np.testing.assert_array_equal(getattr(threaded, name), getattr(serial, name))
    finite = np.isfinite(want)
    assert np.all(threaded.margin_floor[finite] <= want[finite])  # the gallery is within its own slack


def test_query_blocks_cover_the_queries_evenly(monkeypatch):
    import minrr.certify.margin as margin_module

    monkeypatch.setattr(margin_module.numba, "get_num_threads", lambda: 2)
    for n, m, size in [(10_000, 60_000, 1024), (37, 300, 6), (5, 10**6, 1024), (1, 10**7, 3), (7, 2, 3)]:
        blocks, workers = margin_module.query_blocks(n, m, size)
        assert workers == (min(2, n) if n * m >= margin_module.THREADS_FROM else 1)
        starts, stops = np.array(blocks).T
        assert starts[0] == 0 and stops[-1] == n and np.all(starts[1:] == stops[:-1])
        assert len(blocks) % workers == 0 or len(blocks) == n  # every thread gets as many blocks
        assert np.all(stops - starts <= size) and len(set((stops - starts)[:-1].tolist())) <= 1
    assert margin_module.query_blocks(10_000, 60_000, 1024)[0][:2] == [(0, 1000), (1000, 2000)]


@pytest.mark.parametrize("dtype, factor", [(np.float32, 1.0), (np.float32, 1e-7), (np.float64, 1e6), (np.int64, 3.0)])
def test_scale_and_norms_read_the_gallery_once_with_the_same_result(dtype, factor):
    from minrr.certify.margin import embedding_scale, max_norm, scale_and_norms, squared_norms

    rng = np.random.default_rng(3)
    queries = rng.normal(size=(20, 6)) * factor
    gallery = (rng.normal(size=(50, 6)) * factor).astype(dtype)
    for gemm_dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        scale, g_sq = scale_and_norms(queries, gallery, gemm_dtype, chunk=7)
        assert scale == embedding_scale(max_norm(queries), max_norm(gallery))
        np.testing.assert_array_equal(g_sq, squared_norms(gallery, gemm_dtype, scale))


def test_an_error_in_a_block_stops_the_blocks_not_yet_started():
    import threading
    import time

    from minrr.certify.margin import in_threads

    ran = []
    lock = threading.Lock()

    def task(start, stop):
        with lock:
            ran.append(start)
        if start == 0:
            raise ValueError("block 0 failed")
        time.sleep(0.01)

    with pytest.raises(ValueError, match="block 0 failed"):
        in_threads(task, [(i, i + 1) for i in range(200)], 2)
    assert 0 in ran and len(ran) < 100
