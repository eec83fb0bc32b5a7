"""The CPU and the commit a benchmark ran on, for the results' headers (shared by the benchmark scripts)."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["cpu_name", "git_commit"]

HERE = Path(__file__).resolve().parent


def cpu_name(default: str) -> str:
    """The ``model name`` line of ``/proc/cpuinfo``, or ``default`` where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


def git_commit() -> str:
    """The short commit of the checkout, with ``" (pyro_lwflow/ modified)"`` when the package has
    uncommitted changes; ``""`` outside a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--", "../pyro_lwflow"],
                               capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""
    return commit + (" (pyro_lwflow/ modified)" if dirty else "")
