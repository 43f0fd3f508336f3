"""``minrr search``: Hamming top-k search of binary codes, with mAP@k when labels are given."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from minrr import hamming
from minrr.cli.flags import flag_message
from minrr.io import atomic_path, load_npy
from minrr.labels import check_label_pair, check_labels
from minrr.metrics.hashing import average_precision, mean_of_ap

# Library argument names, as minrr.hamming and minrr.labels messages start, and their flags.
FLAGS = {"database": "--database", "queries": "--queries", "k": "--k",
         "query_labels": "--labels", "database_labels": "--database-labels"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="k nearest binary codes in Hamming distance (exact, ties to the smaller index)",
        description="Exact Hamming search of query codes against a database of codes. Codes are "
                    "(n, K) arrays with values in {-1, 1} or {0, 1} (numeric or bool), or with "
                    "--packed uint8 rows in the np.packbits / faiss layout (K = 8 x columns). The "
                    "database is memory-mapped and scanned in blocks.",
    )
    p.add_argument("--database", required=True, metavar="db.npy", help="database codes, (N, K)")
    p.add_argument("--queries", required=True, metavar="q.npy", help="query codes, (n_queries, K)")
    p.add_argument("--k", required=True, type=int, metavar="K",
                   help="neighbours per query, 1 <= K <= N")
    p.add_argument("--packed", action="store_true",
                   help="both files hold packed uint8 codes (np.packbits layout) instead of one value per bit")
    p.add_argument("--out", metavar="result.npz",
                   help="write arrays 'distances' (int32) and 'indices' (int64), both (n_queries, K)")
    p.add_argument("--labels", metavar="ql.npy",
                   help="query labels, (n_queries,) integers or (n_queries, C) multi-hot: report mAP@K")
    p.add_argument("--database-labels", metavar="dl.npy", help="database labels, like --labels")
    p.set_defaults(run=run)


def _load(args):
    """Load and check every input file before the search starts."""
    if (args.labels is None) != (args.database_labels is None):
        raise ValueError("--labels: --labels and --database-labels go together")
    if args.out is not None and not Path(args.out).resolve().parent.is_dir():
        raise ValueError(f"--out: the folder of {args.out} does not exist")
    database = load_npy(args.database, name="--database", mmap=True)
    queries = load_npy(args.queries, name="--queries")
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
    try:
        database, queries, labels = _load(args)
        distances, indices = hamming.search(database, queries, args.k, packed=args.packed,
                                            progress=sys.stderr.isatty())
        if labels is not None:
            ap, n_relevant = average_precision(indices, *labels)
    except (ValueError, TypeError) as exc:
        raise type(exc)(flag_message(exc, FLAGS)) from None

    n_queries, k = indices.shape
    bits = database.shape[1] * (8 * database.itemsize if args.packed else 1)
    print(f"searched {n_queries} queries against {len(database)} codes of {bits} bits, k = {k}")
    if args.out is not None:
        with atomic_path(args.out) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, distances=distances, indices=indices)
        print(f"wrote {args.out}: distances, indices ({n_queries} x {k})")
    if labels is not None:
        print(f"mAP@{k} = {mean_of_ap(ap, n_relevant):.4f} "
              f"(DeepHash/CSQ: mean over all {n_queries} queries)")
        print(f"mAP@{k} = {mean_of_ap(ap, n_relevant, variant='dhta'):.4f} (DHTA: mean over the "
              f"{np.count_nonzero(n_relevant)} queries with a relevant item in the top {k})")
    return 0
