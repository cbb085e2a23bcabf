"""Shared by the issue-13 part 5-7 benchmarks: the machine line, the load, and writing sections.

Each benchmark writes its own section of bench/RESULTS.md between ``<!-- TAG:start -->`` and
``<!-- TAG:end -->``; ``bench/readme_sync.py`` copies each into the README's ``<!-- results:TAG -->`` block,
so the README never says something RESULTS.md does not.
"""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"


def load() -> str:
    """The 1/5/15-minute load averages, as a string."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


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
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    doc = path.read_text() if path.exists() else ""
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def section(tag: str, path: Path = RESULTS) -> str | None:
    doc = path.read_text() if path.exists() else ""
    m = re.search(rf"<!-- {tag}:start -->\n(.*?)\n<!-- {tag}:end -->", doc, re.S)
    return m.group(1) if m else None


def update_readme() -> None:
    """Refill the README's copies of the RESULTS.md sections (``bench/readme_sync.py``)."""
    from bench.readme_sync import main

    main([])
