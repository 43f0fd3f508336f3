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
  shards: chunks of queries over every shard (the work of one process), or one task per
  shard with the lists merged by (distance, index);
* :func:`query_statistics_chunks` computes the per-query values behind every retrieval
  metric (:func:`minrr.metrics.retrieval.query_statistics`) in chunks of queries, each
  worker holding the whole gallery (loaded once per worker from a file or a folder of shards).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from minrr.hashing import hamming

__all__ = ["connect", "in_order", "use_worker_threads", "worker_model", "shard_rows", "SPLITS", "search_shards",
           "worker_rows_file", "query_statistics_chunks"]


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
        Give the workers of a running scheduler ``OMP_WAIT_POLICY=PASSIVE``, and do not set
        ``MALLOC_TRIM_THRESHOLD_`` for them (``distributed.nanny.pre-spawn-environ`` does by default;
        a local cluster started here leaves it out, see :func:`_worker_environ`).
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
    import dask

    # OpenMP threads that sleep when idle (as minrr sets for itself, see minrr/__init__.py): spinning
    # threads of Numba's and torch's pools would otherwise slow every worker's forward passes down.
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    with dask.config.set({_SPAWN_ENVIRON: _worker_environ()}), \
            LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                         dashboard_address=":0", env=env) as cluster, Client(cluster) as client:
        yield client


_SPAWN_ENVIRON = "distributed.nanny.pre-spawn-environ"


def _worker_environ() -> dict:
    """Dask's environment for new worker processes without ``MALLOC_TRIM_THRESHOLD_``: set at all, it
    turns off glibc's adaptive mmap threshold, so every large temporary (a 4 MiB block of scores, a
    batch of noisy images) is mapped, faulted in and unmapped again; the metrics ran 9% slower."""
    import dask

    return {name: value for name, value in dask.config.get(_SPAWN_ENVIRON).items() if name != "MALLOC_TRIM_THRESHOLD_"}


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


def _mapped_shard(path):
    from minrr.io import load_npy

    return load_npy(path, name=f"database shard {Path(path).name}", mmap=True)


def shard_rows(path) -> int:
    """Rows of one shard (its header only), refusing a shard that is not (N >= 1, K) codes."""
    shard = _mapped_shard(path)
    if shard.ndim != 2 or len(shard) == 0:
        raise ValueError(f"database: shard {Path(path).name} holds shape {shard.shape}; expected (N, K) codes, N >= 1")
    return len(shard)


SPLITS = ("queries", "shards")


def _default_chunk(client, n_queries: int) -> int:
    """Queries per task: about four tasks per thread of the cluster, at least 256 queries."""
    threads = 1 if client is None else sum(client.nthreads().values())
    return max(256, -(-n_queries // (4 * threads)))


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a whole number >= 1, got {chunk_size!r}")


def _search_all_shards(rows: tuple[int, int], queries, shards: list, k: int, packed: bool):
    use_worker_threads()
    return hamming.search(queries[rows[0]:rows[1]], [_mapped_shard(p) for p in shards], k, packed=packed)


def _search_one_shard(job, queries, k: int, packed: bool):
    path, offset = job
    use_worker_threads()
    shard = _mapped_shard(path)
    distances, indices = hamming.search(queries=queries, database=shard, k=min(k, len(shard)), packed=packed)
    return distances, indices + offset


def search_shards(client, shards: list, queries, k: int, *, packed: bool = False, split: str = "queries",
                  chunk_size: int | None = None):
    """Hamming top-k of ``queries`` over the concatenation of ``shards`` (``client`` None: the
    tasks one after the other in this process). Distances and indices, ties included, equal
    ``hamming.search`` on the whole database, whatever the split, chunk size and workers.

    Parameters
    ----------
    shards : paths of (N_s, K) code arrays (or packed rows), all of one layout, memory-mapped
        by the workers from their own file systems (shared storage on a cluster).
    queries : (n_queries, K) codes.
    split : "queries" (default): a task searches ``chunk_size`` queries over every shard in
        turn, carrying its top-k bound from shard to shard, so the cluster does the work of one
        process (each worker reads the whole database; shards of one machine share its page
        cache). "shards": a task searches every query over one shard, and the lists are merged
        by (distance, index) (:func:`minrr.hashing.hamming.merge_top_k`); each worker then reads only
        its shards (a database larger than a machine's memory), but each shard repeats the top-k
        admission that one pass pays once.
    chunk_size : queries per task of split "queries" (default: about four tasks per thread of
        the cluster, at least 256).

    Returns
    -------
    distances : (n_queries, k) int32; indices : (n_queries, k) int64 rows of the concatenation.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    _check_chunk_size(chunk_size)
    sizes = [shard_rows(p) for p in shards]  # headers only, read here so a bad shard fails early
    k = hamming.check_k(k, int(sum(sizes)))
    shared = np.asarray(queries)
    n_queries = len(shared) if shared.ndim else 0
    if client is not None:
        shared = client.scatter(shared, broadcast=True, hash=False)
    if split == "shards":
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        parts = list(in_order(client, _search_one_shard, [(str(p), int(o)) for p, o in zip(shards, offsets)],
                              shared, k, packed))
        return hamming.merge_top_k([d for d, _ in parts], [i for _, i in parts], k)
    chunk_size = chunk_size or _default_chunk(client, n_queries)
    chunks = [(start, min(start + chunk_size, n_queries)) for start in range(0, max(n_queries, 1), chunk_size)]
    parts = list(in_order(client, _search_all_shards, chunks, shared, [str(p) for p in shards], k, packed))
    return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])


_ROWS: dict[str, tuple[tuple, np.ndarray]] = {}


def _file_version(path) -> tuple:
    """What identifies the contents of a file or of a folder's shards: names, sizes and modification times."""
    from minrr.io import shard_paths

    files = shard_paths(path, name=str(path)) if Path(path).is_dir() else [Path(path)]
    return tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def worker_rows_file(path, name: str) -> np.ndarray:
    """:func:`minrr.io.load_rows_file` of ``path``, loaded once per process for ``name`` (a worker's cache).

    Loaded again when the files change (names, sizes, times); one array is kept per ``name``.
    """
    from minrr.io import load_rows_file

    version = _file_version(path)
    if name not in _ROWS or _ROWS[name][0] != version:
        _ROWS.pop(name, None)  # free the old array before loading the new one
        _ROWS[name] = (version, load_rows_file(path, name=name))
    return _ROWS[name][1]


def _statistics_chunk(rows: tuple[int, int], inputs: dict, exclude, block_bytes: int):
    from minrr.metrics.retrieval import query_statistics

    use_worker_threads()
    arrays = {name: worker_rows_file(value, name) if isinstance(value, (str, Path)) else value
              for name, value in inputs.items()}
    return query_statistics(arrays["embeddings"], arrays["labels"], gallery=arrays.get("gallery"),
                            gallery_labels=arrays.get("gallery_labels"), exclude=exclude, rows=rows,
                            block_bytes=block_bytes)


def query_statistics_chunks(client, embeddings, labels, *, gallery=None, gallery_labels=None, exclude=None,
                            chunk_size: int | None = None, block_bytes: int | None = None):
    """:func:`minrr.metrics.retrieval.query_statistics` of every query, ``chunk_size`` queries per task.

    Each input is an array (sent once to every worker) or the path of a ``.npy`` file or
    of a folder of ``.npy`` shards (:func:`minrr.io.load_rows_file`), which every worker
    loads once from its own file system: give paths on a cluster with shared storage. A
    task ranks its queries against the whole gallery; a query's values do not depend on
    its chunk, so the concatenation equals the single-process result exactly, for any
    chunk size and any number of workers (``client`` None: one chunk after the other here).
    ``chunk_size`` defaults to N / (4 x the cluster's threads), at least 256 queries, so
    that every thread gets about as many chunks.

    Returns
    -------
    :class:`minrr.metrics.retrieval.QueryStatistics` of (N,) arrays for the N queries.
    """
    from minrr.io import rows_shape
    from minrr.metrics.retrieval import BLOCK_BYTES, QueryStatistics

    _check_chunk_size(chunk_size)
    inputs = {name: value for name, value in (("embeddings", embeddings), ("labels", labels), ("gallery", gallery),
                                              ("gallery_labels", gallery_labels)) if value is not None}
    shapes = {name: rows_shape(value, name=name) if isinstance(value, (str, Path)) else np.shape(value)
              for name, value in inputs.items()}
    if not shapes["embeddings"]:
        raise ValueError(f"embeddings: expected (N, dim) embeddings, got shape {shapes['embeddings']}")
    n_queries = shapes["embeddings"][0]
    chunk_size = chunk_size or _default_chunk(client, n_queries)
    if client is not None:
        # hash=False: a fresh key per call, never one that an earlier call's release is about to drop
        inputs = {name: str(value) if isinstance(value, (str, Path)) else
                  client.scatter(np.asarray(value), broadcast=True, hash=False) for name, value in inputs.items()}
    chunks = [(start, min(start + chunk_size, n_queries)) for start in range(0, max(n_queries, 1), chunk_size)]
    parts = list(in_order(client, _statistics_chunk, chunks, inputs, exclude, block_bytes or BLOCK_BYTES))
    return QueryStatistics(*(np.concatenate(column) for column in zip(*parts)))
