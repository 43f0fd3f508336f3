"""Recall@k, mAP, mAP@R and NMI against brute-force oracles, and against pytorch-metric-learning."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minrr.certify.margin
from minrr.labels import relevance
from minrr.metrics import retrieval
from minrr.metrics.clustering import kmeans, kmeans_nmi, normalized_mutual_info
from minrr.metrics.retrieval import (
    average_precision,
    first_relevant_rank,
    map_at_r,
    mean_average_precision,
    query_statistics,
    r_precision,
    recall_at_k,
)

# ---------------------------------------------------------------- oracle


def oracle_ranked_relevance(queries, gallery, q_labels, g_labels, exclude):
    """For each query, the relevance flags of its ranking, from a plain sort by (distance, index)."""
    d2 = np.zeros((len(queries), len(gallery)))
    for k in range(queries.shape[1]):  # summed over k in order, exactly like the kernel
        d2 = d2 + (queries[:, None, k] - gallery[None, :, k]) ** 2
    rel = relevance(np.asarray(q_labels), np.asarray(g_labels))
    rankings = []
    for a in range(len(queries)):
        order = sorted(range(len(gallery)), key=lambda j: (d2[a, j], j))
        if exclude == "index":
            order.remove(a)
        elif exclude == "nearest":
            order = order[1:]
        rankings.append([bool(rel[a, j]) for j in order])
    return rankings


def oracle_metrics(flags):
    """(first relevant rank or 0, AP, AP@R) of one ranking, straight from the definitions."""
    positions = [p + 1 for p, f in enumerate(flags) if f]
    if not positions:
        return 0, np.nan, np.nan
    r = len(positions)
    precisions = [(j + 1) / pos for j, pos in enumerate(positions)]
    ap_at_r = sum(sum(flags[:i]) / i for i in range(1, r + 1) if flags[i - 1]) / r
    return positions[0], float(np.mean(precisions)), ap_at_r


# ---------------------------------------------------------------- strategies


@st.composite
def retrieval_problems(draw):
    """Small problems full of ties: embeddings from a small pool (duplicates) on a coarse
    grid or with float coordinates, single- or multi-label (up to 70 classes, two key words)."""
    dim = draw(st.integers(1, 4))
    n = draw(st.integers(1, 9))
    own_gallery = draw(st.booleans())
    m = n if own_gallery else draw(st.integers(1, 9))
    grid = draw(st.booleans())
    elements = st.integers(-2, 2) if grid else st.floats(-3, 3, allow_nan=False, width=32)
    pool = np.array(draw(st.lists(st.lists(elements, min_size=dim, max_size=dim), min_size=1, max_size=5)),
                    dtype=np.float64)
    q = pool[draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))]
    g = q if own_gallery else pool[draw(st.lists(st.integers(0, len(pool) - 1), min_size=m, max_size=m))]
    n_classes = draw(st.sampled_from([0, 3, 70]))  # 0: single-label
    if n_classes == 0:
        labels = st.lists(st.integers(0, 2), min_size=n + m, max_size=n + m)
        y = np.array(draw(labels))
    else:
        hot = st.lists(st.sampled_from([0, 1, n_classes - 1]), max_size=2)
        y = np.zeros((n + m, n_classes), dtype=np.int64)
        for i, classes in enumerate(draw(st.lists(hot, min_size=n + m, max_size=n + m))):
            y[i, classes] = 1
    yq = y[:n]
    yg = yq if own_gallery else y[n:]
    exclude = draw(st.sampled_from(["index", "nearest", "none"] if own_gallery else ["nearest", "none"]))
    block_bytes = draw(st.sampled_from([16, 200, 2**20]))  # 16: two gallery items per block
    return q, g, yq, yg, own_gallery, exclude, block_bytes


def _kwargs(g, yg, own_gallery, exclude, block_bytes):
    gallery = {} if own_gallery else {"gallery": g, "gallery_labels": yg}
    return {**gallery, "exclude": exclude, "block_bytes": block_bytes}


@settings(max_examples=150, deadline=None)
@given(retrieval_problems())
def test_metrics_match_the_brute_force_oracle(problem):
    q, g, yq, yg, own_gallery, exclude, block_bytes = problem
    kw = _kwargs(g, yg, own_gallery, exclude, block_bytes)
    expected = [oracle_metrics(f) for f in oracle_ranked_relevance(q, g, yq, yg, exclude)]
    want_rank = np.array([e[0] for e in expected])
    want_ap = np.array([e[1] for e in expected])
    want_ap_r = np.array([e[2] for e in expected])

    np.testing.assert_array_equal(first_relevant_rank(q, yq, **kw), want_rank)
    ap, ap_r = average_precision(q, yq, **kw)
    np.testing.assert_allclose(ap, want_ap, rtol=1e-12)  # NaN where want NaN
    np.testing.assert_allclose(ap_r, want_ap_r, rtol=1e-12)

    answerable = want_rank > 0
    ks = [1, 2, 3, len(g)]
    if not answerable.any():
        for metric in (recall_at_k, mean_average_precision, map_at_r):
            with pytest.raises(ValueError, match="no query has a relevant gallery item"):
                metric(q, yq, **kw)
        return
    want_recall = [np.mean(want_rank[answerable] <= k) for k in ks]
    np.testing.assert_allclose(recall_at_k(q, yq, ks, **kw), want_recall, rtol=1e-12)
    assert recall_at_k(q, yq, 1, **kw) == pytest.approx(want_recall[0], rel=1e-12)
    assert mean_average_precision(q, yq, **kw) == pytest.approx(np.mean(want_ap[answerable]), rel=1e-12)
    assert map_at_r(q, yq, **kw) == pytest.approx(np.mean(want_ap_r[answerable]), rel=1e-12)


@settings(max_examples=100, deadline=None)
@given(retrieval_problems(), st.data())
def test_query_statistics_of_row_chunks_concatenate_to_the_whole(problem, data):
    """Chunks of queries computed apart (as on a cluster) give each query the oracle's values."""
    q, g, yq, yg, own_gallery, exclude, block_bytes = problem
    kw = _kwargs(g, yg, own_gallery, exclude, block_bytes)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(q) - 1), max_size=3)) if len(q) > 1 else []))
    bounds = [0, *cuts, len(q)]
    parts = [query_statistics(q, yq, rows=(a, b), **kw) for a, b in zip(bounds, bounds[1:])]
    joined = [np.concatenate(columns) for columns in zip(*parts)]
    whole = query_statistics(q, yq, **kw)
    for got, want in zip(joined, whole):
        np.testing.assert_array_equal(got, want)
    expected = [oracle_metrics(f) for f in oracle_ranked_relevance(q, g, yq, yg, exclude)]
    np.testing.assert_array_equal(whole.first_relevant_rank, [e[0] for e in expected])
    np.testing.assert_allclose(whole.average_precision, [e[1] for e in expected], rtol=1e-12)
    np.testing.assert_allclose(whole.ap_at_r, [e[2] for e in expected], rtol=1e-12)


@pytest.mark.parametrize("rows", [(0, 0), (2, 1), (-1, 3), (0, 6), (0.5, 2), "ab"])
def test_bad_rows_are_refused(rows):
    x, y = np.eye(5), np.array([0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="^rows: expected"):
        query_statistics(x, y, rows=rows)


@settings(max_examples=40, deadline=None)
@given(retrieval_problems())
def test_metric_properties(problem):
    q, g, yq, yg, own_gallery, exclude, block_bytes = problem
    kw = _kwargs(g, yg, own_gallery, exclude, block_bytes)
    ranks = first_relevant_rank(q, yq, **kw)
    ap, ap_r = average_precision(q, yq, **kw)
    has = ranks > 0
    assert np.array_equal(~np.isnan(ap), has) and np.array_equal(~np.isnan(ap_r), has)
    # 0 < AP, AP@R <= AP <= 1, and AP = 1 exactly when AP@R = 1 (all relevant items first).
    assert np.all(ap[has] > 0) and np.all(ap_r[has] <= ap[has] + 1e-12) and np.all(ap[has] <= 1 + 1e-12)
    assert np.array_equal(ap[has] == 1.0, ap_r[has] == 1.0)
    # A relevant item ranked first counts in AP@R.
    assert np.all(ap_r[has][ranks[has] == 1] > 0)
    # Recall@k is non-decreasing in k and reaches 1 once k covers the gallery.
    if has.any():
        recall = recall_at_k(q, yq, list(range(1, len(g) + 2)), **kw)
        assert np.all(np.diff(recall) >= 0) and recall[-1] == 1.0


# ---------------------------------------------------------------- ties, exclusion, hand examples


def test_ties_go_to_the_smaller_gallery_index():
    query = np.zeros((1, 2))
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # all three at distance 1
    for relevant_at, rank in [(0, 1), (1, 2), (2, 3)]:
        labels = np.zeros(3, dtype=int)
        labels[relevant_at] = 1
        kw = {"gallery": gallery, "gallery_labels": labels}
        assert first_relevant_rank(query, [1], **kw)[0] == rank
        assert recall_at_k(query, [1], [1, 2], **kw).tolist() == [rank <= 1, rank <= 2]
        assert mean_average_precision(query, [1], **kw) == pytest.approx(1 / rank)


def test_float_duplicates_tie_exactly_across_blocks():
    """A duplicate of an other-label item always sits right after it, whatever the blocking."""
    rng = np.random.default_rng(3)
    gallery = rng.normal(size=(40, 7))
    gallery[29] = gallery[5]  # same embedding; 5 is other-label, 29 relevant
    labels = np.zeros(40, dtype=int)
    labels[29] = 1
    query = gallery[5:6] + 1e-3 * rng.normal(size=(1, 7))
    d = ((gallery - query) ** 2).sum(axis=1)
    closer = np.count_nonzero(d < d[5])
    for block_bytes in (8, 40, 8 * 1000):
        kw = {"gallery": gallery, "gallery_labels": labels, "block_bytes": block_bytes}
        assert first_relevant_rank(query, [1], **kw)[0] == closer + 2
        ap, ap_r = average_precision(query, [1], **kw)
        assert ap[0] == pytest.approx(1 / (closer + 2)) and ap_r[0] == 0.0  # R = 1, not ranked first


def test_exclude_nearest_drops_a_smaller_index_duplicate_instead_of_the_query():
    emb = np.array([[0.0], [0.0], [1.0], [5.0]])  # items 0 and 1 coincide
    labels = np.array([1, 1, 2, 2])
    # "index": queries 0 and 1 lose themselves and find each other first.
    assert first_relevant_rank(emb, labels).tolist() == [1, 1, 3, 1]
    labels = np.array([7, 1, 1, 2])  # now the duplicate 0 has another label than query 1
    assert first_relevant_rank(emb, labels, exclude="index").tolist() == [0, 2, 2, 0]
    # robrank's "nearest" drops item 0 for query 1 (first by index among the ties), so query 1
    # retrieves itself; for the other queries the nearest item is the query itself.
    assert first_relevant_rank(emb, labels, exclude="nearest").tolist() == [0, 1, 2, 0]
    assert recall_at_k(emb, labels, 1, exclude="index") == 0.0
    assert recall_at_k(emb, labels, 1, exclude="nearest") == 0.5
    assert mean_average_precision(emb, labels, exclude="nearest") == pytest.approx((1 + 1 / 2) / 2)


def test_hand_computed_ap_and_ap_at_r():
    # Relevant items at positions 1 and 3 of 5: AP = (1/1 + 2/3) / 2, AP@R (R = 2) = (1/1) / 2.
    query = np.zeros((1, 1))
    gallery = np.arange(1.0, 6.0)[:, None]
    labels = np.array([1, 0, 1, 0, 0])
    kw = {"gallery": gallery, "gallery_labels": labels}
    assert mean_average_precision(query, [1], **kw) == pytest.approx((1 + 2 / 3) / 2)
    assert map_at_r(query, [1], **kw) == pytest.approx(0.5)
    # Musgrave's example shape: R = 3, relevant at 1, 3, 4 -> AP@R = (1 + 2/3) / 3.
    labels = np.array([1, 0, 1, 1, 0])
    assert map_at_r(query, [1], **kw | {"gallery_labels": labels}) == pytest.approx((1 + 2 / 3) / 3)


def test_multilabel_relevance_is_sharing_a_class():
    emb = np.array([[0.0], [1.0], [2.0]])
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])  # 0 and 1 share nothing; 2 shares with both
    # Query 1 ties between items 0 (nothing shared) and 2; the smaller index comes first.
    assert first_relevant_rank(emb, labels).tolist() == [2, 2, 1]
    empty = np.array([[0, 0, 0], [0, 1, 0], [1, 1, 0]])  # a query without classes has no relevant item
    assert first_relevant_rank(emb, empty).tolist() == [0, 2, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gallery": np.zeros((3, 2))}, "give both or neither"),
        ({"gallery": np.zeros((3, 3)), "gallery_labels": [0, 1, 2]}, "dimension 3"),
        ({"gallery": np.zeros((3, 2)), "gallery_labels": [0, 1]}, "gallery_labels: 2 labels for 3"),
        ({"gallery": np.zeros((3, 2)), "gallery_labels": np.eye(3)}, "single-label"),
        ({"gallery": np.zeros((3, 2)), "gallery_labels": [0, 1, 2], "exclude": "index"}, "needs the queries"),
        ({"exclude": "self"}, "exclude: expected"),
        ({"block_bytes": 4}, "block_bytes"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    emb = np.zeros((4, 2))
    with pytest.raises(ValueError, match=message):
        recall_at_k(emb, [0, 0, 1, 1], **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="labels: 3 labels for 4"):
        mean_average_precision(np.zeros((4, 2)), [0, 0, 1])
    with pytest.raises(ValueError, match="embeddings: contains NaN"):
        map_at_r(np.array([[0.0], [np.nan]]), [0, 0])
    for ks in (0, [1, 0], [], 1.5, [True]):
        with pytest.raises(ValueError, match="ks:"):
            recall_at_k(np.zeros((2, 1)), [0, 0], ks)
    with pytest.raises(ValueError, match="no query has a relevant gallery item"):
        recall_at_k(np.zeros((3, 1)), [0, 1, 2])


def test_large_random_problem_is_block_invariant():
    """A few hundred points: the blocked kernels agree with each other at any block size."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    labels = rng.integers(0, 12, 300)
    ranks = first_relevant_rank(emb, labels)
    ap, ap_r = average_precision(emb, labels)
    for block_bytes in (800, 20_000):  # (1 query x 100 items) and (8 x 300) blocks
        np.testing.assert_array_equal(first_relevant_rank(emb, labels, block_bytes=block_bytes), ranks)
        ap_b, ap_r_b = average_precision(emb, labels, block_bytes=block_bytes)
        np.testing.assert_array_equal(ap_b, ap)
        np.testing.assert_array_equal(ap_r_b, ap_r)


# ---------------------------------------------------------------- near-ties of the float32 GEMM


@st.composite
def near_tie_problems(draw):
    """Problems whose float32 GEMM misorders items: points near a large common offset, so that
    the rounding of ``|q|^2 + |e|^2 - 2 q.e`` dwarfs the gaps between distances; integer points
    (exact ties in float64) or float points, duplicates, single- or multi-label, float32 or
    float64 input, the queries' own gallery or a separate one."""
    dim = draw(st.integers(1, 6))
    n = draw(st.integers(1, 30))
    own_gallery = draw(st.booleans())
    m = n if own_gallery else draw(st.integers(1, 40))
    offset = draw(st.sampled_from([0.0, 2.0 ** 10, 2.0 ** 12, 3000.5, -2.0 ** 20]))
    if draw(st.booleans()):
        elements = st.integers(-4, 4).map(float)
    else:
        elements = st.floats(-2, 2, allow_nan=False, allow_subnormal=False)
    pool = offset + np.array(draw(st.lists(st.lists(elements, min_size=dim, max_size=dim), min_size=1, max_size=8)))
    pool = pool.astype(draw(st.sampled_from([np.float32, np.float64])))
    q = pool[draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))]
    g = q if own_gallery else pool[draw(st.lists(st.integers(0, len(pool) - 1), min_size=m, max_size=m))]
    if draw(st.booleans()):
        y = np.array(draw(st.lists(st.integers(0, 3), min_size=n + m, max_size=n + m)))
    else:
        y = np.array(draw(st.lists(st.lists(st.booleans(), min_size=5, max_size=5), min_size=n + m, max_size=n + m)))
    yq = y[:n]
    yg = yq if own_gallery else y[n:]
    exclude = draw(st.sampled_from(["index", "nearest", "none"] if own_gallery else ["nearest", "none"]))
    block_bytes = draw(st.sampled_from([16, 400, 2**20]))
    return q, g, yq, yg, own_gallery, exclude, block_bytes


@pytest.mark.parametrize("buckets_above", [0, 1000])  # every query through score buckets / by vector passes
@settings(max_examples=120, deadline=None)
@given(problem=near_tie_problems())
def test_near_ties_of_the_gemm_are_settled_exactly(problem, buckets_above):
    """Ranks, AP, AP@R and Recall@k equal the float64 oracle (stable sort by distance, then index)
    when float32 rounding would reorder the items, through either counting path."""
    q, g, yq, yg, own_gallery, exclude, block_bytes = problem
    kw = _kwargs(g, yg, own_gallery, exclude, block_bytes)
    flags = oracle_ranked_relevance(q.astype(np.float64), g.astype(np.float64), yq, yg, exclude)
    expected = [oracle_metrics(f) for f in flags]
    want_rank = np.array([e[0] for e in expected])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retrieval, "_BUCKETS_ABOVE", buckets_above)
        np.testing.assert_array_equal(first_relevant_rank(q, yq, **kw), want_rank)
        ap, ap_r = average_precision(q, yq, **kw)
        np.testing.assert_allclose(ap, [e[1] for e in expected], rtol=1e-12)
        np.testing.assert_allclose(ap_r, [e[2] for e in expected], rtol=1e-12)
        if (want_rank > 0).any():
            want_recall = [np.mean(want_rank[want_rank > 0] <= k) for k in (1, 2, 4)]
            np.testing.assert_allclose(recall_at_k(q, yq, [1, 2, 4], **kw), want_recall, rtol=1e-12)


def test_float32_distances_misorder_these_points_but_the_metrics_do_not():
    """Integer points at 4096 + small offsets: float32 ``|q|^2 + |e|^2 - 2 q.e`` gets the
    ranking wrong (the test data is hard), the metrics match the exact oracle."""
    rng = np.random.default_rng(7)
    emb = 4096.0 + rng.integers(-3, 4, size=(60, 3)).astype(np.float64)
    labels = rng.integers(0, 4, 60)
    e32 = emb.astype(np.float32)
    sq = (e32 * e32).sum(axis=1)
    approx = sq[:, None] + sq[None, :] - 2.0 * (e32 @ e32.T)
    exact = ((emb[:, None, :] - emb[None, :, :]) ** 2).sum(axis=-1)
    assert any(not np.array_equal(np.argsort(approx[a], kind="stable"), np.argsort(exact[a], kind="stable"))
               for a in range(60))
    expected = [oracle_metrics(f) for f in oracle_ranked_relevance(emb, emb, labels, labels, "index")]
    np.testing.assert_array_equal(first_relevant_rank(emb, labels), [e[0] for e in expected])
    ap, ap_r = average_precision(emb.astype(np.float32), labels)
    np.testing.assert_allclose(ap, [e[1] for e in expected], rtol=1e-12)
    np.testing.assert_allclose(ap_r, [e[2] for e in expected], rtol=1e-12)


@pytest.mark.parametrize("buckets_above", [0, 1000])  # through score buckets / by vector passes
def test_distances_that_differ_only_by_summation_order(monkeypatch, buckets_above):
    """Gallery items are permutations of one vector: their exact distances to the origin differ
    in the last bits only, and a vectorised (reordered) sum would pick another nearest item."""
    monkeypatch.setattr(retrieval, "_BUCKETS_ABOVE", buckets_above)
    rng = np.random.default_rng(0)
    v = rng.normal(size=32) * 10.0 ** rng.uniform(-3, 3, 32)
    gallery = np.array([rng.permutation(v) for _ in range(60)])
    g_labels = rng.integers(0, 2, 60)
    queries, q_labels = np.zeros((2, 32)), np.array([0, 1])
    kw = {"gallery": gallery, "gallery_labels": g_labels}
    for exclude in ("none", "nearest"):
        flags = oracle_ranked_relevance(queries, gallery, q_labels, g_labels, exclude)
        expected = [oracle_metrics(f) for f in flags]
        np.testing.assert_array_equal(first_relevant_rank(queries, q_labels, exclude=exclude, **kw),
                                      [e[0] for e in expected])
        ap, ap_r = average_precision(queries, q_labels, exclude=exclude, **kw)
        np.testing.assert_allclose(ap, [e[1] for e in expected], rtol=1e-12)
        np.testing.assert_allclose(ap_r, [e[2] for e in expected], rtol=1e-12)


# ---------------------------------------------------------------- many relevant items: score buckets


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(-8.0, 8.0), st.integers(1, 3), st.integers(1, 40), st.booleans())
def test_bucket_tables_classify_every_score_like_the_thresholds(seed, spread, repeat, n_kept, wide):
    """For any score, the kept items before its bucket's uncertain range [lo, hi) rank before it (lower
    threshold above the score) and those from hi on after it (upper threshold below the score); lo == hi
    (no uncertain item) in bucket 0, and the counters of the buckets with uncertain items start negative.
    Thresholds with duplicates, equal bounds, wide or narrow near-tie windows and any range; with narrow
    windows, most scores are in buckets without one."""
    rng = np.random.default_rng(seed)
    centre = np.sort(np.repeat(rng.normal(size=n_kept) * 10.0 ** spread, repeat))[::-1].astype(np.float32)
    width = rng.choice([0.0, 1e-6, 1e-3] if wide else [0.0, 1e-7], size=len(centre)) * (1.0 + abs(centre))
    above = np.maximum.accumulate((centre + width).astype(np.float32)[::-1])[::-1]  # non-increasing
    below = np.minimum(np.minimum.accumulate((centre - width).astype(np.float32)), above)
    offsets, n_buckets = np.array([0, len(above)]), retrieval._BUCKETS_PER_ITEM * len(above) + 2
    bucket_offsets = np.array([0, n_buckets])
    low, scale = np.empty(1, np.float32), np.empty(1, np.float32)
    lo, hi = np.empty(n_buckets, np.int32), np.empty(n_buckets, np.int32)
    tally = np.empty(n_buckets + retrieval._SPILL, np.int32)
    retrieval._bucket_tables(offsets, above, below, bucket_offsets, low, scale, lo, hi, tally)
    np.testing.assert_array_equal(tally < 0, np.concatenate([lo < hi, np.zeros(retrieval._SPILL, bool)]))
    uniform = rng.uniform(below.min() - 1, above.max() + 1, 200).astype(np.float32)
    values = np.concatenate([above, below, uniform])
    scores = np.concatenate([values, np.nextafter(values, np.float32(np.inf)),
                             np.nextafter(values, np.float32(-np.inf))]).astype(np.float32)
    flagged = []
    for x in scores:
        b = retrieval._bucket(x, low[0], scale[0], np.float32(n_buckets - 2))
        after, before = below > x, above < x
        assert 0 <= lo[b] <= hi[b] <= len(above) and after[:lo[b]].all() and before[hi[b]:].all()
        assert b > 0 or lo[b] == hi[b] == len(above)
        flagged.append(lo[b] < hi[b])
    if not wide and n_kept >= 4:
        assert np.mean(flagged[2 * len(above):len(values)]) < 0.25


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 300), st.sampled_from(["spread", "ties", "crowd"]))
def test_distance_order_is_the_stable_sort(seed, n, kind):
    """The counting sort (and its merge-sort fallback for crowded buckets) orders any distances like a
    stable sort: spread values, many exact ties, and a crowd of near-equal values beside a far one."""
    rng = np.random.default_rng(seed)
    if kind == "spread":
        dist = rng.random(n) * 10.0 ** rng.uniform(-5, 5)
    elif kind == "ties":
        dist = rng.integers(0, 4, n) * 0.25
    else:
        dist = 1.0 + rng.integers(0, 3, n) * 1e-12
        dist[:min(n, 1)] = 1e6
    order = np.empty(n, np.int64)
    retrieval._distance_order(dist, order, np.empty(n + 1, np.int64), np.empty(n, np.int64))
    np.testing.assert_array_equal(order, np.argsort(dist, kind="stable"))


def test_thresholds_round_outwards_to_float32():
    """``above`` is the largest float32 at or below (centre + allowance) / 2 and ``below`` the smallest at or
    above (centre - allowance) / 2, at every magnitude, for zero and for subnormals."""
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(size=20_000) * 10.0 ** rng.uniform(-48, 38, 20_000),
                             [0.0, 2.0 ** -149, -(2.0 ** -149), 2.0 ** -150, -(2.0 ** -150), 1.0, -1.0, 3e38]])
    for allowance in (0.0, 1e-3):
        above, below = np.empty(len(values), np.float32), np.empty(len(values), np.float32)
        # q_sq = 0 and rel_d = -2 values: centre = 2 values.
        retrieval._thresholds(np.array([0, len(values)]), np.zeros(1), np.full(1, 2 * allowance), -2.0 * values, 1.0,
                              above, below)
        high, low = values + allowance, values - allowance
        nearest_high, nearest_low = high.astype(np.float32), low.astype(np.float32)
        np.testing.assert_array_equal(above, np.where(nearest_high > high, np.nextafter(nearest_high, -np.inf),
                                                      nearest_high))
        np.testing.assert_array_equal(below, np.where(nearest_low < low, np.nextafter(nearest_low, np.inf),
                                                      nearest_low))


def many_relevant_problem(rng, n, dim, n_classes, multi, dtype):
    """Integer points at 4096 + small offsets (exact ties, and near-ties the float32 GEMM misorders),
    few classes, so that every query has more relevant items than the vector passes take."""
    emb = (4096.0 + rng.integers(-3, 4, size=(n, dim))).astype(dtype)
    if multi:
        labels = (rng.random((n, n_classes)) < 0.4).astype(np.int64)
        labels[np.arange(n), rng.integers(0, n_classes, n)] = 1  # at least one class each
    else:
        labels = rng.integers(0, n_classes, n)
    return emb, labels


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("exclude, block_bytes", [("index", 2**20), ("nearest", 6000), ("none", 60_000)])
def test_many_relevant_items_through_buckets_match_the_oracle(multi, dtype, exclude, block_bytes):
    """Queries with 40 to 90 relevant items (the score-bucket path), ties and near-ties, single- and
    multi-label, small blocks (several gallery chunks and query blocks): AP, AP@R, R-precision
    and ranks equal the float64 brute-force oracle."""
    rng = np.random.default_rng(11 + multi)
    emb, labels = many_relevant_problem(rng, 150, 3, 3, multi, dtype)
    flags = oracle_ranked_relevance(emb.astype(np.float64), emb.astype(np.float64), labels, labels,
                                    "none" if exclude == "none" else exclude)
    assert min(sum(f) for f in flags) > retrieval._BUCKETS_ABOVE  # every query goes through the buckets
    expected = [oracle_metrics(f) for f in flags]
    kw = {"exclude": exclude, "block_bytes": block_bytes}
    ap, ap_r = average_precision(emb, labels, **kw)
    np.testing.assert_allclose(ap, [e[1] for e in expected], rtol=1e-12)
    np.testing.assert_allclose(ap_r, [e[2] for e in expected], rtol=1e-12)
    want_r_prec = [sum(f[:sum(f)]) / sum(f) for f in flags]
    assert r_precision(emb, labels, **kw) == pytest.approx(np.mean(want_r_prec), rel=1e-12)
    np.testing.assert_array_equal(first_relevant_rank(emb, labels, **kw), [e[0] for e in expected])


def test_average_precision_memory_does_not_grow_with_the_gallery():
    """At a fixed number of classes the relevant items per query grow with the gallery; the peak
    memory of AP grows only by O(1) numbers per gallery item (norms, label groups), not by the
    relevant items (a block keeps at most its scores' bytes of them)."""
    tracemalloc = pytest.importorskip("tracemalloc")
    rng = np.random.default_rng(4)
    queries = rng.normal(size=(100, 8)).astype(np.float32)
    q_labels = rng.integers(0, 4, 100)
    peaks = []
    for size in (8000, 32_000):
        gallery = rng.normal(size=(size, 8)).astype(np.float32)
        kw = {"gallery": gallery, "gallery_labels": rng.integers(0, 4, size), "block_bytes": 2**20}
        average_precision(queries, q_labels, **kw)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        average_precision(queries, q_labels, **kw)
        peaks.append(tracemalloc.get_traced_memory()[1] - base)
        tracemalloc.stop()
    # Holding every relevant item would add 100 queries x 6000 x 128 bytes = 77 MB.
    assert peaks[1] - peaks[0] < 24_000 * 160


def test_worker_threads_and_blocks_do_not_change_results(monkeypatch):
    """Large enough for worker threads: the same ranks and APs as one thread, and as the oracle on a few queries."""
    rng = np.random.default_rng(9)
    emb = (1000.0 + rng.integers(-2, 3, size=(1100, 6))).astype(np.float32)  # many exact ties and near-ties
    labels = rng.integers(0, 40, 1100)
    ranks, (ap, ap_r) = first_relevant_rank(emb, labels, exclude="nearest"), average_precision(emb, labels,
                                                                                               exclude="nearest")
    monkeypatch.setattr(minrr.certify.margin, "THREADS_FROM", np.inf)
    kw = {"exclude": "nearest", "block_bytes": 40_000}
    np.testing.assert_array_equal(first_relevant_rank(emb, labels, **kw), ranks)
    np.testing.assert_array_equal(average_precision(emb, labels, **kw)[0], ap)
    np.testing.assert_array_equal(average_precision(emb, labels, **kw)[1], ap_r)
    few = [0, 1, 500, 1099]
    flags = oracle_ranked_relevance(emb[few].astype(np.float64), emb.astype(np.float64), labels[few], labels, "none")
    expected = [oracle_metrics(f[1:]) for f in flags]  # "nearest": the first item of the full ranking goes
    np.testing.assert_array_equal(ranks[few], [e[0] for e in expected])
    np.testing.assert_allclose(ap[few], [e[1] for e in expected], rtol=1e-12)


def test_huge_and_tiny_embeddings_rank_like_unit_ones():
    """Scaling by a power of two keeps every distance's order: the GEMM runs on rescaled data."""
    rng = np.random.default_rng(8)
    emb = rng.integers(-3, 4, size=(40, 4)).astype(np.float64)
    labels = rng.integers(0, 3, 40)
    ranks = first_relevant_rank(emb, labels)
    ap = average_precision(emb, labels)[0]
    for factor in (2.0 ** 60, 2.0 ** -60):
        np.testing.assert_array_equal(first_relevant_rank(emb * factor, labels), ranks)
        np.testing.assert_array_equal(average_precision(emb * factor, labels)[0], ap)
    with pytest.raises(ValueError, match="embeddings: norms"):
        recall_at_k(emb * 1e160, labels)


# ---------------------------------------------------------------- NMI and k-means


def _entropy(probabilities):
    return -sum(p * np.log(p) for p in probabilities.values())


def oracle_nmi(a, b):
    """NMI from the definition, cell by cell."""
    n = len(a)
    pa = {x: np.mean(a == x) for x in set(a)}
    pb = {x: np.mean(b == x) for x in set(b)}
    h_a, h_b = _entropy(pa), _entropy(pb)
    if h_a == 0 and h_b == 0:
        return 1.0
    mi = 0.0
    for x in pa:
        for y in pb:
            pxy = np.count_nonzero((a == x) & (b == y)) / n
            if pxy > 0:
                mi += pxy * np.log(pxy / (pa[x] * pb[y]))
    return mi / ((h_a + h_b) / 2)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 4), min_size=n, max_size=n), st.lists(st.integers(-3, 3), min_size=n, max_size=n))))
def test_nmi_matches_the_oracle_and_its_symmetries(pair):
    a, b = np.array(pair[0]), np.array(pair[1])
    nmi = normalized_mutual_info(a, b)
    assert nmi == pytest.approx(oracle_nmi(a, b), abs=1e-12)
    assert 0.0 <= nmi <= 1.0
    assert normalized_mutual_info(b, a) == pytest.approx(nmi, abs=1e-12)
    assert normalized_mutual_info(10 * a + 7, -b) == pytest.approx(nmi, abs=1e-12)  # renaming
    assert normalized_mutual_info(a, 3 - a) == pytest.approx(1.0)


def test_nmi_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b = rng.integers(0, 6, 200), rng.integers(0, 9, 200)
        assert normalized_mutual_info(a, b) == pytest.approx(metrics.normalized_mutual_info_score(a, b), abs=1e-12)


def _blobs(n_classes=5, per_class=20, dim=8, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def test_kmeans_recovers_separated_classes_and_is_seeded():
    x, labels = _blobs()
    assert kmeans_nmi(x, labels) == pytest.approx(1.0)
    for init in ("k-means++", "random"):
        np.testing.assert_array_equal(kmeans(x, 5, seed=4, init=init), kmeans(x, 5, seed=4, init=init))
        assert 0.5 < kmeans_nmi(x, labels, seed=4, init=init) <= 1.0
    noisy, _ = _blobs(spread=3.0)
    assert 0.0 <= kmeans_nmi(noisy, labels, seed=1) < 0.9
    assert kmeans_nmi(noisy, labels, seed=1) == kmeans_nmi(noisy, labels, seed=1)


def test_kmeans_assigns_every_point_to_its_nearest_centroid():
    x, _ = _blobs(n_classes=4, spread=1.0, seed=2)
    clusters = kmeans(x, 4, seed=0, n_iter=100)
    centroids = np.array([x[clusters == c].mean(axis=0) for c in range(4)])  # no cluster is empty
    nearest = np.argmin(((x[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(clusters, nearest)  # a Lloyd fixed point


def test_kmeans_with_more_clusters_than_distinct_points_keeps_going():
    x = np.repeat(np.eye(2), 5, axis=0)  # two distinct points, ten copies
    clusters = kmeans(x, 3, seed=0)
    assert clusters.shape == (10,) and set(clusters) <= {0, 1, 2}
    assert normalized_mutual_info(clusters, np.repeat([0, 1], 5)) == pytest.approx(1.0)


def test_clustering_input_errors():
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans(np.zeros((3, 2)), 4)
    with pytest.raises(ValueError, match="init"):
        kmeans(np.zeros((3, 2)), 2, init="bogus")
    with pytest.raises(ValueError, match="labels: expected one label per item"):
        kmeans_nmi(np.zeros((3, 2)), np.eye(3))
    with pytest.raises(ValueError, match="labels_pred: 2 labels"):
        normalized_mutual_info([0, 1, 1], [0, 1])


# ---------------------------------------------------------------- pytorch-metric-learning


def test_agrees_with_pytorch_metric_learning():
    """R@1, mAP@R, mAP (over all items) and NMI (on our clusters) against AccuracyCalculator."""
    pytest.importorskip("pytorch_metric_learning")
    pytest.importorskip("faiss")
    torch = pytest.importorskip("torch")
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(5)
    emb, labels = _blobs(n_classes=6, per_class=25, dim=10, spread=1.5, seed=5)
    emb = emb.astype(np.float32)
    labels[-1] = 99  # a lone query: left out by both
    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "mean_average_precision", "NMI"),
        k=None, device=torch.device("cpu"),
        kmeans_func=lambda x, k: torch.from_numpy(kmeans(x.numpy(), k, seed=0)),
    )
    theirs = calculator.get_accuracy(emb, labels)
    assert recall_at_k(emb, labels, 1) == pytest.approx(theirs["precision_at_1"], abs=1e-9)
    assert map_at_r(emb, labels) == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert mean_average_precision(emb, labels) == pytest.approx(theirs["mean_average_precision"], abs=1e-6)
    assert kmeans_nmi(emb, labels, seed=0) == pytest.approx(theirs["NMI"], abs=1e-12)
    # A separate gallery, no exclusion.
    gallery, g_labels = np.ascontiguousarray(emb[::2]), labels[::2]
    queries, q_labels = emb[1::2] + rng.normal(scale=0.1, size=emb[1::2].shape).astype(np.float32), labels[1::2]
    theirs = calculator.get_accuracy(queries, q_labels, gallery, g_labels, include=(
        "precision_at_1", "mean_average_precision_at_r"))
    kw = {"gallery": gallery, "gallery_labels": g_labels}
    assert recall_at_k(queries, q_labels, 1, **kw) == pytest.approx(theirs["precision_at_1"], abs=1e-9)
    assert map_at_r(queries, q_labels, **kw) == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
