"""Benchmarks of the retrieval metrics (issue 11: metrics at GEMM speed).

1. Recall@{1,2,4,8} (``recall_at_k``) and AP with AP@R in one pass
   (``average_precision``) on 10,000 queries that are their own gallery,
   128 dims, against one plain float32 GEMM of the same shapes (target: at
   most 1.5x each), and against pytorch-metric-learning's
   ``AccuracyCalculator`` (faiss inside) on the same data, computing P@1 and
   mAP@R with its default k (target: both minrr calls together faster). Two
   label structures: 100 classes (about 100 relevant items per query) and
   2,000 classes (about 5, as in SOP); at other sizes (--quick, --size) the
   same shares, n / 100 and n / 5 classes.
2. SOP-sized random data: 60,000 x 512, 11,318 classes, R@1/2/4/8 then mAP
   and mAP@R (target: under a minute on 2 cores).
3. Peak traced memory (tracemalloc, every NumPy allocation) of both metrics
   for 2,000 queries against galleries of 10,000 / 20,000 / 40,000 items
   (target: independent of the gallery size).

Each side is timed in its own loop, best of 3, after a warm-up call; the
GEMM is timed in steady state (a GEMM first, then the timed ones), never
right after another library's parallel region. The metrics run one BLAS
thread per worker thread, so one thread pool is busy at a time.

Run: python bench/bench_metrics.py [--quick | --size N] [--skip-sop] [--skip-pml]
"""

from __future__ import annotations

import argparse
import subprocess
import time
import tracemalloc

import numpy as np

from minrr.metrics.retrieval import average_precision, recall_at_k

from machine import describe
from timing import best_of

KS = [1, 2, 4, 8]


def clustered(n, dim, n_classes, seed=0, noise=2.0):
    """Unit-norm float32 embeddings around random class centres; every class holds n / n_classes items."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % n_classes)
    centres = rng.normal(size=(n_classes, dim))
    emb = centres[labels] + noise * rng.normal(size=(n, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), labels


def gemm_seconds(a, b, repeats=3):
    """One float32 ``a @ b.T`` in steady state: a first product, then the best of ``repeats``."""
    product = a @ b.T
    del product
    return best_of(lambda: a @ b.T, repeats)


def pml_calculator():
    """pytorch-metric-learning's AccuracyCalculator, or None when it (or torch / faiss) is missing."""
    try:
        import faiss  # noqa: F401
        import torch
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    except ImportError:
        return None
    return AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), device=torch.device("cpu"))


def bench_speed(n, dim, n_classes, calculator):
    emb, labels = clustered(n, dim, n_classes)
    recall_at_k(emb[:200], labels[:200], KS)  # compile / load the cached kernels
    average_precision(emb[:200], labels[:200])
    gemm = gemm_seconds(emb, emb)
    recall = best_of(lambda: recall_at_k(emb, labels, KS), 3)
    precisions = best_of(lambda: average_precision(emb, labels), 3)
    theirs = None
    if calculator is not None:
        ours = (recall_at_k(emb, labels, 1), *(float(np.nanmean(v)) for v in average_precision(emb, labels)))
        result = calculator.get_accuracy(emb, labels)
        agree = (abs(ours[0] - result["precision_at_1"]) < 1e-6
                 and abs(ours[2] - result["mean_average_precision_at_r"]) < 1e-5)
        theirs = (best_of(lambda: calculator.get_accuracy(emb, labels), 3), agree)
    return gemm, recall, precisions, theirs


def bench_sop(n, dim, n_classes):
    emb, labels = clustered(n, dim, n_classes, seed=1)
    start = time.perf_counter()
    recall = recall_at_k(emb, labels, KS)
    middle = time.perf_counter()
    ap, ap_at_r = average_precision(emb, labels)
    end = time.perf_counter()
    return middle - start, end - middle, recall, float(np.nanmean(ap)), float(np.nanmean(ap_at_r))


def bench_memory(n_queries, n_gallery, dim, n_classes):
    gallery, g_labels = clustered(n_gallery, dim, n_classes, seed=2)
    queries, q_labels = clustered(n_queries, dim, n_classes, seed=3)
    peaks = []
    for metric in (lambda: recall_at_k(queries, q_labels, KS, gallery=gallery, gallery_labels=g_labels),
                   lambda: average_precision(queries, q_labels, gallery=gallery, gallery_labels=g_labels)):
        metric()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        metric()
        peaks.append(tracemalloc.get_traced_memory()[1] - base)
        tracemalloc.stop()
    return peaks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    parser.add_argument("--size", type=int, default=10_000, help="queries (their own gallery) of the speed table")
    parser.add_argument("--skip-sop", action="store_true", help="leave out the SOP-sized run")
    parser.add_argument("--skip-pml", action="store_true", help="leave out pytorch-metric-learning")
    args = parser.parse_args()
    n, dim = (2000, 128) if args.quick else (args.size, 128)
    sop = (6000, 512, 1132) if args.quick else (60_000, 512, 11_318)
    print(f"machine: {describe(np)}")
    print(f"git: {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}")
    calculator = None if args.skip_pml else pml_calculator()

    print(f"\n| task ({n} x {n} x {dim}, own gallery) | classes | seconds (best of 3) | ratio to GEMM |")
    print("|---|---|---|---|")
    for n_classes in (n // 100, n // 5):
        gemm, recall, precisions, theirs = bench_speed(n, dim, n_classes, calculator)
        print(f"| plain float32 GEMM (numpy matmul) | {n_classes} | {gemm:.3f} | 1.00 |")
        print(f"| minrr recall_at_k, k = 1, 2, 4, 8 | {n_classes} | {recall:.3f} | {recall / gemm:.2f} |")
        print(f"| minrr average_precision (AP and AP@R) | {n_classes} | {precisions:.3f} | {precisions / gemm:.2f} |")
        print(f"| minrr R@1, 2, 4, 8, mAP and mAP@R (both calls) | {n_classes} | {recall + precisions:.3f} | "
              f"{(recall + precisions) / gemm:.2f} |")
        if theirs is not None:
            seconds, agree = theirs
            print(f"| pytorch-metric-learning AccuracyCalculator (P@1, mAP@R; faiss){'' if agree else ' DISAGREES'} "
                  f"| {n_classes} | {seconds:.3f} | {seconds / gemm:.2f} |")

    if not args.skip_sop:
        seconds_r, seconds_ap, recall, m_ap, m_ap_r = bench_sop(*sop)
        print(f"\nSOP-sized: {sop[0]} x {sop[1]}, {sop[2]} classes")
        print("| metrics | seconds | values |")
        print("|---|---|---|")
        print(f"| R@1, 2, 4, 8 | {seconds_r:.1f} | {', '.join(f'{r:.4f}' for r in recall)} |")
        print(f"| mAP, mAP@R | {seconds_ap:.1f} | {m_ap:.4f}, {m_ap_r:.4f} |")
        print(f"| total | {seconds_r + seconds_ap:.1f} | |")

    n_queries = 500 if args.quick else 2000
    print(f"\n| gallery size | peak traced memory, recall_at_k (MB) | average_precision (MB) |  ({n_queries} queries)")
    print("|---|---|---|")
    for size in ((2500, 5000, 10_000) if args.quick else (10_000, 20_000, 40_000)):
        peaks = bench_memory(n_queries, size, dim, 100)
        print(f"| {size} | {peaks[0] / 2**20:.1f} | {peaks[1] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
