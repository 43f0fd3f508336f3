"""``minrr search``: Hamming top-k search of binary codes, with mAP@k when labels are given."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minrr.cli.cluster import add_cluster_flags, check_cluster_flags, cluster, on_cluster
from minrr.cli.outputs import Files
from minrr.io import load_npy

# Library argument names (minrr.hashing.hamming, minrr.labels) that are not a flag's dest.
FLAGS = {"k": "--top-k", "query_labels": "--labels"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="k nearest binary codes in Hamming distance (exact, ties to the smaller index)",
        description="Exact Hamming search of query codes against a database of codes. Codes are "
                    "(n, K) arrays with values in {-1, 1} or {0, 1} (numeric or bool), or with "
                    "--packed uint8 rows in the np.packbits / faiss layout (K = 8 x columns). The "
                    "database is memory-mapped and scanned in blocks; a folder of .npy shards is searched "
                    "as the concatenation of its shards (on a Dask cluster with --scheduler or --workers), "
                    "with the same result as one file.",
    )
    p.add_argument("--database", required=True, metavar="db.npy|DIR",
                   help="database codes, (N, K); or a folder of .npy shards, rows in the order of the file "
                        "names (shard-00000.npy, shard-00001.npy, ...)")
    p.add_argument("--queries", required=True, metavar="q.npy", help="query codes, (n_queries, K)")
    p.add_argument("--top-k", "--k", required=True, type=int, metavar="K",
                   help="neighbours per query, 1 <= K <= N (--k is an alias)")
    p.add_argument("--packed", action="store_true",
                   help="both files hold packed uint8 codes (np.packbits layout) instead of one value per bit")
    p.add_argument("--out", metavar="result.npz",
                   help="write arrays 'distances' (int32) and 'indices' (int64), both (n_queries, K)")
    p.add_argument("--labels", metavar="ql.npy",
                   help="query labels, (n_queries,) integers or (n_queries, C) multi-hot: report mAP@K")
    p.add_argument("--database-labels", metavar="dl.npy", help="database labels, like --labels")
    add_cluster_flags(p, title="a folder of shards on a Dask cluster (needs minrr[distributed])",
                      work="each worker memory-maps the shards from its own file system",
                      chunk=("queries", None, "about four tasks per thread of the cluster, at least 256; "
                             "with --split queries"))
    p.add_argument("--split", choices=("queries", "shards"), default="queries",
                   help="how a folder of shards is cut into tasks: 'queries' (default) searches chunks of "
                        "queries over every shard in turn, the work of one process, each worker reading the "
                        "whole database; 'shards' searches all queries over one shard per task and merges "
                        "the lists, each worker reading only its shards (a database larger than a machine's "
                        "memory), at the cost of repeating the top-k admission in every shard")
    p.set_defaults(run=run)


class ShardedCodes:
    """A folder of code shards, seen as one (N, K) database: its shape, and the shard files."""

    def __init__(self, shards):
        from minrr.backends.distributed import shard_rows

        first = load_npy(shards[0], name="--database", mmap=True)
        self.shards, self.dtype, self.itemsize = shards, first.dtype, first.itemsize
        self.shape = (sum(shard_rows(path) for path in shards), *first.shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]


def _search(args, database, queries):
    """Top-k of the queries: one file in this process, or a folder of shards (locally or on Dask)."""
    from minrr.hashing import hamming

    if not isinstance(database, ShardedCodes):
        return hamming.search(queries, database, args.top_k, packed=args.packed, progress=True)
    from minrr.backends.distributed import search_shards

    if not on_cluster(args):
        return hamming.search(queries, [load_npy(path, name="--database", mmap=True) for path in database.shards],
                              args.top_k, packed=args.packed, progress=True)
    with cluster(args) as client:
        return search_shards(client, database.shards, queries, args.top_k, packed=args.packed, split=args.split,
                             chunk_size=args.chunk_size)


def _load(args):
    """Load and check every input file before the search starts."""
    from minrr.labels import check_label_pair, check_labels

    if (args.labels is None) != (args.database_labels is None):
        raise ValueError("--labels: --labels and --database-labels go together")
    check_cluster_flags(args)
    if on_cluster(args) and not Path(args.database).is_dir():
        raise ValueError(f"--{'scheduler' if args.scheduler is not None else 'workers'}: needs --database "
                         "to be a folder of .npy shards")
    if Path(args.database).is_dir():
        from minrr.io import shard_paths

        database = ShardedCodes(shard_paths(args.database, name="--database"))
    else:
        database = load_npy(args.database, name="--database", mmap=True)
    queries = load_npy(args.queries, name="--queries")
    for flag, arr in (("--database", database), ("--queries", queries)):
        if arr.ndim == 2 and len(arr) == 0:
            raise ValueError(f"{flag}: {getattr(args, flag[2:])} holds no codes (shape {arr.shape})")
    labels = None
    if args.labels is not None:
        # A 0-D code array has no rows to count; hamming.search then names that problem.
        n_queries, n_database = (arr.shape[0] if arr.ndim else None for arr in (queries, database))
        query_labels = check_labels(load_npy(args.labels, name="--labels"), n_queries,
                                    name="query_labels")
        database_labels = check_labels(load_npy(args.database_labels, name="--database-labels"),
                                       n_database, name="database_labels")
        check_label_pair(query_labels, database_labels, names=("query_labels", "database_labels"))
        labels = query_labels, database_labels
    return database, queries, labels


def run(args) -> int:
    from minrr.metrics.hashing import average_precision, mean_of_ap

    files = Files.of(args, inputs=["--database", "--queries", "--labels", "--database-labels"], outputs=["--out"])
    files.check()
    database, queries, labels = _load(args)
    distances, indices = _search(args, database, queries)
    if labels is not None:
        ap, n_relevant = average_precision(indices, *labels)

    n_queries, k = indices.shape
    bits = database.shape[1] * (8 * database.itemsize if args.packed else 1)
    print(f"searched {n_queries} queries against {len(database)} codes of {bits} bits, k = {k}")
    if args.out is not None:
        with files.commit() as tmp, open(tmp["--out"], "wb") as fh:
            np.savez(fh, distances=distances, indices=indices)
        print(f"wrote {args.out}: distances, indices ({n_queries} x {k})")
    if labels is not None:
        print(f"mAP@{k} = {mean_of_ap(ap, n_relevant):.4f} "
              f"(DeepHash/CSQ: mean over all {n_queries} queries)")
        print(f"mAP@{k} = {mean_of_ap(ap, n_relevant, variant='dhta'):.4f} (DHTA: mean over the "
              f"{np.count_nonzero(n_relevant)} queries with a relevant item in the top {k})")
    return 0
