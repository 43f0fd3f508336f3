"""Benchmarks of certification (issue: foundation and certification core).

1. Certifying 10,000 queries against 60,000 exact gallery embeddings of 128
   dims, timed against one plain float32 GEMM of the same shapes in the same
   run (target: at most 1.3x), and the peak memory of certification at
   gallery sizes 30,000 / 60,000 / 120,000 (target: under 1.5 GB and
   independent of the gallery size), measured with tracemalloc, which sees
   every NumPy allocation.
2. On the bundled default: the median certified radius of the default bound
   against RetrievalGuard's printed bound ('paper') at the same n and alpha.

Run: python bench/bench_certify.py [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import time
import tracemalloc

import numpy as np

from minrr.bundled import DEFAULT_SAMPLES, DEFAULT_SIGMAS, run_bundled
from minrr.certify import certify
from minrr.smoothing import from_means

from machine import describe


def _problem(n_queries, n_gallery, dim, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(100, dim))
    g_labels = rng.integers(0, 100, n_gallery)
    q_labels = rng.integers(0, 100, n_queries)
    gallery = centers[g_labels] + 2.0 * rng.normal(size=(n_gallery, dim))
    queries = centers[q_labels] + 2.0 * rng.normal(size=(n_queries, dim))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return (from_means(queries * 0.9, 100_000), q_labels, gallery.astype(np.float32), g_labels)


def _certify(problem):
    estimate, q_labels, gallery, g_labels = problem
    return certify(estimate, q_labels, sigma=0.5, gallery=gallery, gallery_labels=g_labels, norm_bound=1.0)


def bench_speed(n_queries, n_gallery, dim, repeats):
    problem = _problem(n_queries, n_gallery, dim)
    a = problem[0].mean.astype(np.float32)
    b = problem[2]
    _certify(_problem(50, 500, dim))  # compile / load the cached kernels
    gemm, cert = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        product = a @ b.T
        gemm.append(time.perf_counter() - t)
        del product
        t = time.perf_counter()
        _certify(problem)
        cert.append(time.perf_counter() - t)
    return min(gemm), min(cert)


def bench_memory(n_queries, n_gallery, dim):
    problem = _problem(n_queries, n_gallery, dim)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    _certify(problem)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


def bench_bundled(n_samples):
    """Per sigma: medians of both bounds' radii (0 = not certified), medians over the queries
    both bounds certify, and the certified shares."""
    sigmas = DEFAULT_SIGMAS
    default = run_bundled(sigmas, n_samples=n_samples)
    paper = run_bundled(sigmas, n_samples=n_samples, bound="paper")
    rows = []
    for sigma, d, p in zip(sigmas, default, paper):
        both = d.certified & p.certified
        rows.append((sigma, float(np.median(d.radius)), float(np.median(p.radius)),
                     float(np.median(d.radius[both])), float(np.median(p.radius[both])),
                     float(d.certified.mean()), float(p.certified.mean())))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    args = parser.parse_args()
    nq, ng, dim = (2000, 12000, 128) if args.quick else (10_000, 60_000, 128)
    print(f"machine: {describe(np)}")
    print(f"git: {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}")
    gemm, cert = bench_speed(nq, ng, dim, repeats=3)
    print(f"\n| task ({nq} x {ng} x {dim}) | seconds (best of 3) | ratio to GEMM |")
    print("|---|---|---|")
    print(f"| plain float32 GEMM (numpy matmul) | {gemm:.3f} | 1.00 |")
    print(f"| minrr certify, exact gallery, Recall@1 | {cert:.3f} | {cert / gemm:.2f} |")
    print("\n| gallery size | peak traced memory of certify (MB) |")
    print("|---|---|")
    for size in (ng // 2, ng, 2 * ng):
        print(f"| {size} | {bench_memory(nq, size, dim) / 2**20:.0f} |")
    n = 2000 if args.quick else DEFAULT_SAMPLES
    print(f"\nbundled default (Fashion-MNIST subset, LDA, n = {n}, alpha = 0.001)")
    print("| sigma | median radius, e-b (default) | median radius, paper | median over queries both certify, e-b / paper | ratio | certified share, e-b / paper |")
    print("|---|---|---|---|---|---|")
    for sigma, d, p, d_both, p_both, cd, cp in bench_bundled(n):
        print(f"| {sigma:g} | {d:.4g} | {p:.4g} | {d_both:.4g} / {p_both:.4g} | {d_both / p_both:.2f} | {cd:.3f} / {cp:.3f} |")


if __name__ == "__main__":
    main()
