"""Benchmarks of certification (issues: certification core; 14, the halfspace certificate).

1. Speed: certifying 10,000 queries against 60,000 exact gallery embeddings
   of 128 dims, against one plain float32 GEMM of the same shapes in the same
   run. The GEMM is timed first, in its own loop (one warm-up, best of
   ``--repeats``), before any Numba parallel region has run (a GEMM timed
   right after one runs about twice as slow), and again at the end as a
   check. Each certificate is timed in its own loop too. certify runs its
   query blocks on Numba's thread count, each thread with its own
   single-threaded GEMMs (no Numba parallel region). Targets: RetrievalGuard's
   certificate at most 1.3x; the halfspace certificate with one candidate e+
   at most 2.5x. Extra candidates are timed too.
2. Memory: peak traced memory (tracemalloc, every NumPy allocation) of the
   halfspace certificate at gallery sizes M/2, M, 2M: it must not grow with M
   beyond O(M) per-item state.
3. Gain of each candidate e+ on the bundled default (Fashion-MNIST subset,
   LDA, n = 10,000, alpha = 1e-3, default bound): certified Recall@1 at
   several radii and the median radius, against its cost in (1).
4. The bounds on the bundled default: RetrievalGuard's certificate with the
   default bound against the paper's printed bound.

Run: python bench/bench_certify.py [--quick | --shape N M DIM] [--repeats R] [--skip-bundled]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
import tracemalloc

import numba
import numpy as np

from minrr.bundled import DEFAULT_SAMPLES, DEFAULT_SIGMAS, run_bundled
from minrr.certify import certified_recall, certify
from minrr.data import fashion_mnist_subset
from minrr.lda import fit_lda
from minrr.certify.smoothing import from_means

from machine import describe
from timing import best_of

CANDIDATES = (1, 2, 3, 5)
GAIN_CANDIDATES = (1, 2, 3, 5, 10)
GAIN_RADII = (0.01, 0.02, 0.05, 0.1)


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


def _certify(problem, **options):
    estimate, q_labels, gallery, g_labels = problem
    return certify(estimate, q_labels, sigma=0.5, gallery=gallery, gallery_labels=g_labels, norm_bound=1.0,
                   **options)


def _gemm(a, b, repeats):
    def run():
        product = a @ b.T
        del product

    run()  # warm-up: BLAS threads started, pages touched
    return best_of(run, repeats)


def bench_speed(n_queries, n_gallery, dim, repeats):
    """Seconds (best of ``repeats``): the GEMM before and after, and each certificate."""
    problem = _problem(n_queries, n_gallery, dim)
    a, b = problem[0].mean.astype(np.float32), problem[2]
    gemm_first = _gemm(a, b, repeats)  # before any Numba parallel region
    configs = [("retrievalguard", {"certificate": "retrievalguard"})]
    configs += [(f"halfspace, {c} candidate{'s' * (c > 1)}", {"certificate": "halfspace", "candidates": c})
                for c in CANDIDATES]
    small = _problem(50, 500, dim)
    for _, options in configs:
        _certify(small, **options)  # compile / load the cached kernels
    seconds = {name: best_of(lambda: _certify(problem, **options), repeats) for name, options in configs}
    time.sleep(2.0)  # let the Numba workers go idle before the check
    gemm_last = _gemm(a, b, repeats)
    return gemm_first, gemm_last, seconds


def bench_memory(n_queries, n_gallery, dim):
    problem = _problem(n_queries, n_gallery, dim)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    _certify(problem, certificate="halfspace", candidates=1)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


def bench_gain(n_samples, sigmas=(0.25, 1.0)):
    """Per sigma: certified Recall@1 at GAIN_RADII, median radius and seconds, for RetrievalGuard and for the
    halfspace certificate with each number of candidates."""
    data = fashion_mnist_subset()
    train = data["train_images"].reshape(len(data["train_images"]), -1) / 255.0
    test = data["test_images"].reshape(len(data["test_images"]), -1) / 255.0
    rows = []
    for sigma in sigmas:
        model = fit_lda(train, data["train_labels"], noise_variance=sigma ** 2)
        estimate = model.smoothed_estimate(test, sigma, n_samples, seed=0)
        args = dict(sigma=sigma, gallery=model.embed(train), gallery_labels=data["train_labels"], alpha=1e-3)
        configs = [("retrievalguard", {"certificate": "retrievalguard"})]
        configs += [(f"halfspace, {c}", {"candidates": c}) for c in GAIN_CANDIDATES]
        for name, options in configs:
            start = time.perf_counter()
            result = certify(estimate, data["test_labels"], **args, **options)
            seconds = time.perf_counter() - start
            rows.append((sigma, name, certified_recall(result, GAIN_RADII), float(np.median(result.radius)), seconds))
    return rows


def bench_bounds(n_samples):
    """Per sigma (RetrievalGuard's certificate): medians of both bounds' radii (0 = not certified), medians over
    the queries both bounds certify, and the certified shares."""
    sigmas = DEFAULT_SIGMAS
    default = run_bundled(sigmas, n_samples=n_samples, certificate="retrievalguard")
    paper = run_bundled(sigmas, n_samples=n_samples, bound="paper", certificate="retrievalguard")
    rows = []
    for sigma, d, p in zip(sigmas, default, paper):
        both = d.certified & p.certified
        rows.append((sigma, float(np.median(d.radius)), float(np.median(p.radius)),
                     float(np.median(d.radius[both])), float(np.median(p.radius[both])),
                     float(d.certified.mean()), float(p.certified.mean())))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer draws, for a smoke run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each task; the best counts (default 3)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("N", "M", "DIM"),
                        help="queries, gallery items and dimensions of the speed table (default 10000 60000 128)")
    parser.add_argument("--skip-bundled", action="store_true", help="only the speed and memory tables")
    args = parser.parse_args()
    nq, ng, dim = args.shape or ((2000, 12000, 128) if args.quick else (10_000, 60_000, 128))
    print(f"machine: {describe(np)}")
    print(f"git: {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}")
    gemm, gemm_last, seconds = bench_speed(nq, ng, dim, args.repeats)
    # Spinning OpenMP workers slow the next GEMM: say how the pools were set up.
    try:
        layer = numba.threading_layer()
    except ValueError:  # no Numba parallel region has run
        layer = "not started"
    print(f"numba threading layer: {layer}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"threads: numba {numba.get_num_threads()} (certify's threads, each with single-threaded BLAS)")
    print(f"\n| task ({nq} x {ng} x {dim}, exact gallery, Recall@1) | seconds (best of {args.repeats}) "
          "| ratio to GEMM |")
    print("|---|---|---|")
    print(f"| plain float32 GEMM (numpy matmul), timed first | {gemm:.3f} | 1.00 |")
    for name, sec in seconds.items():
        print(f"| minrr certify, {name} | {sec:.3f} | {sec / gemm:.2f} |")
    print(f"| plain float32 GEMM again, after the certificates | {gemm_last:.3f} | {gemm_last / gemm:.2f} |")
    if abs(gemm_last / gemm - 1) > 0.2:
        print("\nWARNING: the two GEMM timings differ by more than 20%: the machine is not quiet; rerun.")
    print("\n| gallery size | peak traced memory of the halfspace certificate, 1 candidate (MB) |")
    print("|---|---|")
    for size in (ng // 2, ng, 2 * ng):
        print(f"| {size} | {bench_memory(nq, size, dim) / 2**20:.0f} |")
    if args.skip_bundled:
        return
    n = 2000 if args.quick else DEFAULT_SAMPLES
    print(f"\ngain of each candidate e+ on the bundled default (n = {n}, alpha = 0.001, empirical-bernstein)")
    print("| sigma | certificate, candidates | " + " | ".join(f"R@1 at r={r:g}" for r in GAIN_RADII)
          + " | median radius | seconds (1,000 x 5,000) |")
    print("|---" * (4 + len(GAIN_RADII)) + "|")
    for sigma, name, recall, median, sec in bench_gain(n):
        print(f"| {sigma:g} | {name} | " + " | ".join(f"{v:.3f}" for v in recall) + f" | {median:.4g} | {sec:.2f} |")
    print(f"\nbounds on the bundled default, RetrievalGuard's certificate (n = {n}, alpha = 0.001)")
    print("| sigma | median radius, e-b (default) | median radius, paper | median over queries both certify, "
          "e-b / paper | ratio | certified share, e-b / paper |")
    print("|---|---|---|---|---|---|")
    for sigma, d, p, d_both, p_both, cd, cp in bench_bounds(n):
        print(f"| {sigma:g} | {d:.4g} | {p:.4g} | {d_both:.4g} / {p_both:.4g} | {d_both / p_both:.2f} "
              f"| {cd:.3f} / {cp:.3f} |")


if __name__ == "__main__":
    main()
