"""One line describing the machine a benchmark ran on, for its results table."""

from __future__ import annotations

import os
import platform


def describe(*libraries) -> str:
    """CPU model, core count, load average, Python, and the versions of the given modules."""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    versions = ", ".join(f"{m.__name__} {m.__version__}" for m in libraries)
    return f"{model}, {os.cpu_count()} cores (load average {load} at start); {versions}, Python {platform.python_version()}"
