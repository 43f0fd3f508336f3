"""Cost of adversarial training (issue 12): one defended epoch against (steps + 1) plain epochs.

For each defence, one epoch of :func:`minrr.backends.defences.fit` on the same model, data
and batch size is timed against one epoch of plain training (``defense="none"``), each side
in its own loop, best of ``--repeats`` runs from the same initial weights (the plain epoch: best
of all the task's plain runs, ``--repeats`` before each of its defences). The ratio is

    defended epoch / ((steps + 1) x plain epoch)

(target: at most 1.1). ``steps`` is the defence's PGD steps; for FreeAT, which takes one
weight step per replay and no separate attack, the reference is ``replays`` plain epochs.
COLO-TRIDE's CAP stops early once a batch collapses, so its ratio can fall below 1.

Model: the small CNN that ``minrr train`` builds by default (width 32, 128-d embedding or
64-bit hash, 28 x 28 inputs), batch 128, on the bundled Fashion-MNIST subset.

Run: python bench/bench_defences.py [--quick] [--images N] [--device cpu|cuda] [--defences freeat ...]
[--out bench/results/defences.md] (--quick: 256 images, width 8, one repeat, results printed only unless
--out is given; --defences: only these rows, results printed only unless --out is given.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minrr.backends import get_backend
from minrr.backends.defences import defence_settings, fit
from minrr.backends.models import ModelSpec, build_model
from minrr.data import fashion_mnist_subset

from machine import describe

CASES = [("dml", "naive"), ("dml", "act"), ("dml", "hm"), ("dml", "colo-tride"), ("hash", "freeat")]


def _epoch_seconds(task, defense, images, labels, backend, width, batch_size) -> float:
    head, dim = ("embedding", 128) if task == "dml" else ("hash", 64)
    model = build_model(ModelSpec("small-cnn", 1, head, dim, width=width, mean=(0.29,), std=(0.35,)), seed=0)
    settings = defence_settings(task, defense)
    if backend.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fit(model, images, labels, task=task, defense=defense, settings=settings, epochs=1, batch_size=batch_size,
        seed=0, backend=backend)
    if backend.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small size, one repeat, no results file")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each epoch; the best counts (default: 3)")
    parser.add_argument("--images", type=int, help="training images (default: all 5,000; --quick: 256)")
    parser.add_argument("--defences", nargs="+", choices=[d for _, d in CASES], metavar="DEFENCE",
                        help=f"only these rows ({', '.join(d for _, d in CASES)}; default: all)")
    parser.add_argument("--out", help="results table (default: bench/results/defences.md, none with --quick "
                                      "or --defences)")
    args = parser.parse_args(argv)
    data = fashion_mnist_subset()
    n, width, repeats = (256, 8, 1) if args.quick else (len(data["train_labels"]), 32, args.repeats)
    n = args.images or n
    images, labels = data["train_images"][:n, None], data["train_labels"][:n].astype(np.int64)
    backend = get_backend("torch", device=args.device)
    machine = describe(np, torch)
    batch_size = 128
    _epoch_seconds("dml", "none", images[:64], labels[:64], backend, width, 32)  # warm-up
    plain = {}  # task -> its plain epochs: the same work for every defence of the task, so all of them count
    defended = []
    for task, defense in CASES:
        if args.defences and defense not in args.defences:
            continue
        settings = defence_settings(task, defense)
        passes = settings["replays"] if defense == "freeat" else settings["attack_steps"] + 1
        plain.setdefault(task, []).extend(_epoch_seconds(task, "none", images, labels, backend, width, batch_size)
                                          for _ in range(repeats))
        times = [_epoch_seconds(task, defense, images, labels, backend, width, batch_size) for _ in range(repeats)]
        defended.append((task, defense, passes, min(times)))
        print(f"{task} {defense}: defended epoch {min(times):.2f} s, plain epochs so far "
              f"{', '.join(f'{t:.2f}' for t in plain[task])} s", flush=True)
    rows = [(task, defense, passes, min(plain[task]), seconds, seconds / (passes * min(plain[task])))
            for task, defense, passes, seconds in defended]
    lines = ["# Cost of adversarial training (bench/bench_defences.py)", "",
             f"Machine: {machine}; device {backend.device}.", "",
             f"One epoch of {n} bundled Fashion-MNIST images, small CNN of width {width}, batch {batch_size}, "
             f"best of {repeats}; the plain epoch is the best of every plain run of the task ({repeats} before "
             "each defence, each in its own loop): the same work for every row, whose timings vary by 20% "
             "from run to run here. Ratio = defended epoch / (passes x plain epoch), passes = PGD steps + 1 "
             "(FreeAT: replays); target <= 1.1.", "",
             "| task | defence | passes | plain epoch (s) | defended epoch (s) | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {t} | {d} | {p} | {a:.2f} | {b:.2f} | {r:.3f} |" for t, d, p, a, b, r in rows]
    out = args.out or (None if args.quick or args.defences else str(Path(__file__).parent / "results" / "defences.md"))
    if out:
        Path(out).write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
