"""Progress on stderr: tqdm on a terminal, a line every few percent with an ETA in a log."""

import io
import sys

import pytest
from tqdm import tqdm

from minrr import progress
from minrr.progress import ProgressLines, progress_bar


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    return fake


def _run(clock, total, seconds_per_item, *, initial=0):
    out = io.StringIO()
    with ProgressLines(total, "draw", initial=initial, file=out) as bar:
        for _ in range(total - initial):
            clock.now += seconds_per_item
            bar.update(1)
    return out.getvalue().splitlines()


def test_a_line_every_five_percent_with_the_eta(clock):
    lines = _run(clock, 200, 1.0)
    assert len(lines) == 20  # 10, 20, ..., 200 draws
    assert lines[9] == "minrr: 50% (100/200 draw), 0:01:40 elapsed, ETA 0:01:40"
    assert lines[-1] == "minrr: 100% (200/200 draw), 0:03:20 elapsed, ETA 0:00:00"


def test_no_line_within_two_seconds_of_the_last(clock):
    lines = _run(clock, 100, 0.1)  # 5% every 0.5 s: a line every 2 s, i.e. every 20 items
    assert [line.split(" (")[1].split("/")[0] for line in lines] == ["20", "40", "60", "80", "100"]
    assert _run(clock, 100, 0.001) == []  # a short job writes nothing


def test_a_resumed_run_counts_its_rate_from_now(clock):
    lines = _run(clock, 100, 3.0, initial=50)  # 50 done before; 3 s per item since
    assert lines[0] == "minrr: 55% (55/100 draw), 0:00:15 elapsed, ETA 0:02:15"


def test_progress_bar_picks_tqdm_on_a_terminal_and_lines_otherwise(monkeypatch):
    with progress_bar(10, False, "img") as bar:
        assert bar is None
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(10, True, "img") as bar:
        assert isinstance(bar, ProgressLines)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with progress_bar(10, True, "img") as bar:
        assert isinstance(bar, tqdm)
