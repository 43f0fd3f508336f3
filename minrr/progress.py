"""Progress of long work on stderr: a tqdm bar on a terminal, plain lines with an ETA in a log.

Every long loop of minrr (sampling, embedding, attacks, training, searches,
certification) reports through :func:`progress_bar`, so a batch job's log shows
that the job is alive and when it should end::

    minrr: 35% (350/1000 query), 0:02:10 elapsed, ETA 0:04:02
"""

from __future__ import annotations

import contextlib
import sys
import time

from tqdm import tqdm

__all__ = ["progress_bar", "ProgressLines", "LINE_PERCENT", "LINE_SECONDS"]

LINE_PERCENT = 5
"""Without a terminal, a line is written each time another 5% of the work is done ..."""
LINE_SECONDS = 2.0
"""... and at least 2 s have passed since the start or the last line (a short job writes none)."""


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLines:
    """A tqdm-like counter that writes a line to ``file`` every :data:`LINE_PERCENT` percent
    (but not within :data:`LINE_SECONDS` of the last one).

    The ETA is the rate since the start (work done before, ``initial``, excluded) applied to
    what is left. Use as a context manager; ``update(count)`` adds done work.
    """

    def __init__(self, total: int, unit: str, *, initial: int = 0, desc: str = "minrr", file=None):
        self.total, self.unit, self.desc = max(int(total), 0), unit, desc
        self.n = self._start = int(initial)
        self._file = file
        self._began = self._last = time.monotonic()
        self._next = self._step_after(self.n)

    def _step_after(self, done: int) -> int:
        """The first count at or past the next multiple of LINE_PERCENT percent after ``done``."""
        if self.total == 0:
            return 1
        steps = done * 100 // (LINE_PERCENT * self.total) + 1
        return -(-steps * LINE_PERCENT * self.total // 100)

    def update(self, count: int = 1) -> None:
        self.n += int(count)
        if self.n >= self._next:
            now = time.monotonic()
            if now - self._last >= LINE_SECONDS:
                self._next, self._last = self._step_after(self.n), now
                self._write(now - self._began)

    def _write(self, elapsed: float) -> None:
        done = self.n - self._start
        left = max(self.total - self.n, 0)
        eta = _clock(elapsed * left / done) if done > 0 else "?"
        percent = 100 * self.n // self.total if self.total else 100
        print(f"{self.desc}: {percent}% ({self.n}/{self.total} {self.unit}), {_clock(elapsed)} elapsed, ETA {eta}",
              file=self._file or sys.stderr, flush=True)

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc) -> None:
        return None


def progress_bar(total: int, enabled: bool, unit: str, *, initial: int = 0, desc: str = "minrr"):
    """A context yielding a counter with ``update(count)``, or None when not ``enabled``.

    On a terminal: a tqdm bar on stderr (removed when done). Otherwise (a log, a pipe):
    :class:`ProgressLines`, a line every few percent with an ETA. ``initial`` is work done
    before (a resumed run).
    """
    if not enabled:
        return contextlib.nullcontext(None)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, unit=unit, unit_scale=True, file=sys.stderr, leave=False,
                    desc=desc)
    return ProgressLines(total, unit, initial=initial, desc=desc)
