"""Timing helpers shared by the benchmarks: each side in its own loop, best of its runs."""

from __future__ import annotations

import time


def best_of(run, repeats: int) -> float:
    """Best wall seconds of ``repeats`` calls of ``run`` in a row."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def own_loops(ways: dict, repeats: int, *, warm_up: bool = True) -> dict:
    """Best seconds of each callable of ``ways``, each timed in its own loop of ``repeats`` calls
    after one untimed call (``warm_up``), so that no side is timed right after another's code
    (whose thread pools may still be busy) and each is measured in its steady state."""
    best = {}
    for name, run in ways.items():
        if warm_up:
            run()
        best[name] = best_of(run, repeats)
    return best
