"""Overhead of the Dask path against one process at the same total thread count (issue 11).

Three jobs, each way timed in its own loop (after a warm-up; certify: the first of its rounds),
best of ``--rounds``:

* ``certify --model``: a small CNN (``minrr train``'s default, width 32) certifying ``--queries``
  Fashion-MNIST test images with ``--samples`` noisy copies each. One process with torch on
  2 threads against a local cluster of 2 workers x 1 thread, started by the command
  (``--workers 2``, its start timed) and running before the timer starts (``--scheduler``, the
  way a cluster is used). The rows are checked equal (all columns but ``time``).
* Hamming search: 20,000 queries x 1,000,000 codes of 64 bits, k = 100 (a job of seconds: Dask
  spends milliseconds on each task, which a 0.1 s job would mostly measure). One process with Numba
  on 2 threads over one file against the same codes in 2 and in 4 shards on 2 workers x 1 Numba
  thread, split by queries (chunks of queries over every shard) and by shards (one task per shard,
  lists merged). Results checked equal.
* Retrieval metrics (``minrr.metrics.retrieval.query_statistics``, every metric but NMI): 20,000
  random embeddings of 512 dimensions in 5,000 classes, queries = gallery, in one process on 2
  Numba threads against chunks of queries (the default size) on 2 workers x 1 thread, each worker
  loading the embeddings from a folder of shards. Results checked equal.

Run: ``python bench/bench_distributed.py`` (about 12 minutes on 2 cores); writes
``bench/results/distributed.md`` with the machine. Target: overhead at most 10%.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from machine import describe
from timing import own_loops


def _quiet(function, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function(*args)


def _rows(path: Path) -> list[str]:
    return ["\t".join(line.split("\t")[:-1]) for line in path.read_text().splitlines()]


def bench_certify(root: Path, queries: int, samples: int, rounds: int) -> dict:
    import torch

    from minrr.backends.distributed import connect
    from minrr.cli.main import main

    torch.set_num_threads(2)
    model = root / "m.pt"
    assert _quiet(main, ["train", "--task", "dml", "--epochs", "1", "--out", str(model), "--device", "cpu"]) == 0
    common = ["certify", "--model", str(model), "--data", "bundled:test", "--sigma", "0.25", "--samples", str(samples),
              "--max", str(queries), "--device", "cpu"]
    with connect(workers=2) as client:
        ways = {"one process": [], "dask workers": ["--workers", "2", "--chunk-size", "4"],
                "dask scheduler": ["--scheduler", client.scheduler.address, "--chunk-size", "4"]}
        counter, outputs = itertools.count(), {}

        def way(name, extra):
            def run():
                out = root / f"{name.replace(' ', '-')}-{next(counter)}.tsv"
                assert _quiet(main, [*common, "--out", str(out), *extra]) == 0
                outputs.setdefault(name, out)
            return run

        # each way in its own loop; its first run is the warm-up (a certify run takes a minute)
        best = own_loops({name: way(name, extra) for name, extra in ways.items()}, rounds, warm_up=False)
    for name in ways:
        assert _rows(outputs["one process"]) == _rows(outputs[name]), name
    return best


def bench_search(root: Path, n_queries: int, rounds: int) -> dict:
    import numba

    from minrr.hashing import hamming
    from minrr.backends.distributed import SPLITS, connect, search_shards

    rng = np.random.default_rng(0)
    database = rng.integers(0, 256, size=(1_000_000, 8), dtype=np.uint8)
    queries = rng.integers(0, 256, size=(n_queries, 8), dtype=np.uint8)
    layouts = {}
    for n_shards in (2, 4):
        folder = root / f"shards-{n_shards}"
        folder.mkdir()
        size = len(database) // n_shards
        for s in range(n_shards):
            np.save(folder / f"shard-{s:05d}.npy", database[s * size:(s + 1) * size])
        layouts[n_shards] = sorted(folder.glob("*.npy"))
    np.save(root / "db.npy", database)
    numba.set_num_threads(2)
    with connect(workers=2) as client:
        expected = hamming.search(queries, np.load(root / "db.npy", mmap_mode="r"), 100, packed=True)
        ways = {"one process": lambda: hamming.search(queries, np.load(root / "db.npy", mmap_mode="r"), 100,
                                                      packed=True)}
        for split in SPLITS:
            for n_shards, shards in layouts.items():
                ways[f"dask {split} {n_shards}"] = partial(search_shards, client, shards, queries, 100, packed=True,
                                                          split=split)
        for name, way in ways.items():  # the check (and a first run: compiles on the workers)
            assert all(np.array_equal(a, b) for a, b in zip(way(), expected)), name
        return own_loops(ways, rounds)


def bench_evaluate(root: Path, n: int, dim: int, classes: int, rounds: int) -> dict:
    import numba

    from minrr.backends.distributed import connect, query_statistics_chunks
    from minrr.metrics.retrieval import query_statistics

    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    y = rng.integers(0, classes, n)
    folder = root / "embeddings"
    folder.mkdir()
    for s, start in enumerate(range(0, n, n // 4)):
        np.save(folder / f"part-{s:05d}.npy", x[start:start + n // 4])
    np.save(root / "labels.npy", y)
    numba.set_num_threads(2)
    with connect(workers=2) as client:
        expected = query_statistics(x, y)
        got = query_statistics_chunks(client, str(folder), str(root / "labels.npy"))  # the check
        assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(got, expected))
        return own_loops({
            "one process": lambda: query_statistics(x, y),
            "dask": lambda: query_statistics_chunks(client, str(folder), str(root / "labels.npy"))}, rounds)


def main() -> None:
    import distributed
    import numba
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=48)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--search-queries", type=int, default=20_000)
    parser.add_argument("--evaluate-size", type=int, default=20_000, help="embeddings of the metrics job")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        certify = bench_certify(Path(tmp), args.queries, args.samples, args.rounds)
        search = bench_search(Path(tmp), args.search_queries, args.rounds)
        evaluate = bench_evaluate(Path(tmp), args.evaluate_size, 512, args.evaluate_size // 4, args.rounds)
    lines = ["# Dask path against one process (`bench/bench_distributed.py`)", "",
             f"Command: `python bench/bench_distributed.py --queries {args.queries} --samples {args.samples} "
             f"--search-queries {args.search_queries} --evaluate-size {args.evaluate_size} --rounds {args.rounds}`",
             "",
             f"Machine: {describe(np, torch, numba, distributed)}", "",
             "Same total thread count both ways (2): one process on 2 threads against a local cluster of "
             "2 worker processes x 1 thread. Best of the rounds, each way in its own loop after a warm-up. Results checked equal "
             "(certify: every column but `time`).", "",
             "| job | one process (s) | Dask (s) | overhead |", "|---|---:|---:|---:|"]
    search_name = f"Hamming search, {args.search_queries:,} x 1,000,000 x 64 bits, k = 100"
    jobs = [(f"certify --model --workers 2 (cluster start included), {args.queries} queries x {args.samples} "
             "draws, small-cnn", certify, "dask workers"),
            ("certify --model --scheduler (a running local cluster), same job", certify, "dask scheduler"),
            *((f"{search_name}, {n} shards, split {split}", search, f"dask {split} {n}")
              for split in ("queries", "shards") for n in (2, 4)),
            (f"retrieval metrics (query_statistics), {args.evaluate_size:,} x 512, {args.evaluate_size // 4:,} "
             "classes, queries = gallery", evaluate, "dask")]
    for name, result, way in jobs:
        overhead = result[way] / result["one process"] - 1
        lines.append(f"| {name} | {result['one process']:.2f} | {result[way]:.2f} | {100 * overhead:+.1f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
