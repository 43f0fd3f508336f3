"""The Dask flags of the commands that scale out: --scheduler, --workers, --threads-per-worker, --chunk-size.

One definition, one check and one way to connect (:mod:`minrr.backends.distributed`), so that
``minrr certify``, ``minrr search`` and ``minrr evaluate`` take and refuse them alike.
"""

from __future__ import annotations

__all__ = ["add_cluster_flags", "on_cluster", "check_cluster_flags", "cluster"]


def add_cluster_flags(parser, *, title: str, work: str, chunk: tuple[str, int | None, str] | None = None) -> None:
    """Add the flags in an argument group ``title``; ``work`` says what each worker does.
    ``chunk`` = (what one chunk holds, default, the default in words) adds ``--chunk-size``."""
    group = parser.add_argument_group(title)
    group.add_argument("--scheduler", metavar="ADDRESS",
                       help="address of a running Dask scheduler, e.g. tcp://10.0.0.1:8786 (a Slurm or Kubernetes "
                            f"cluster started with dask-jobqueue or dask-kubernetes); {work}")
    group.add_argument("--workers", type=int, metavar="K", help="start a local Dask cluster of K worker processes")
    group.add_argument("--threads-per-worker", type=int, default=1, metavar="T",
                       help="threads of each local worker (default: 1; set K x T to the cores you have); the "
                            "workers of --scheduler keep their own")
    if chunk is not None:
        what, default, in_words = chunk
        group.add_argument("--chunk-size", type=int, default=default, metavar="C",
                           help=f"{what} per task (default: {in_words}); the results depend neither on it nor on "
                                "the workers")


def on_cluster(args) -> bool:
    """Whether the command runs on Dask (``--scheduler`` or ``--workers`` given)."""
    return args.scheduler is not None or args.workers is not None


def check_cluster_flags(args) -> None:
    """Refuse ``--scheduler`` with ``--workers``, and counts below 1."""
    if args.scheduler is not None and args.workers is not None:
        raise ValueError("--workers: give either --scheduler (a running cluster) or --workers (a local one)")
    for flag in ("workers", "threads_per_worker", "chunk_size"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: expected a whole number >= 1, got {value}")


def cluster(args):
    """A Dask client for the flags (a context manager, see :func:`minrr.backends.distributed.connect`)."""
    from minrr.backends.distributed import connect

    return connect(args.scheduler, args.workers, threads_per_worker=args.threads_per_worker)
