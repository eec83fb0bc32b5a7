"""The CPU a benchmark ran on, for the results' headers (shared by the benchmark scripts)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["cpu_name"]


def cpu_name(default: str) -> str:
    """The ``model name`` line of ``/proc/cpuinfo``, or ``default`` where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default
