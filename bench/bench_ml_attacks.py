"""Benchmark of the robrank metric-learning attack suite (issue 10): its time against its bare passes.

``minrr.backends.ml_attacks.robrank_suite`` (the nine attacks CA+ ... GTT, 32 PGD steps
each, with the clean gallery, the selections, the ranking losses over the whole gallery and
the float64 measurements) is timed end to end, and against it the bare cost of the network
work it cannot avoid: the same number of forward + input-backward passes of the same model
at the same batch sizes (per attack and batch: ``steps`` passes ``autograd.grad(model(x).sum(),
x)`` and one forward pass to measure; plus the forward passes that embed the gallery), timed
in its own loop. Target: suite / bare <= 1.15 in wall time; the CPU time of the process is
reported beside it (steadier on a shared machine).

Each side runs once to warm up, then both run ``--rounds`` times, alternating; the table
gives the best time of each (the steady state), and the ratio of the bests. The model is the
small CNN that ``minrr train`` builds by default (width 32, 128-d; untrained and seeded: the
attacks take every step whatever the weights), on 28 x 28 Fashion-MNIST images of the
bundled test split, which is also the gallery.

Run: python bench/bench_ml_attacks.py [--quick] [--device cpu|cuda] [--queries N]
(``--quick``: 64 queries, 2 rounds, a smoke run; the default attacks all 1,000 test items).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from minrr.backends.ml_attacks import ROBRANK_STEPS, robrank_suite
from minrr.backends.models import ModelSpec, build_model
from minrr.data import fashion_mnist_subset
from minrr.scores import ATTACKS

from machine import describe

RESULTS = Path(__file__).parent / "results" / "ml_attacks.md"


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bare_passes(model, images, n_queries, batch_size, steps, device) -> None:
    """The suite's network work alone: gallery forward passes, then per attack and batch
    ``steps`` forward + input-backward passes and one forward pass."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            F.normalize(model(images[start:start + batch_size]), dim=1)
    for _ in ATTACKS:
        for start in range(0, n_queries, batch_size):
            x = images[start:min(start + batch_size, n_queries)]
            for _ in range(steps):
                x = x.detach().requires_grad_(True)
                (gradient,) = torch.autograd.grad(F.normalize(model(x), dim=1).sum(), x)
                x = (x + 1e-3 * gradient.sign()).clamp(0, 1)
            with torch.no_grad():
                F.normalize(model(x), dim=1)
    for p in model.parameters():
        p.requires_grad_(True)


def best_times(runs: dict, rounds: int, device) -> dict:
    """Best (wall, CPU) seconds of each callable in ``runs`` over ``rounds`` rounds after a
    warm-up; the callables alternate within each round, so that a change of load hits both."""
    for run in runs.values():
        run()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            _sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            _sync(device)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: tuple(min(column) for column in zip(*values)) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 queries and 2 rounds, for a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--queries", type=int, help="test items attacked (default: all 1000; --quick: 64)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, help="timed runs of each side (default: 3; --quick: 2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results table (default: {RESULTS})")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = fashion_mnist_subset()
    images, labels = data["test_images"][:, None], data["test_labels"].astype(np.int64)
    n_queries = args.queries or (64 if args.quick else len(images))
    rounds = args.rounds or (2 if args.quick else 3)
    model = build_model(ModelSpec("small-cnn", 1, "embedding", 128, mean=(0.29,), std=(0.35,)), seed=0)
    model = model.to(args.device).eval()
    device_images = torch.from_numpy(images).to(args.device).float().div_(255.0)
    machine = describe(torch, np)
    print(machine)

    # The bare loop takes the first n_queries items; the suite's seeded subset has the same size.
    max_queries = None if n_queries >= len(images) else n_queries
    best = best_times({
        "suite": lambda: robrank_suite(model, images, labels, max_queries=max_queries, device=args.device,
                                       batch_size=args.batch_size),
        "bare": lambda: bare_passes(model, device_images, n_queries, args.batch_size, ROBRANK_STEPS, args.device),
    }, rounds, args.device)
    (suite, suite_cpu), (bare, bare_cpu) = best["suite"], best["bare"]
    ratio, ratio_cpu = suite / bare, suite_cpu / bare_cpu
    passes = len(ATTACKS) * n_queries * (ROBRANK_STEPS + 1) + len(images)
    print(f"wall: suite {suite:.2f} s, bare passes {bare:.2f} s, ratio {ratio:.3f} (target <= 1.15)")
    print(f"CPU:  suite {suite_cpu:.2f} s, bare passes {bare_cpu:.2f} s, ratio {ratio_cpu:.3f}")

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "unknown"
    threads = torch.get_num_threads() if args.device == "cpu" else "-"
    size = "full size" if n_queries == len(images) else \
        f"reduced size ({n_queries} queries: a smoke run on a shared machine, not the reference figure)"
    args.out.write_text(f"""# Metric-learning attack suite benchmark (`bench/bench_ml_attacks.py`)

The whole robrank suite (`minrr.backends.ml_attacks.robrank_suite`: CA+, CA-, QA+, QA-, TMA,
ES, LTM, GTM, GTT; L-inf eps 8/255, alpha 3/255, {ROBRANK_STEPS} steps; clean gallery, selections,
ranking losses over the whole gallery, float64 measurements) against the bare cost of its
network work: the same number of forward + input-backward passes of the same model at the
same batch sizes, timed in its own loop. Model: the default small CNN of `minrr train`
(width 32, 128-d) on the {len(images)} bundled Fashion-MNIST test images (28 x 28), which are
also the gallery. Best of {rounds} alternating runs after a warm-up, each side.

Machine: {machine}; device {args.device}, {threads} torch threads; git {commit} plus the working
tree. Run: {size}.

| queries | batch | image passes | time | suite (s) | bare passes (s) | ratio (target <= 1.15) |
|---|---|---|---|---|---|---|
| {n_queries} | {args.batch_size} | {passes:,} | wall | {suite:.2f} | {bare:.2f} | {ratio:.3f} |
| | | | CPU | {suite_cpu:.2f} | {bare_cpu:.2f} | {ratio_cpu:.3f} |

The target is on wall time. CPU time (the process's, all threads) is the steadier measure on a
shared CPU machine, where the wall time of either side depends on the other jobs; on a GPU
only the wall time means anything.

Command: `python bench/bench_ml_attacks.py {shlex.join(sys.argv[1:])}`
""")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
