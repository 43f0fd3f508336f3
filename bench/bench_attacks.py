"""Peer check of minrr's PGD engine against torchattacks 3.5.1 (issue 10).

The classifier: a minrr embedding model (RetrievalNet small-cnn, width 32, 128-d, on
Fashion-MNIST-shaped 1 x 28 x 28 inputs) followed by a linear head to 10 classes, attacked
with the cross-entropy loss (untargeted, l-inf), random_start=False, on the bundled test images.

1. Same images: ``minrr.backends.attacks.PGD`` and ``torchattacks.PGD`` with the same eps, alpha
   and steps. Where float rounding flips the sign of a near-zero gradient a pixel may differ by
   a step; target: fewer than 0.1% of the pixels differ.
2. Throughput on the CPU at batch 256, 20 steps: images per second of each, each timed in its
   own loop after a warm-up, the two alternating round by round so that machine load hits both
   alike; best of the rounds. Target: minrr at least 0.95x torchattacks.

Run: python bench/bench_attacks.py [--quick] [--rounds 3] [--out bench/results/attacks.md]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torchattacks

from minrr.backends.attacks import PGD
from minrr.backends.models import ModelSpec, build_model
from minrr.data import fashion_mnist_subset

from machine import describe

EPS, ALPHA = 8 / 255, 2 / 255


def classifier() -> torch.nn.Module:
    """A minrr embedding model with a linear head: (B, 1, 28, 28) -> (B, 10) logits."""
    embedding = build_model(ModelSpec("small-cnn", 1, "embedding", 128, mean=(0.29,), std=(0.35,)), seed=0)
    torch.manual_seed(1)
    return torch.nn.Sequential(embedding, torch.nn.Linear(128, 10)).eval()


def data(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    subset = fashion_mnist_subset()
    images = torch.from_numpy(subset["test_images"][:batch, None].astype(np.float32) / 255)
    return images, torch.from_numpy(subset["test_labels"][:batch].astype(np.int64))


def seconds(attack, images, labels) -> float:
    started = time.perf_counter()
    attack(images, labels)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 32, 5 steps, one round: checks the script runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the results table (markdown) here")
    args = parser.parse_args()
    batch, steps, rounds = (32, 5, 1) if args.quick else (256, 20, args.rounds)
    machine = describe(torch, torchattacks)
    model = classifier()
    images, labels = data(batch)
    ours = PGD(model, eps=EPS, alpha=ALPHA, steps=steps, random_start=False)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=steps, random_start=False)

    a, b = ours(images, labels), theirs(images, labels)
    differ = (a - b).abs() > 1e-6
    fraction = float(differ.float().mean())
    largest = float((a - b).abs().max()) / ALPHA

    times = {"minrr": [], "torchattacks": []}
    for _ in range(rounds):
        for name, attack in (("minrr", ours), ("torchattacks", theirs)):
            seconds(attack, images[:8], labels[:8])  # warm-up of this attack's code path
            times[name].append(seconds(attack, images, labels))
    best = {name: batch / min(t) for name, t in times.items()}
    ratio = best["minrr"] / best["torchattacks"]
    same = "yes" if fraction < 1e-3 else "NO"
    fast = "yes" if ratio >= 0.95 else "NO"
    lines = [
        "# PGD engine against torchattacks 3.5.1",
        "",
        f"Machine: {machine}; torch threads: {torch.get_num_threads()}.",
        "",
        f"Command: `python bench/bench_attacks.py{' --quick' if args.quick else ''} --rounds {rounds}`",
        "",
        f"Classifier: minrr small-cnn (width 32, 128-d) + linear head to 10 classes, cross-entropy; "
        f"{batch} bundled Fashion-MNIST test images; l-inf, eps 8/255, alpha 2/255, {steps} steps, "
        "random_start=False.",
        "",
        "| check | minrr | torchattacks | ratio | target | met |",
        "|---|---|---|---|---|---|",
        f"| pixels that differ | {fraction:.4%} (largest {largest:.2f} steps) | | | < 0.1% | {same} |",
        f"| images/s, best of {rounds} (CPU, batch {batch}) | {best['minrr']:.1f} | {best['torchattacks']:.1f} | "
        f"{ratio:.3f} | >= 0.95 | {fast} |",
        "",
        "Rounds (seconds per batch): " + "; ".join(f"{name} " + ", ".join(f"{t:.3f}" for t in ts)
                                                  for name, ts in times.items()),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
