"""Error messages of the command line: every failure names the flag it came from.

The library names its arguments (``k: expected ...``); the command line says
``--top-k: expected ...``. The renaming is systematic: each option's ``dest``
(``top_k``) maps to its flag (``--top-k``), and a command module may add
``FLAGS``, a dict of the library's argument names that differ from any dest
(``{"queries": "--embeddings"}``). :func:`error_message` applies both to any
exception that reaches :func:`minrr.cli.main.main`; an OS error names the flag
whose file it concerns.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

__all__ = ["flag_message", "command_flags", "error_message"]


def flag_message(exc: Exception, flags: dict[str, str]) -> str:
    """The message of ``exc`` with a leading ``name:`` renamed to ``flags[name]`` when listed."""
    text = str(exc)
    match = re.match(r"(\w+):", text)
    if match and match.group(1) in flags:
        return flags[match.group(1)] + text[match.end(1):]
    return text


def _command_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The (sub)parser that parsed ``args``: ``minrr detect score`` gives the parser of ``score``."""
    while True:
        sub = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not sub or getattr(args, sub[0].dest, None) not in sub[0].choices:
            return parser
        parser = sub[0].choices[getattr(args, sub[0].dest)]


def command_flags(parser: argparse.ArgumentParser, args) -> dict[str, str]:
    """``{name: flag}`` of the command that parsed ``args``: every dest, then the module's FLAGS."""
    command = _command_parser(parser, args)
    flags = {}
    for action in command._actions:
        long = [s for s in action.option_strings if s.startswith("--")]
        if long and action.dest != "help":
            flags[action.dest] = long[0]
    module = sys.modules.get(getattr(getattr(args, "run", None), "__module__", ""), None)
    flags.update(getattr(module, "FLAGS", {}))
    return flags


def _flag_of_file(filename, parser, args) -> str | None:
    """The flag whose value is ``filename``, or whose output's temporary file it is."""
    if filename is None:
        return None
    from minrr.cli.outputs import same_file

    name = Path(str(filename)).name
    for dest, flag in command_flags(parser, args).items():
        value = getattr(args, dest, None)
        if not isinstance(value, str):
            continue
        target = Path(value)
        beside = name.startswith(f".{target.name}.") and same_file(Path(str(filename)).parent, target.parent)
        if beside or same_file(value, filename):
            return f"{flag} {value}"
    return None


def error_message(exc: BaseException, parser: argparse.ArgumentParser, args) -> str:
    """One line for any failure the user can cause, naming the flag where it is known."""
    if isinstance(exc, ModuleNotFoundError):
        from minrr.cli.main import OPTIONAL

        package = exc.name.split(".")[0]
        message = f"this needs {package}, which is not installed (pip install 'minrr[{OPTIONAL[package]}]')"
    elif isinstance(exc, OSError):
        where = _flag_of_file(exc.filename, parser, args) or (exc.filename and str(exc.filename))
        text = exc.strerror or str(exc)
        message = f"{where}: {text}" if where else text
    elif isinstance(exc, RecursionError):
        message = "an input is nested too deeply to read (a JSON file?)"
    elif isinstance(exc, MemoryError):
        message = f"out of memory ({exc or 'an input is too large'})"
    elif isinstance(exc, OverflowError):
        message = f"a number is too large ({exc})"
    elif isinstance(exc, KeyError):
        message = f"an input file lacks the entry {exc.args[0]!r}" if exc.args else "an input file lacks an entry"
    else:
        message = flag_message(exc, command_flags(parser, args))
    return " ".join(message.split())
