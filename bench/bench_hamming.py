"""Benchmarks of Hamming search (issue 3), each against its peer in the same run.

1. Batch search: 1,000 queries against 1,000,000 random codes of 64 and 256 bits,
   k = 100, minrr.hashing.hamming.search against faiss IndexBinaryFlat, both on 2 threads
   (target: at least 2x faiss's queries per second). Distances must be equal; indices
   too, since both break ties by the smaller database index.
2. Single-query latency on the same databases (median of many queries).
3. mAP@all of 1,000 queries over 54,000 database codes of 64 bits (the CIFAR-10 split of
   DeepHash-pytorch), minrr.metrics.hashing.hamming_map against the argsort loop of
   DeepHash's CalcTopMap (stable argsort, so both rank ties alike and agree exactly).
4. First call in a fresh process (python -c: import, then one small search), with an
   empty Numba cache (compilation) and with the cache filled (cache load).

Timings are the best of --repeats runs, each peer in its own loop after a warm-up call
(its steady state), never timed right after the other's code.

Run: python bench/bench_hamming.py [--repeats R] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import faiss
import numba
import numpy as np

from minrr.hashing import hamming
from minrr.metrics.hashing import hamming_map

from machine import describe
from timing import own_loops

THREADS = 2


def bench_search(n_bits, n_database, n_queries, k, repeats, rng):
    database = rng.integers(0, 256, size=(n_database, n_bits // 8), dtype=np.uint8)
    queries = rng.integers(0, 256, size=(n_queries, n_bits // 8), dtype=np.uint8)
    index = faiss.IndexBinaryFlat(n_bits)
    index.add(database)
    ours = lambda q: hamming.search(q, database, k, packed=True)  # noqa: E731
    theirs = lambda q: index.search(q, k)  # noqa: E731
    d_ours, i_ours = ours(queries)
    d_faiss, i_faiss = theirs(queries)
    times = own_loops({"ours": lambda: ours(queries), "faiss": lambda: theirs(queries)}, repeats)
    t_ours, t_faiss = times["ours"], times["faiss"]
    same_dist = bool(np.array_equal(d_ours, d_faiss.astype(np.int32)))
    same_index = bool(np.array_equal(i_ours, i_faiss))

    # Single queries, each library in its own loop of 2 x 100 after a warm-up query, so that one
    # OpenMP runtime's idle threads do not slow the other's calls; the median of each counts.
    singles = queries[: min(100, n_queries)]
    lat_ours, lat_faiss = [], []
    for fn, out in ((ours, lat_ours), (theirs, lat_faiss)):
        fn(singles[:1])
        for q in np.concatenate([singles, singles]):
            start = time.perf_counter()
            fn(q[None])
            out.append(time.perf_counter() - start)
    return {
        "qps_ours": n_queries / t_ours, "qps_faiss": n_queries / t_faiss,
        "same_dist": same_dist, "same_index": same_index,
        "lat_ours": float(np.median(lat_ours)), "lat_faiss": float(np.median(lat_faiss)),
    }


def _argsort_map(database, queries, database_labels, query_labels):
    """DeepHash-pytorch's CalcTopMap at topk = N, with a stable argsort."""
    n_bits = database.shape[1]
    total = 0.0
    for q in range(len(queries)):
        relevant = (query_labels[q] == database_labels).astype(np.float32)
        distances = 0.5 * (n_bits - database @ queries[q])
        ranked = relevant[np.argsort(distances, kind="stable")]
        hits = int(ranked.sum())
        if hits:
            total += np.mean(np.linspace(1, hits, hits) / (np.flatnonzero(ranked) + 1.0))
    return total / len(queries)


def bench_map(n_database, n_queries, repeats, rng):
    n_bits, n_classes = 64, 10
    centres = rng.choice([-1.0, 1.0], size=(n_classes, n_bits))
    database_labels = rng.integers(0, n_classes, n_database)
    query_labels = rng.integers(0, n_classes, n_queries)

    def codes(labels):  # class centres with 30% of the bits flipped: a mid-range mAP
        flips = rng.random((len(labels), n_bits)) < 0.3
        return np.where(flips, -centres[labels], centres[labels])

    database, queries = codes(database_labels), codes(query_labels)
    m_ours = hamming_map(queries, database, query_labels, database_labels)
    m_argsort = _argsort_map(database, queries, database_labels, query_labels)
    times = own_loops({"ours": lambda: hamming_map(queries, database, query_labels, database_labels),
                       "argsort": lambda: _argsort_map(database, queries, database_labels, query_labels)},
                      max(1, repeats // 2), warm_up=False)  # the calls above were the warm-ups
    t_ours, t_argsort = times["ours"], times["argsort"]
    return {"t_ours": t_ours, "t_argsort": t_argsort, "map_ours": m_ours, "map_argsort": m_argsort}


FIRST_CALL = (
    "import time; t = time.perf_counter(); import numpy as np; from minrr.hashing import hamming; "
    "c = np.ones((1000, 64), np.int8); hamming.search(c[:5], c, 10); hamming.search(c[:1], c, 10); "
    "print(time.perf_counter() - t)"
)


def bench_first_call():
    """Seconds to import and run a first search in a fresh process: empty cache, then filled."""
    times = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("compile", "cache load"):
            out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, check=True,
                                 capture_output=True, text=True).stdout
            times[label] = float(out.split()[-1])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement; the best counts")
    parser.add_argument("--quick", action="store_true", help="100,000 database codes and 200 queries")
    args = parser.parse_args()
    numba.set_num_threads(THREADS)
    faiss.omp_set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    n_database, n_queries = (100_000, 200) if args.quick else (1_000_000, 1_000)

    print(f"machine: {describe(numba, faiss, np)}")
    print(f"command: python bench/bench_hamming.py --repeats {args.repeats}{' --quick' if args.quick else ''}")
    print(f"threads: {THREADS} (numba.set_num_threads, faiss.omp_set_num_threads); "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print()
    print(f"Batch search, {n_queries:,} queries x {n_database:,} codes, k = 100:")
    print()
    print("| bits | minrr q/s | faiss q/s | ratio | distances equal | indices equal "
          "| 1-query minrr | 1-query faiss | ratio |")
    print("|---:|---:|---:|---:|:---:|:---:|---:|---:|---:|")
    for n_bits in (64, 256):
        r = bench_search(n_bits, n_database, n_queries, 100, args.repeats, rng)
        print(f"| {n_bits} | {r['qps_ours']:,.0f} | {r['qps_faiss']:,.0f} | {r['qps_ours'] / r['qps_faiss']:.2f}x "
              f"| {'yes' if r['same_dist'] else 'NO'} | {'yes' if r['same_index'] else 'NO'} "
              f"| {r['lat_ours'] * 1e3:.3f} ms | {r['lat_faiss'] * 1e3:.3f} ms "
              f"| {r['lat_faiss'] / r['lat_ours']:.2f}x |")
    print()
    n_map = 5_400 if args.quick else 54_000
    m = bench_map(n_map, n_queries, args.repeats, rng)
    print(f"mAP@all, {n_queries:,} queries x {n_map:,} codes of 64 bits, 10 classes:")
    print()
    print("| implementation | seconds | mAP |")
    print("|---|---:|---:|")
    print(f"| minrr hamming_map (counting sort) | {m['t_ours']:.3f} | {m['map_ours']:.6f} |")
    print(f"| argsort loop (DeepHash CalcTopMap) | {m['t_argsort']:.3f} | {m['map_argsort']:.6f} |")
    print(f"| ratio | {m['t_argsort'] / m['t_ours']:.1f}x | equal: "
          f"{'yes' if abs(m['map_ours'] - m['map_argsort']) < 1e-9 else 'NO'} |")
    print()
    first = bench_first_call()
    print("First call in a fresh process (import + two small searches):")
    print()
    print("| Numba cache | seconds |")
    print("|---|---:|")
    for label, seconds in first.items():
        print(f"| {'empty (compile)' if label == 'compile' else 'filled (cache load)'} | {seconds:.2f} |")
    print()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
