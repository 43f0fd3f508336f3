"""Backend work on a Dask cluster (``pip install 'minrr[distributed]'``).

minrr does not run a cluster of its own: it submits pure, chunked tasks to a
``dask.distributed`` scheduler, from a laptop's ``LocalCluster`` (``workers=K``) to a
Slurm or Kubernetes cluster started with dask-jobqueue or dask-kubernetes (``scheduler=
"tcp://host:8786"``). Only this module imports Dask; the core never does.

Every task is a function of its inputs alone (per-query seed streams, shard offsets), so
a task lost with a worker is simply run again elsewhere by the scheduler and the results,
gathered in chunk order by :func:`in_order`, are those of the single-process run.

* :func:`connect` opens a client (a local cluster, or a running scheduler);
* :func:`in_order` maps a function over chunks and yields the results in chunk order as
  soon as each prefix is complete (so rows can be written, and resumed, in order);
* :func:`worker_model` loads a checkpoint once per worker process, checked against the
  SHA-256 of the weights that the client saw;
* :func:`search_shards` runs Hamming top-k over a database stored as a folder of ``.npy``
  shards, one task per shard, and merges the lists by (distance, index).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from minrr import hamming

__all__ = ["connect", "in_order", "use_worker_threads", "worker_model", "shard_paths", "shard_rows",
           "search_shards"]


@contextlib.contextmanager
def connect(scheduler: str | None = None, workers: int | None = None, *, threads_per_worker: int = 1,
            timeout: float = 10.0):
    """A ``dask.distributed.Client``: to ``scheduler`` (an address) or to a new local cluster.

    Parameters
    ----------
    scheduler : address of a running scheduler, e.g. "tcp://10.0.0.1:8786".
    workers : without ``scheduler``, the worker processes of a ``LocalCluster``.
    threads_per_worker : threads of each local worker (set the total to the cores you have); every
        task runs its Numba kernels and torch on its worker's threads (:func:`use_worker_threads`).
        Give the workers of a running scheduler ``OMP_WAIT_POLICY=PASSIVE``.
    timeout : seconds to wait for the scheduler before giving up.
    """
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ValueError("scheduler: the Dask path needs dask.distributed "
                         "(pip install 'minrr[distributed]')") from None
    if (scheduler is None) == (workers is None):
        raise ValueError("scheduler: give either a scheduler address or a number of local workers")
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=f"{timeout}s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise ValueError(f"scheduler: cannot reach {scheduler} ({' '.join(str(exc).split())})") from None
        with client:
            yield client
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected a whole number >= 1, got {workers!r}")
    # OpenMP threads that sleep when idle (as minrr sets for itself, see minrr/__init__.py): spinning
    # threads of Numba's and torch's pools would otherwise slow every worker's forward passes down.
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    with LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                      dashboard_address=":0", env=env) as cluster, Client(cluster) as client:
        yield client


def in_order(client, function: Callable, chunks: Iterable, *args, window: int | None = None, **kwargs) -> Iterator:
    """``function(chunk, *args, **kwargs)`` for every chunk on the cluster, yielded in chunk order.

    ``client`` None runs the chunks one after the other in this process (the same results).

    At most ``window`` tasks (default: twice the cluster's threads) are in flight, so a
    long run neither floods the scheduler nor holds every result in memory; a result is
    yielded as soon as every chunk before it is done. Large ``args`` should be scattered
    futures (``client.scatter(x, broadcast=True)``), sent once instead of with every task.
    """
    if client is None:  # in this process, one chunk after the other
        yield from (function(chunk, *args, **kwargs) for chunk in chunks)
        return
    from dask.distributed import as_completed

    window = window or max(2, 2 * sum(client.nthreads().values()))
    chunks = iter(enumerate(chunks))
    pending = as_completed()
    held: dict[int, object] = {}
    next_index = 0

    def submit_next() -> bool:
        for index, chunk in chunks:
            future = client.submit(function, chunk, *args, pure=False, **kwargs)
            future.chunk_index = index
            pending.add(future)
            return True
        return False

    for _ in range(window):
        if not submit_next():
            break
    for future in pending:
        held[future.chunk_index] = future.result()
        future.release()
        submit_next()
        while next_index in held:
            yield held.pop(next_index)
            next_index += 1


def use_worker_threads() -> None:
    """Run this task's Numba kernels (and torch, if loaded) on as many threads as its Dask worker has,
    so that the workers of one machine share its cores instead of each taking them all. Outside a
    worker (a task run in the client's process), nothing changes."""
    import sys

    import numba

    if "distributed" not in sys.modules:  # every worker has imported it
        return
    try:
        threads = sys.modules["distributed"].get_worker().state.nthreads
    except ValueError:  # not on a worker
        return
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


_MODELS: dict[tuple[str, str, str], object] = {}


def worker_model(path, sha256: str, device: str = "cpu"):
    """The model of checkpoint ``path`` on ``device``, loaded once per process (a worker's cache).

    The weights file must have the SHA-256 ``sha256`` that the client read from the model
    card, so every worker certifies the model the client meant, whatever its file system.
    """
    key = (str(path), sha256, str(device))
    if key not in _MODELS:
        from .checkpoint import load_checkpoint

        model, card = load_checkpoint(path, device=device, name="model")
        if card["weights"]["sha256"] != sha256:
            raise ValueError(f"model: {path} on this worker is not the checkpoint the client read "
                             f"(SHA-256 {card['weights']['sha256'][:12]}..., expected {sha256[:12]}...)")
        _MODELS[key] = model
    return _MODELS[key]


def shard_paths(folder, *, name: str = "database") -> list[Path]:
    """The ``.npy`` shards of a folder, in the order of their file names (their rows' order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{name}: {folder} is not a folder of .npy shards")
    shards = sorted(p for p in folder.iterdir() if p.suffix == ".npy" and p.is_file())
    if not shards:
        raise ValueError(f"{name}: {folder} holds no .npy shard")
    return shards


def shard_rows(path) -> int:
    """Rows of one shard (its header only), refusing a shard that is not (N >= 1, K) codes."""
    from minrr.io import load_npy

    shard = load_npy(path, name=f"database shard {Path(path).name}", mmap=True)
    if shard.ndim != 2 or len(shard) == 0:
        raise ValueError(f"database: shard {Path(path).name} holds shape {shard.shape}; expected (N, K) codes, N >= 1")
    return len(shard)


def _search_shard(job, queries, k: int, packed: bool):
    from minrr.io import load_npy

    path, offset = job
    use_worker_threads()
    shard = load_npy(path, name=f"database shard {Path(path).name}", mmap=True)
    distances, indices = hamming.search(queries=queries, database=shard, k=min(k, len(shard)), packed=packed)
    return distances, indices + offset


def search_shards(client, shards: list, queries, k: int, *, packed: bool = False):
    """Hamming top-k of ``queries`` over the concatenation of ``shards``, one task per shard
    (``client`` None: one shard after the other in this process).

    Each worker memory-maps its shard and returns its top min(k, rows) with global row
    numbers; the lists are merged by (distance, index) (:func:`minrr.hamming.merge_top_k`),
    so distances and indices, ties included, equal ``hamming.search`` on the whole database.

    Parameters
    ----------
    shards : paths of (N_s, K) code arrays (or packed rows), all of one layout.
    queries : (n_queries, K) codes.

    Returns
    -------
    distances : (n_queries, k) int32; indices : (n_queries, k) int64 rows of the concatenation.
    """
    sizes = [shard_rows(p) for p in shards]  # headers only, read here so a bad shard fails early
    k = hamming.check_k(k, int(sum(sizes)))
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    shared = np.asarray(queries) if client is None else client.scatter(np.asarray(queries), broadcast=True)
    parts = list(in_order(client, _search_shard, [(str(p), int(o)) for p, o in zip(shards, offsets)],
                          shared, k, packed))
    return hamming.merge_top_k([d for d, _ in parts], [i for _, i in parts], k)
