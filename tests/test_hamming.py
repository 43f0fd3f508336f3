"""Hamming kernels against plain NumPy oracles (np.bitwise_count, lexsort, np.packbits)."""

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minrr.hashing import hamming

LENGTHS = st.one_of(st.integers(1, 200), st.sampled_from([8, 63, 64, 65, 127, 128, 192, 256]))


def _codes(rng, n, n_bits, pool=None, alphabet="pm1"):
    """(n, K) codes; rows drawn from a pool of ``pool`` distinct codes to force duplicates."""
    distinct = rng.integers(0, 2, size=(pool or n, n_bits)).astype(bool)
    bits = distinct[rng.integers(0, len(distinct), size=n)]
    if alphabet == "pm1":
        return np.where(bits, 1, -1).astype(np.int8)
    if alphabet == "01":
        return bits.astype(np.float32)
    return bits


def _oracle_distances(database, queries):
    """Distances by np.bitwise_count over np.packbits bytes."""
    db = np.packbits(database > 0, axis=1)
    q = np.packbits(queries > 0, axis=1)
    return np.bitwise_count(q[:, None, :] ^ db[None, :, :]).sum(axis=2, dtype=np.int64)


def _oracle_top_k(distances, k):
    """Sort by (distance, index): lexsort's last key is the primary one."""
    n = distances.shape[1]
    order = np.stack([np.lexsort((np.arange(n), row)) for row in distances])[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


@contextlib.contextmanager
def small_blocks():
    """Blocks of one chunk, one query per batch and three shards per query: every merge path runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hamming, "_BLOCK_BYTES", 1)
        patch.setattr(hamming, "_STATE_BYTES", 1)
        patch.setattr(hamming, "_n_shards", lambda n_queries: 3)
        yield


@contextlib.contextmanager
def tight_buffers():
    """Room for one candidate beyond k: the buffers are cut to the best k at almost every code."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hamming, "_capacity", lambda k, n: min(k + 1, n))
        yield


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1))
def test_popcount64_matches_bitwise_count(x):
    assert hamming.popcount64(np.uint64(x)) == np.bitwise_count(np.uint64(x))


@settings(max_examples=40, deadline=None)
@given(n_bits=LENGTHS, n=st.integers(1, 20), alphabet=st.sampled_from(["pm1", "01", "bool"]),
       seed=st.integers(0, 2**32 - 1))
def test_pack_round_trips_and_matches_packbits(n_bits, n, alphabet, seed):
    codes = _codes(np.random.default_rng(seed), n, n_bits, alphabet=alphabet)
    words = hamming.pack(codes)
    assert words.dtype == np.uint64 and words.shape == (n, -(-n_bits // 64))
    expected_pm1 = np.where(codes > 0, 1, -1)
    np.testing.assert_array_equal(hamming.unpack(words, n_bits), expected_pm1)
    packbits = np.packbits(codes > 0, axis=1)
    np.testing.assert_array_equal(hamming.to_packbits(words, n_bits), packbits)
    np.testing.assert_array_equal(hamming.from_packbits(packbits), words)
    # Padding bits are zero: the popcount of the words is the number of set bits.
    np.testing.assert_array_equal(np.bitwise_count(words).sum(axis=1), (codes > 0).sum(axis=1))


@settings(max_examples=40, deadline=None)
@given(n_bits=LENGTHS, n=st.integers(1, 300), n_queries=st.integers(1, 12),
       pool=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_hamming_distances_match_bitwise_count(n_bits, n, n_queries, pool, seed):
    rng = np.random.default_rng(seed)
    database = _codes(rng, n, n_bits, pool)
    queries = np.concatenate([database[:1], _codes(rng, n_queries, n_bits)])
    expected = _oracle_distances(database, queries)
    np.testing.assert_array_equal(hamming.hamming_distances(queries, database), expected)
    # +-1 codes: distance = (K - <b1, b2>) / 2.
    inner = queries.astype(np.int64) @ database.astype(np.int64).T
    np.testing.assert_array_equal(expected, (n_bits - inner) // 2)


@settings(max_examples=60, deadline=None)
@given(n_bits=LENGTHS, n=st.integers(1, 1500), n_queries=st.integers(1, 20), pool=st.integers(1, 60),
       k_fraction=st.floats(0, 1), seed=st.integers(0, 2**32 - 1))
def test_search_matches_lexsort_oracle(n_bits, n, n_queries, pool, k_fraction, seed):
    rng = np.random.default_rng(seed)
    database = _codes(rng, n, n_bits, pool)
    queries = _codes(rng, n_queries, n_bits)
    k = max(1, round(k_fraction * n))
    expected_dist, expected_index = _oracle_top_k(_oracle_distances(database, queries), k)
    dist, index = hamming.search(queries, database, k)
    assert dist.dtype == np.int32 and index.dtype == np.int64
    np.testing.assert_array_equal(dist, expected_dist)
    np.testing.assert_array_equal(index, expected_index)


@settings(max_examples=30, deadline=None)
@given(n_bits=LENGTHS, n=st.integers(1, 2000), n_queries=st.integers(1, 4), pool=st.integers(1, 30),
       k=st.integers(1, 400), seed=st.integers(0, 2**32 - 1))
def test_search_across_blocks_shards_and_batches(n_bits, n, n_queries, pool, k, seed):
    """Many blocks and shards, buffers cut many times, ties across shard borders."""
    rng = np.random.default_rng(seed)
    database = _codes(rng, n, n_bits, pool)
    queries = _codes(rng, n_queries, n_bits)
    k = min(k, n)
    distances = _oracle_distances(database, queries)
    with small_blocks(), tight_buffers():
        found = hamming.search(queries, database, k)
        all_distances = hamming.hamming_distances(queries, database)
    for got, want in zip(found, _oracle_top_k(distances, k)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(all_distances, distances)


@settings(max_examples=30, deadline=None)
@given(n_bits=LENGTHS, n=st.integers(1000, 5000), n_queries=st.integers(1, 20), k=st.integers(1, 12),
       pool=st.one_of(st.none(), st.integers(1, 100)), seed=st.integers(0, 2**32 - 1))
def test_search_small_k_cuts_the_buffers_often(n_bits, n, n_queries, k, pool, seed):
    """A small k in a large database, buffers cut to the best k again and again."""
    rng = np.random.default_rng(seed)
    database = _codes(rng, n, n_bits, pool)
    queries = _codes(rng, n_queries, n_bits)
    with tight_buffers():
        found = hamming.search(queries, database, k)
    found_default = hamming.search(queries, database, k)
    for got, got_default, want in zip(found, found_default, _oracle_top_k(_oracle_distances(database, queries), k)):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_default, want)


@settings(max_examples=25, deadline=None)
@given(n_bits=LENGTHS, n=st.integers(1, 800), pool=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
def test_rank_is_full_stable_ranking(n_bits, n, pool, seed):
    rng = np.random.default_rng(seed)
    database = _codes(rng, n, n_bits, pool)
    queries = _codes(rng, 3, n_bits)
    distances = _oracle_distances(database, queries)
    dist, index = hamming.rank(queries, database)
    assert index.shape == (3, n)
    np.testing.assert_array_equal(np.sort(index, axis=1), np.broadcast_to(np.arange(n), (3, n)))
    np.testing.assert_array_equal(index, np.argsort(distances, axis=1, kind="stable"))
    np.testing.assert_array_equal(dist, np.sort(distances, axis=1))


@settings(max_examples=20, deadline=None)
@given(n_bits=st.sampled_from([8, 24, 64, 72, 256]), n=st.integers(1, 500), k=st.integers(1, 50),
       seed=st.integers(0, 2**32 - 1))
def test_packed_layouts_give_the_same_search(n_bits, n, k, seed):
    rng = np.random.default_rng(seed)
    database = _codes(rng, n, n_bits, pool=20, alphabet="01")
    queries = _codes(rng, 4, n_bits, alphabet="bool")
    k = min(k, n)
    expected = hamming.search(queries, database, k)
    as_bytes = (np.packbits(queries, axis=1), np.packbits(database > 0, axis=1))
    as_words = (hamming.pack(queries), hamming.pack(database))
    for layout in (as_bytes, as_words):
        for got, want in zip(hamming.search(*layout, k, packed=True), expected):
            np.testing.assert_array_equal(got, want)


@settings(max_examples=30, deadline=None)
@given(n_bits=LENGTHS, n=st.integers(1, 1500), n_queries=st.integers(1, 12), pool=st.integers(1, 40),
       k_fraction=st.floats(0, 1), cuts=st.lists(st.floats(0, 1), max_size=4), small=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_search_over_shards_equals_the_concatenation(n_bits, n, n_queries, pool, k_fraction, cuts, small, seed):
    """A list of shards (one-row shards, shards smaller than k, ties across their borders) is
    searched, ranked and measured as the one array of their rows."""
    rng = np.random.default_rng(seed)
    database = _codes(rng, n, n_bits, pool)
    queries = _codes(rng, n_queries, n_bits)
    k = max(1, round(k_fraction * n))
    bounds = [0, *sorted({min(n - 1, max(1, round(c * n))) for c in cuts if n > 1}), n]
    shards = [database[a:b] for a, b in zip(bounds, bounds[1:])]
    distances = _oracle_distances(database, queries)
    with small_blocks() if small else contextlib.nullcontext(), tight_buffers():
        found = hamming.search(queries, shards, k)
        ranked = hamming.rank(queries, tuple(shards))
        all_distances = hamming.hamming_distances(queries, shards)
    for got, want in zip(found, _oracle_top_k(distances, k)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(ranked, _oracle_top_k(distances, n)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(all_distances, distances)


def test_bad_shards_are_named():
    good = np.ones((10, 16), dtype=np.int8)
    with pytest.raises(ValueError, match="database: expected at least one shard"):
        hamming.search(good, [], 1)
    with pytest.raises(ValueError, match="database: shard 1 holds codes of 8 bits, shard 0 of 16"):
        hamming.search(good, [good, good[:, :8]], 1)
    with pytest.raises(ValueError, match="database shard 2: no codes"):
        hamming.search(good, [good, good, good[:0]], 1)
    mixed = [good, good.copy()]
    mixed[1][3, 3] = 0  # 0/1 in one shard, -1/1 in another
    mixed[0][2, 2] = -1
    with pytest.raises(ValueError, match="codes mix the -1/1 and 0/1 alphabets"):
        hamming.search(good, mixed, 1)


def test_memory_mapped_database(tmp_path):
    rng = np.random.default_rng(3)
    database = _codes(rng, 3000, 100, pool=200)
    queries = _codes(rng, 7, 100)
    np.save(tmp_path / "db.npy", database)
    mapped = np.load(tmp_path / "db.npy", mmap_mode="r")
    with small_blocks():
        found = hamming.search(queries, mapped, 25)
    for got, want in zip(found, _oracle_top_k(_oracle_distances(database, queries), 25)):
        np.testing.assert_array_equal(got, want)


def test_bad_inputs_name_the_argument():
    good = np.ones((10, 16), dtype=np.int8)
    cases = [
        (dict(database=good, queries=np.ones((2, 15)), k=1), ValueError, "queries: codes of 15 bits"),
        (dict(database=np.full((10, 16), 2), queries=good, k=1), ValueError, "database: code values must be"),
        (dict(database=good, queries=np.full((1, 16), 0.5), k=1), ValueError, "queries: code values must be"),
        (dict(database=good, queries=np.full((1, 16), np.nan), k=1), ValueError, "queries: code values must be"),
        (dict(database=np.array([[-1, 0]] * 3), queries=np.ones((1, 2)), k=1), ValueError, "database: codes mix"),
        (dict(database=good, queries=good, k=0), ValueError, "k: expected 1 <= k <= 10"),
        (dict(database=good, queries=good, k=11), ValueError, "k: expected 1 <= k <= 10"),
        (dict(database=good, queries=good, k=2.0), TypeError, "k: expected an integer"),
        (dict(database=good, queries=good, k=True), TypeError, "k: expected an integer"),
        (dict(database=good[0], queries=good, k=1), ValueError, "database: expected a 2-D array"),
        (dict(database=good[:0], queries=good, k=1), ValueError, "database: no codes"),
        (dict(database=good.astype(str), queries=good, k=1), TypeError, "database: expected numeric or bool"),
        (dict(database=good, queries=good, k=1, packed=True), TypeError, "database: packed codes must be uint8"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            hamming.search(**kwargs)


def test_alphabets_mixed_across_blocks_are_refused():
    database = np.ones((600, 64), dtype=np.int8)
    database[10, 3] = -1
    database[500, 7] = 0  # a later block: the mixture is only visible across blocks
    with small_blocks(), pytest.raises(ValueError, match="database: codes mix the -1/1 and 0/1 alphabets"):
        hamming.search(database[:1], database, 5)


def test_word_helpers_check_their_arguments():
    words = hamming.pack(np.ones((2, 70), dtype=np.int8))
    with pytest.raises(ValueError, match="n_bits: 64 bits do not fit 2 words"):
        hamming.unpack(words, 64)
    with pytest.raises(TypeError, match="words: expected a 2-D uint64 array"):
        hamming.to_packbits(words.astype(np.int64), 70)
    with pytest.raises(TypeError, match="packed: expected uint8"):
        hamming.from_packbits(words)
