"""Benchmarks of the torch backend's noise sampling (issue 6: backends).

1. Throughput of ``TorchBackend.sample_noisy`` (noise, forward passes, float64
   accumulation of the mean and the norm statistics) against a hand-written
   torch loop doing the same work on the same model and batch size: per query
   a seeded ``torch.Generator``, ``x + sigma * randn`` per batch, the forward
   pass in inference mode, and running float64 sums of h, ||h||^2, ||h||^4 and
   the smallest and largest norm, kept on the device. Target: at least 0.95x
   the loop's draws per second. The two alternate query by query, and the
   ratio is the median over rounds.
2. Peak memory of one query at n = 1,000 and n = 100,000 draws, each in a
   fresh process: the growth of the peak resident set (VmHWM, reset through
   /proc/self/clear_refs after a warm-up call), plus the CUDA allocator's peak
   on a GPU. glibc's malloc is pinned to mmap for blocks of 128 KiB and more
   (MALLOC_MMAP_THRESHOLD_), so that the resident set follows the live
   memory rather than what the allocator keeps after frees. Target: the same
   at both n.

Models: the small CNN that ``minrr train`` builds by default (width 32,
128-d, 28 x 28 inputs) and a linear 784 -> 128 embedding, where the forward
pass is cheapest and any overhead of the backend shows most.

Run: python bench/bench_backends.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from minrr.backends import get_backend
from minrr.backends.models import ModelSpec, build_model
from minrr.data import fashion_mnist_subset

from machine import describe

BATCH = 1000
SIGMA = 0.25


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(784, 128)

    def forward(self, x):
        return torch.nn.functional.normalize(self.layer(x.flatten(1)), dim=1)


def _model(name: str, device) -> torch.nn.Module:
    if name == "small-cnn":
        model = build_model(ModelSpec("small-cnn", 1, "embedding", 128, mean=(0.29,), std=(0.35,)), seed=0)
    else:
        model = _Linear()
    return model.to(device).eval()


def _images(count: int) -> np.ndarray:
    return fashion_mnist_subset()["test_images"][:count, None]


def hand_loop(model, images, sigma, n, seed, batch_size, device):
    """The peer: what one writes by hand for the same Monte-Carlo statistics."""
    means = []
    with torch.inference_mode():
        for i, image in enumerate(images):
            x = torch.from_numpy(image).to(device).float().div_(255.0)
            generator = torch.Generator(device=device).manual_seed(seed + i)
            total = torch.zeros(model(x[None]).shape[1], dtype=torch.float64, device=device)
            sq_sum = torch.zeros((), dtype=torch.float64, device=device)
            fourth = torch.zeros((), dtype=torch.float64, device=device)
            low = torch.full((), float("inf"), dtype=torch.float64, device=device)
            high = torch.zeros((), dtype=torch.float64, device=device)
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                noise = torch.randn((b, *x.shape), generator=generator, device=device)
                out = model(x + sigma * noise).double()
                sq = out.pow(2).sum(dim=1)
                total += out.sum(dim=0)
                sq_sum += sq.sum()
                fourth += sq.pow(2).sum()
                low = torch.minimum(low, sq.min().sqrt())
                high = torch.maximum(high, sq.max().sqrt())
            means.append((total / n).cpu().numpy())
    return np.stack(means)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def throughput(model_name, device, n, rounds):
    """Median draws/s of both and the median of their per-round ratios. Each round samples one
    query both ways, back to back, in alternating order, so that a change in the machine's load
    (it may be shared) hits both alike."""
    model = _model(model_name, device)
    backend = get_backend("torch", device=device)
    images = _images(rounds)
    backend.sample_noisy(model, images[:1], SIGMA, 2 * BATCH, batch_size=BATCH)  # warm-up
    hand_loop(model, images[:1], SIGMA, 2 * BATCH, 0, BATCH, device)
    runs = {
        "minrr": lambda i: backend.sample_noisy(model, images[i:i + 1], SIGMA, n, seed=0, first_index=i,
                                                batch_size=BATCH),
        "loop": lambda i: hand_loop(model, images[i:i + 1], SIGMA, n, i, BATCH, device),
    }
    seconds = {"minrr": [], "loop": []}
    for i in range(rounds):
        for name in (("minrr", "loop") if i % 2 else ("loop", "minrr")):
            _sync(device)
            start = time.perf_counter()
            runs[name](i)
            _sync(device)
            seconds[name].append(time.perf_counter() - start)
    ours, loop = np.array(seconds["minrr"]), np.array(seconds["loop"])
    return float(np.median(n / ours)), float(np.median(n / loop)), float(np.median(loop / ours))


def _peak_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM"))


def memory_child(method, model_name, device, n):
    """Run in a fresh process: peak growth of the resident set (KiB) while sampling one query."""
    model = _model(model_name, device)
    backend = get_backend("torch", device=device)
    image = _images(1)

    def run(draws):
        if method == "minrr":
            backend.sample_noisy(model, image, SIGMA, draws, batch_size=BATCH)
        else:
            hand_loop(model, image, SIGMA, draws, 0, BATCH, device)

    run(2 * BATCH)  # warm-up: allocator pools, kernels, first-touch of the weights
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident set
    before = _peak_kib()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run(n)
    gpu = torch.cuda.max_memory_allocated() // 1024 if torch.device(device).type == "cuda" else None
    print(json.dumps({"rss_kib": _peak_kib() - before, "gpu_kib": gpu}))


def memory(method, model_name, device, n):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # see the module docstring
    out = subprocess.run([sys.executable, __file__, "--memory-child", method, model_name, device, str(n)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer draws, for a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-memory", action="store_true", help="time the throughput only")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        method, model_name, device, n = args.memory_child
        memory_child(method, model_name, device, int(n))
        return
    print(f"machine: {describe(torch, np)} ({torch.get_num_threads()} torch threads), device {args.device}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"git: {commit}")
    n, rounds = (2000, 4) if args.quick else (3000, 16)
    print(f"\nthroughput: {rounds} rounds of one query x {n} draws each way, batch {BATCH}, sigma {SIGMA}; medians")
    print("| model | minrr sample_noisy (draws/s) | hand-written torch loop (draws/s) | ratio (target >= 0.95) |")
    print("|---|---|---|---|")
    for name in ("small-cnn", "linear"):
        ours, loop, ratio = throughput(name, args.device, n, rounds)
        print(f"| {name} | {ours:,.0f} | {loop:,.0f} | {ratio:.3f} |")
    if args.skip_memory:
        return
    sizes = (1000, 10_000) if args.quick else (1000, 100_000)
    print(f"\npeak memory growth while sampling one query (small-cnn, batch {BATCH}), fresh process each")
    print(f"| method | n = {sizes[0]:,} (MiB) | n = {sizes[1]:,} (MiB) | ratio (target 1) |")
    print("|---|---|---|---|")
    for method in ("minrr", "loop"):
        small, large = (memory(method, "small-cnn", args.device, size) for size in sizes)
        for key in ("rss_kib", "gpu_kib"):
            if small[key] is None:
                continue
            label = "minrr sample_noisy" if method == "minrr" else "hand-written loop"
            kind = "RSS" if key == "rss_kib" else "CUDA allocated"
            ratio = large[key] / small[key] if small[key] else float("nan")
            print(f"| {label}, {kind} | {small[key] / 1024:.1f} | {large[key] / 1024:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
