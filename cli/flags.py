"""Error messages of the command line: library argument names become the flags they came from."""

from __future__ import annotations

import re


def flag_message(exc: Exception, flags: dict[str, str]) -> str:
    """The message of ``exc`` with a leading ``name:`` renamed to ``flags[name]`` when listed."""
    text = str(exc)
    match = re.match(r"(\w+):", text)
    if match and match.group(1) in flags:
        return flags[match.group(1)] + text[match.end(1):]
    return text
