"""Entry point of the ``minrr`` command.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``run`` (a function
of the parsed arguments returning the exit status). Errors in the user's
input surface as ``ValueError``/``TypeError`` from the library; they become one
line on stderr and exit status 1. argparse usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ["certify", "train", "embed", "search", "detect", "score"]


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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, TypeError) as exc:
        message = " ".join(str(exc).split())
        print(f"minrr {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"minrr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
