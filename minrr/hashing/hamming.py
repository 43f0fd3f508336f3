"""Hamming search over binary codes: packing, popcount distances, top-k, full rankings.

Three layouts of ``N`` codes of ``K`` bits are accepted:

unpacked
    ``(N, K)`` numeric or bool array with values in {-1, 1} or in {0, 1}; the bit is
    ``value > 0`` (so ``b = sign(f)`` codes and 0/1 codes give the same bits).
packbits
    ``(N, K / 8)`` uint8, the ``np.packbits`` layout that faiss's binary indexes use.
words
    ``(N, W)`` uint64 with ``W = ceil(K / 64)``: each code's packbits bytes, zero-padded
    to ``8 W`` bytes and read as little-endian 64-bit words. This is what the kernels scan;
    padding bits are 0 in every code, so they never add to a distance.

The Hamming distance of two codes is ``popcount(a xor b)``, which for +-1 codes equals
``(K - <b1, b2>) / 2``. Rankings order the database by (distance, index): ties go to the
smaller database index, as in faiss. The database is scanned in blocks of about 1 MiB of
words, so a memory-mapped ``.npy`` database of any size is searched in bounded memory; a
database stored as several arrays (shards) is searched as their concatenation, in one pass.
"""

from __future__ import annotations

import numba
import numpy as np

from ..progress import progress_bar

__all__ = ["pack", "unpack", "from_packbits", "to_packbits", "hamming_distances", "search", "rank"]

_CHUNK = 512  # database codes per distance buffer (2 KiB of int32, stays in L1)
_GROUP = 8  # queries that scan each chunk in turn while it is in L1
_RUN = 64  # codes of a chunk that the top-k admission skips at once when none is under the bound
_BLOCK_BYTES = 1 << 20  # database words converted and scanned per kernel call
_STATE_BYTES = 1 << 28  # bound on the top-k candidate buffers of one query batch


# ---------------------------------------------------------------------------
# Layout conversions
# ---------------------------------------------------------------------------


def _bytes_to_words(packed: np.ndarray, n_words: int) -> np.ndarray:
    """(n, B) uint8 packbits rows -> (n, n_words) uint64, zero-padding each row."""
    n, n_bytes = packed.shape
    if n_bytes == 8 * n_words:
        padded = np.ascontiguousarray(packed)
    else:
        padded = np.zeros((n, 8 * n_words), dtype=np.uint8)
        padded[:, :n_bytes] = packed
    return padded.view("<u8").astype(np.uint64, copy=False)


class _Codes:
    """One code array in any accepted layout, read in row blocks as uint64 words.

    Values are validated block by block as they are read, so a memory-mapped
    database is never loaded whole.
    """

    def __init__(self, codes, *, packed: bool, name: str):
        arr = np.asarray(codes)
        if arr.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D array of codes (n, K), got shape {arr.shape}")
        if packed:
            if arr.dtype == np.uint8:
                bits_per_column = 8
            elif arr.dtype == np.uint64:
                bits_per_column = 64
            else:
                raise TypeError(
                    f"{name}: packed codes must be uint8 (np.packbits layout) or uint64 words, "
                    f"got dtype {arr.dtype}"
                )
        else:
            if arr.dtype.kind not in "biuf":
                raise TypeError(f"{name}: expected numeric or bool codes, got dtype {arr.dtype}")
            bits_per_column = 1
        if arr.size == 0:
            raise ValueError(f"{name}: no codes (shape {arr.shape})")
        self.array, self.packed, self.name = arr, packed, name
        self.n = arr.shape[0]
        self.n_bits = arr.shape[1] * bits_per_column
        self.n_words = -(-self.n_bits // 64)
        self._alphabets: set[str] = set()

    def words(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` as ``(n, W)`` C-contiguous uint64 words."""
        block = self.array[start:stop]
        if block.dtype == np.uint64 and self.packed:
            return np.ascontiguousarray(block)
        if not self.packed:
            block = np.packbits(self._bits(block, start), axis=1)
        return _bytes_to_words(block, self.n_words)

    def blocks(self, transposed: bool):
        """Yield ``(start, stop, block)`` for consecutive row blocks: words ``(n, W)``, or
        ``(W, n)`` when ``transposed``."""
        rows = max(_CHUNK, _BLOCK_BYTES // (8 * self.n_words))
        for start in range(0, self.n, rows):
            stop = min(start + rows, self.n)
            words = self.words(start, stop)
            yield start, stop, np.ascontiguousarray(words.T) if transposed else words

    def _bits(self, block: np.ndarray, start: int) -> np.ndarray:
        """Bits of an unpacked block; refuses values outside {-1, 1} / {0, 1} and mixtures."""
        if block.dtype == np.bool_:
            return block
        ones = block == 1
        zeros = block == 0
        others = ~(ones | zeros)
        if others.any():
            bad = np.argwhere(others & (block != -1))
            if len(bad):
                row, col = bad[0]
                raise ValueError(
                    f"{self.name}: code values must be -1/1 or 0/1; found {block[row, col]} "
                    f"at row {start + row}, bit {col}"
                )
            self._alphabets.add("-1/1")
        if zeros.any():
            self._alphabets.add("0/1")
        if len(self._alphabets) > 1:
            raise ValueError(f"{self.name}: codes mix the -1/1 and 0/1 alphabets (both -1 and 0 occur)")
        return ones


class _Shards:
    """Code arrays (shards) read as one database: their concatenation along rows.

    The kernels carry the top-k state from one shard's blocks to the next, so a search over
    shards does the work of a search over one array of all the rows.
    """

    def __init__(self, shards, *, packed: bool, name: str):
        if len(shards) == 0:
            raise ValueError(f"{name}: expected at least one shard, got none")
        self.parts = [_Codes(shard, packed=packed, name=f"{name} shard {i}") for i, shard in enumerate(shards)]
        first = self.parts[0]
        alphabets: set[str] = set()  # one code alphabet across the shards
        for i, part in enumerate(self.parts):
            if part.n_bits != first.n_bits:
                raise ValueError(f"{name}: shard {i} holds codes of {part.n_bits} bits, shard 0 of {first.n_bits}")
            part._alphabets = alphabets
        self.n = sum(part.n for part in self.parts)
        self.n_bits, self.n_words = first.n_bits, first.n_words

    def blocks(self, transposed: bool):
        """:meth:`_Codes.blocks` of every shard in turn, rows numbered in the concatenation."""
        offset = 0
        for part in self.parts:
            for start, stop, block in part.blocks(transposed):
                yield offset + start, offset + stop, block
            offset += part.n


def pack(codes, *, name: str = "codes") -> np.ndarray:
    """Pack unpacked codes into 64-bit words.

    Parameters
    ----------
    codes : (N, K) numeric or bool array, values in {-1, 1} or {0, 1}
    name : str, the argument named in error messages

    Returns
    -------
    words : (N, ceil(K / 64)) uint64
    """
    return _Codes(codes, packed=False, name=name).words()


def unpack(words, n_bits: int) -> np.ndarray:
    """Unpack 64-bit words into +-1 codes.

    Parameters
    ----------
    words : (N, W) uint64, from :func:`pack` or :func:`from_packbits`
    n_bits : int, the code length K, ``64 (W - 1) < K <= 64 W``

    Returns
    -------
    codes : (N, K) int8 with values in {-1, 1}
    """
    words = _check_words(words, n_bits)
    bits = np.unpackbits(words.astype("<u8").view(np.uint8), axis=1, count=n_bits)
    return (2 * bits.astype(np.int8) - 1).astype(np.int8)


def from_packbits(packed) -> np.ndarray:
    """Convert ``np.packbits`` / faiss uint8 codes (K = 8 x columns) into 64-bit words.

    Parameters
    ----------
    packed : (N, K / 8) uint8

    Returns
    -------
    words : (N, ceil(K / 64)) uint64
    """
    arr = np.asarray(packed)
    if arr.dtype != np.uint8:
        raise TypeError(f"packed: expected uint8 np.packbits codes, got dtype {arr.dtype}")
    return _Codes(arr, packed=True, name="packed").words()


def to_packbits(words, n_bits: int) -> np.ndarray:
    """Convert 64-bit words back to ``np.packbits`` / faiss uint8 codes.

    Parameters
    ----------
    words : (N, W) uint64
    n_bits : int, the code length K, ``64 (W - 1) < K <= 64 W``

    Returns
    -------
    packed : (N, ceil(K / 8)) uint8
    """
    words = _check_words(words, n_bits)
    return np.ascontiguousarray(words.astype("<u8").view(np.uint8)[:, : -(-n_bits // 8)])


def _check_words(words, n_bits: int) -> np.ndarray:
    words = np.asarray(words)
    if words.ndim != 2 or words.dtype != np.uint64:
        raise TypeError(f"words: expected a 2-D uint64 array, got {words.dtype} of shape {words.shape}")
    n_bits = int(n_bits)
    if not 64 * (words.shape[1] - 1) < n_bits <= 64 * words.shape[1]:
        raise ValueError(f"n_bits: {n_bits} bits do not fit {words.shape[1]} words of 64 bits")
    return words


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@numba.njit(cache=True, inline="always")
def popcount64(x):
    """Number of set bits of a uint64 (SWAR; LLVM turns it into popcnt / vpopcntq)."""
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return np.int32((x * _H01) >> np.uint64(56))


@numba.njit(cache=True, inline="always")
def _add_word(row, q, out, n, first):
    """``out[j] (+)= popcount(q xor row[j])`` for j < n; ``first`` stores instead of adding."""
    if first:
        for j in range(n):
            out[j] = popcount64(q ^ row[j])
    else:
        for j in range(n):
            out[j] += popcount64(q ^ row[j])


@numba.njit(cache=True, inline="always")
def _add_4_words(r0, r1, r2, r3, q0, q1, q2, q3, out, n, first):
    """:func:`_add_word` over four words in one loop: fewer passes over ``out``."""
    if first:
        for j in range(n):
            out[j] = (popcount64(q0 ^ r0[j]) + popcount64(q1 ^ r1[j])
                      + popcount64(q2 ^ r2[j]) + popcount64(q3 ^ r3[j]))
    else:
        for j in range(n):
            out[j] += (popcount64(q0 ^ r0[j]) + popcount64(q1 ^ r1[j])
                       + popcount64(q2 ^ r2[j]) + popcount64(q3 ^ r3[j]))


@numba.njit(cache=True)
def _distances(words_t, lo, hi, query, out):
    """``out[j] = popcount(query xor code lo + j)`` for the codes ``lo:hi`` of a block.

    words_t: (W, n) uint64 block, word-major, so each loop runs over consecutive codes
    and vectorises; query: (W,) uint64; out: (>= hi - lo,) int32.
    """
    n = hi - lo
    n_words = words_t.shape[0]
    n_fours = n_words - n_words % 4
    for w in range(0, n_fours, 4):
        _add_4_words(words_t[w, lo:hi], words_t[w + 1, lo:hi], words_t[w + 2, lo:hi],
                     words_t[w + 3, lo:hi], query[w], query[w + 1], query[w + 2], query[w + 3],
                     out, n, w == 0)
    for w in range(n_fours, n_words):
        _add_word(words_t[w, lo:hi], query[w], out, n, w == 0)


@numba.njit(cache=True)
def _distances_rows(words, lo, hi, query, out):
    """:func:`_distances` on a row-major ``(n, W)`` block, for a few queries, which would
    not repay the transposition: one code after another, scalar popcounts."""
    for j in range(hi - lo):
        code = words[lo + j]
        d = 0
        for w in range(len(code)):
            d += popcount64(query[w] ^ code[w])
        out[j] = d


@numba.njit(cache=True, inline="always")
def _block_distances(block, transposed, lo, hi, query, out):
    """Distances to the codes ``lo:hi`` of a block in either layout (see :func:`_distances`)."""
    if transposed:
        _distances(block, lo, hi, query, out)
    else:
        _distances_rows(block, lo, hi, query, out)


@numba.njit(cache=True, inline="always")
def _min(values):
    """Smallest of a non-empty 1-D array (a loop from index 0 that LLVM vectorises)."""
    low = values[0]
    for j in range(1, len(values)):
        low = min(low, values[j])
    return low


@numba.njit(cache=True)
def _keep_best(dist, index, n, k, counts):
    """Sort the first ``n`` candidates by (distance, index) and keep the first ``min(n, k)``.

    A stable counting sort over the distance values (``counts`` has one slot per
    distance value plus one). Equal distances keep their order, which is index order:
    candidates are appended in index order, and a cut leaves them sorted. Returns the
    number kept.
    """
    counts[:] = 0
    for r in range(n):
        counts[dist[r] + 1] += 1
    for v in range(1, counts.shape[0]):
        counts[v] += counts[v - 1]
    m = min(n, k)
    kept_dist = np.empty(m, np.int32)
    kept_index = np.empty(m, np.int64)
    for r in range(n):
        pos = counts[dist[r]]
        counts[dist[r]] += 1
        if pos < m:
            kept_dist[pos] = dist[r]
            kept_index[pos] = index[r]
    dist[:m] = kept_dist
    index[:m] = kept_index
    return m


@numba.njit(cache=True)
def _admit(part, first, k, dist, index, counts, c, b, below, sort_counts, hits):
    """Append the codes of ``part`` (distances of codes ``first, first + 1, ...``) whose
    distance is below the bound ``b``, keeping ``b`` the k-th smallest candidate distance.

    ``counts`` is the histogram of the candidates' distances and ``below`` the number of
    candidates under ``b`` (fewer than k). ``hits`` is scratch space, as long as ``part``.
    Returns the new ``(c, b, below)``.
    """
    cap = dist.shape[0]
    for lo in range(0, len(part), _RUN):
        run = part[lo:lo + _RUN]
        if _min(run) >= b:  # once the bound is low, most runs hold no candidate
            continue
        n_hits = 0
        for j in range(len(run)):  # without branches: the codes under the bound on entry, a superset
            hits[n_hits] = lo + j
            n_hits += run[j] < b
        for h in range(n_hits):
            j = hits[h]
            d = part[j]
            if d >= b:
                continue
            if c == cap:  # full: keep the best k, which are all the live candidates
                c = _keep_best(dist, index, c, k, sort_counts)
            dist[c] = d
            index[c] = first + j
            c += 1
            counts[d] += 1
            below += 1
            while below >= k:  # the k-th smallest distance moved down
                b -= 1
                below -= counts[b]
    return c, b, below


@numba.njit(parallel=True, cache=True)
def _scan_block(block, transposed, offset, queries, n_shards, k, cand_dist, cand_index, n_cand, hist,
                bound, below):
    """Update the top-k candidates of every (query, shard) with one database block.

    ``block`` holds codes ``offset, offset + 1, ...`` as (W, n) words if ``transposed``,
    else (n, W).

    State ``t = query * n_shards + shard`` covers the ``shard``-th slice of each block:
    candidates ``cand_*[t, :n_cand[t]]`` in index order, the histogram ``hist[t]`` of
    their distances, the bound ``bound[t]`` (the k-th smallest candidate distance: a
    code is a candidate if it is closer; at the bound it loses the tie to the earlier
    codes) and ``below[t]``, the candidates closer than the bound. Each parallel task
    runs a group of ``_GROUP`` queries over one slice, chunk by chunk, so a chunk of
    database words is read from L1 by every query of the group.
    """
    n = block.shape[1] if transposed else block.shape[0]
    n_groups = -(-queries.shape[0] // _GROUP)
    for task in numba.prange(n_groups * n_shards):  # shard-major: threads split the shards
        shard = task // n_groups
        group = task % n_groups
        start = shard * n // n_shards
        stop = (shard + 1) * n // n_shards
        buf = np.empty(_CHUNK, np.int32)
        sort_counts = np.empty(hist.shape[1] + 1, np.int64)
        hits = np.empty(_CHUNK, np.int64)
        for lo in range(start, stop, _CHUNK):
            part = buf[:min(lo + _CHUNK, stop) - lo]
            for q in range(group * _GROUP, min((group + 1) * _GROUP, queries.shape[0])):
                t = q * n_shards + shard
                _block_distances(block, transposed, lo, lo + len(part), queries[q], part)
                if _min(part) >= bound[t]:
                    continue
                n_cand[t], bound[t], below[t] = _admit(
                    part, offset + lo, k, cand_dist[t], cand_index[t], hist[t],
                    n_cand[t], bound[t], below[t], sort_counts, hits)


@numba.njit(parallel=True, cache=True)
def _finish(cand_dist, cand_index, n_cand, n_shards, k, n_bins, out_dist, out_index):
    """Cut each state to its best k, then merge a query's shard states by (distance, index)."""
    for q in numba.prange(out_dist.shape[0]):
        states = np.arange(q * n_shards, (q + 1) * n_shards)
        sort_counts = np.empty(n_bins + 1, np.int64)
        for t in states:
            n_cand[t] = _keep_best(cand_dist[t], cand_index[t], n_cand[t], k, sort_counts)
        heads = np.zeros(n_shards, np.int64)
        for r in range(k):
            best = -1  # the state whose next candidate comes first
            for s in range(n_shards):
                if heads[s] == n_cand[states[s]]:
                    continue
                if best < 0 or _before(cand_dist, cand_index, states[s], heads[s],
                                       states[best], heads[best]):
                    best = s
            out_dist[q, r] = cand_dist[states[best], heads[best]]
            out_index[q, r] = cand_index[states[best], heads[best]]
            heads[best] += 1


@numba.njit(cache=True, inline="always")
def _before(cand_dist, cand_index, t, h, u, g):
    """Whether candidate h of state t ranks before candidate g of state u."""
    d, e = cand_dist[t, h], cand_dist[u, g]
    return d < e or (d == e and cand_index[t, h] < cand_index[u, g])


@numba.njit(parallel=True, cache=True)
def _rank_rows(distances, k, n_bins, out_dist, out_index):
    """The first k of each row of ``distances`` (n_queries, N) in (distance, index)
    order: a counting sort over the distance values. ``distances`` is overwritten."""
    for q in numba.prange(distances.shape[0]):
        index = np.arange(distances.shape[1])
        _keep_best(distances[q], index, distances.shape[1], k, np.empty(n_bins + 1, np.int64))
        out_dist[q] = distances[q, :k]
        out_index[q] = index[:k]


@numba.njit(parallel=True, cache=True)
def _distance_block(block, transposed, offset, queries, n_shards, out):
    """``out[q, offset + j]`` = distance from query q to code j of the block."""
    n = block.shape[1] if transposed else block.shape[0]
    for t in numba.prange(queries.shape[0] * n_shards):
        q = t // n_shards
        shard = t % n_shards
        lo = shard * n // n_shards
        hi = (shard + 1) * n // n_shards
        _block_distances(block, transposed, lo, hi, queries[q], out[q, offset + lo:offset + hi])


# ---------------------------------------------------------------------------
# Public search API
# ---------------------------------------------------------------------------


def _prepare(database, queries, packed: bool) -> tuple[_Codes | _Shards, np.ndarray, int]:
    """Validate both code arrays (the database: an array or a list of shards); return the
    database reader, query words, shard count."""
    if isinstance(database, (list, tuple)):
        db = _Shards(database, packed=packed, name="database")
    else:
        db = _Codes(database, packed=packed, name="database")
    qs = _Codes(queries, packed=packed, name="queries")
    if qs.n_bits != db.n_bits:
        raise ValueError(
            f"queries: codes of {qs.n_bits} bits, but the database codes have {db.n_bits} bits"
        )
    return db, qs.words(), _n_shards(qs.n)


def _transposed(db: _Codes, n_queries: int) -> bool:
    """Whether to scan the database word-major: free for one word, else worth it from a
    full group of queries on."""
    return db.n_words == 1 or n_queries >= _GROUP


def _n_shards(n_queries: int) -> int:
    """Slices of each block: one per thread when there are too few query groups to share out."""
    threads = numba.get_num_threads()
    return threads if -(-n_queries // _GROUP) < 4 * threads else 1


def hamming_distances(queries, database, *, packed: bool = False) -> np.ndarray:
    """All Hamming distances between queries and database codes.

    Parameters
    ----------
    queries : (n_queries, K) codes, or (n_queries, K / 8) uint8 / (n_queries, W) uint64 with ``packed=True``
    database : (N, K) codes in the same layout, or a list of (N_s, K) arrays (shards, e.g.
        memory-mapped ``.npy`` files) taken as their concatenation along rows
    packed : bool, whether both arrays are packed (uint8 packbits or uint64 words)

    Returns
    -------
    distances : (n_queries, N) int32
    """
    db, q_words, n_shards = _prepare(database, queries, packed)
    return _all_distances(db, q_words, n_shards, None)


def _all_distances(db: _Codes, q_words: np.ndarray, n_shards: int, bar) -> np.ndarray:
    """(n_queries, N) int32 distances, block by block (``bar``: a progress counter or None)."""
    out = np.empty((len(q_words), db.n), dtype=np.int32)
    transposed = _transposed(db, len(q_words))
    for start, stop, block in db.blocks(transposed):
        _distance_block(block, transposed, start, q_words, n_shards, out)
        if bar is not None:
            bar.update(stop - start)
    return out


def search(queries, database, k: int, *, packed: bool = False, progress: bool = False):
    """The k nearest database codes of each query in Hamming distance.

    Queries come first, as in ``faiss.knn(xq, xb, k)``. Ties are broken by the smaller
    database index. The database is read in blocks, so it may be a memory-mapped array
    larger than memory.

    Parameters
    ----------
    queries : (n_queries, K) codes, or (n_queries, K / 8) uint8 / (n_queries, W) uint64 with ``packed=True``
    database : (N, K) codes in the same layout, or a list of (N_s, K) arrays (shards, e.g.
        memory-mapped ``.npy`` files) taken as their concatenation along rows
    k : int, 1 <= k <= N
    packed : bool, whether both arrays are packed (uint8 packbits or uint64 words)
    progress : bool, show a progress bar on stderr

    Returns
    -------
    distances : (n_queries, k) int32, ascending along each row
    indices : (n_queries, k) int64, database rows
    """
    db, q_words, n_shards = _prepare(database, queries, packed)
    return _top_k(db, q_words, n_shards, check_k(k, db.n), progress)


def check_k(k, n: int) -> int:
    """Validate a number of neighbours against a database of ``n`` codes."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k: expected an integer, got {k!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= {n} (the number of database codes), got {k}")
    return int(k)


def rank(queries, database, *, packed: bool = False, progress: bool = False):
    """Full Hamming ranking of the database for each query (:func:`search` with k = N).

    Each ranking is a counting sort over the K + 1 distance values, O(N) per query;
    ties are broken by the smaller database index. Parameters as for :func:`search`.

    Returns
    -------
    distances : (n_queries, N) int32, ascending along each row
    indices : (n_queries, N) int64, a permutation of the database rows per query
    """
    db, q_words, n_shards = _prepare(database, queries, packed)
    return _top_k(db, q_words, n_shards, db.n, progress)


def _capacity(k: int, n: int) -> int:
    """Candidates held per state: k, and room for k + a chunk more before a cut to the best k."""
    return min(2 * k + _CHUNK, n)


def _top_k(db: _Codes, q_words: np.ndarray, n_shards: int, k: int, progress: bool):
    """Rank the database for each query batch; see :func:`search`.

    When the candidate buffers would hold the whole database (k near N), every distance
    is computed and each row counting-sorted instead.
    """
    n_queries = len(q_words)
    n_bins = 64 * db.n_words + 2  # distances 0 .. 64 W, and the bound "accept all" above them
    cap = _capacity(k, db.n)
    full = cap == db.n
    per_query = 4 * db.n if full else (12 * cap + 4 * n_bins) * n_shards
    batch = max(1, _STATE_BYTES // per_query)
    out_dist = np.empty((n_queries, k), dtype=np.int32)
    out_index = np.empty((n_queries, k), dtype=np.int64)
    with progress_bar(db.n * -(-n_queries // batch), progress, "code", desc="search") as bar:
        for q0 in range(0, n_queries, batch):
            q_batch = q_words[q0:q0 + batch]
            rows = slice(q0, q0 + batch)
            if full:
                distances = _all_distances(db, q_batch, n_shards, bar)
                _rank_rows(distances, k, n_bins, out_dist[rows], out_index[rows])
            else:
                _scan_candidates(db, q_batch, n_shards, k, cap, n_bins, bar,
                                 out_dist[rows], out_index[rows])
    return out_dist, out_index


def _scan_candidates(db, q_words, n_shards, k, cap, n_bins, bar, out_dist, out_index):
    """Top k of each query through the bounded candidate buffers of :func:`_scan_block`."""
    n_states = len(q_words) * n_shards
    cand_dist = np.empty((n_states, cap), dtype=np.int32)
    cand_index = np.empty((n_states, cap), dtype=np.int64)
    n_cand = np.zeros(n_states, dtype=np.int64)
    hist = np.zeros((n_states, n_bins), dtype=np.int32)
    bound = np.full(n_states, n_bins - 1, dtype=np.int64)
    below = np.zeros(n_states, dtype=np.int64)
    transposed = _transposed(db, len(q_words))
    for start, stop, block in db.blocks(transposed):
        _scan_block(block, transposed, start, q_words, n_shards, k, cand_dist, cand_index,
                    n_cand, hist, bound, below)
        if bar is not None:
            bar.update(stop - start)
    _finish(cand_dist, cand_index, n_cand, n_shards, k, n_bins, out_dist, out_index)


def merge_top_k(distances: list, indices: list, k: int):
    """Merge top-k lists of disjoint parts of a database into the top k of the whole.

    Parameters
    ----------
    distances : list of (n_queries, k_s) arrays, each ascending (as :func:`search` returns).
    indices : list of (n_queries, k_s) int arrays, rows of the whole database.
    k : int, at most the sum of the k_s.

    Returns
    -------
    distances : (n_queries, k) int32; indices : (n_queries, k) int64, ordered by
    (distance, index), the order of :func:`search` on the whole database.
    """
    d = np.concatenate([np.asarray(part, dtype=np.int64) for part in distances], axis=1)
    i = np.concatenate([np.asarray(part, dtype=np.int64) for part in indices], axis=1)
    if not 1 <= k <= d.shape[1]:
        raise ValueError(f"k: expected 1 <= k <= {d.shape[1]} (the merged candidates), got {k}")
    if i.size and (i.min() < 0 or d.min() < 0):
        raise ValueError("indices: expected non-negative distances and indices")
    span = int(i.max()) + 1 if i.size else 1
    if (int(d.max()) + 1) * span >= 1 << 63:  # no int64 key: sort by the pair
        order = np.lexsort((i, d), axis=-1)[:, :k]
        return np.take_along_axis(d, order, axis=1).astype(np.int32), np.take_along_axis(i, order, axis=1)
    keys = d * span + i  # one int64 key per candidate, in (distance, index) order
    if k < keys.shape[1]:
        keys = np.partition(keys, k - 1, axis=1)[:, :k]
    keys.sort(axis=1)
    return (keys // span).astype(np.int32), keys % span
