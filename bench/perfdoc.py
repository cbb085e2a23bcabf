"""Shared by the issue-13 part 5-7 benchmarks: the machine line, the load, and writing sections.

Each benchmark writes its own section of bench/RESULTS.md between ``<!-- TAG:start -->`` and
``<!-- TAG:end -->``; ``bench/readme_sync.py`` copies each into the README's ``<!-- results:TAG -->`` block,
so the README never says something RESULTS.md does not.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from bench.results import RESULTS, load, write_section  # noqa: F401 - load is part of this module's API

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """The machine in one line: CPU model, cores, memory, Python and torch."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}"


def mem_available() -> float:
    """MemAvailable in bytes (0 where /proc/meminfo is absent)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M")


def write_between(path: Path, tag: str, text: str) -> None:
    write_section(tag, text, path)


def update_readme() -> None:
    """Refill the README's copies of the RESULTS.md sections (``bench/readme_sync.py``)."""
    from bench.readme_sync import main

    main([])
