"""Entry point of the ``minrr`` command.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``run`` (a function
of the parsed arguments returning the exit status). Building the parser
imports no heavy module (numba, scipy.stats, torch): ``minrr --help`` stays
fast, and each ``run`` imports what it needs.

Every failure a user can cause ends in one line on stderr and exit status 1,
never a traceback: the library's ``ValueError``/``TypeError`` (the leading
argument name becomes the flag it came from, see :mod:`minrr.cli.flags`), and
OS errors, memory errors, overflow and nesting too deep, which name the flag
or file. argparse usage errors exit with 2, Ctrl-C with 130. Set
``MINRR_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = ["certify", "train", "embed", "evaluate", "search", "attack", "detect", "score", "plot"]

# Failures a user can cause that are not ValueError/TypeError (those come first); ModuleNotFoundError
# only for an optional framework that is not installed.
USER_FAILURES = (OSError, MemoryError, OverflowError, RecursionError, KeyError, ModuleNotFoundError)
OPTIONAL = {"torch": "torch", "matplotlib": "plot", "dask": "distributed", "distributed": "distributed",
            "faiss": "bench"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minrr",
        description="Provably robust and adversarially aware image retrieval.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"minrr.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        command = f"minrr {args.command}" if args is not None else "minrr"
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, *USER_FAILURES) as exc:
        missing = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] not in OPTIONAL
        if args is None or missing or os.environ.get("MINRR_DEBUG"):
            raise
        from minrr.cli.flags import error_message

        print(f"minrr {args.command}: error: {error_message(exc, parser, args)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
