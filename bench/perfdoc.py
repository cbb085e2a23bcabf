"""Shared by the issue-13 part 5-7 benchmarks: the machine line, the load, and writing sections.

Each benchmark writes its own section of bench/RESULTS.md between ``<!-- TAG:start -->`` and
``<!-- TAG:end -->``; the README's "Aggregation, bytes on the wire and scale" block (between
``<!-- scale-perf:start/end -->``) is regenerated from those sections' goal lines, so the README never
says something RESULTS.md does not.
"""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
README = ROOT / "README.md"
#: RESULTS.md sections the README block summarizes, with their headings there
SECTIONS = {"aggregation": "Aggregation throughput", "wire": "Bytes on the wire", "scale": "1,000 sites",
            "ray": "Past one machine"}


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
    """The README's block: every table of the four RESULTS.md sections with the paragraph just before it (what
    was run, on what machine, under what load), and every goal line, under the sections' headings."""
    parts = ["Generated from `bench/RESULTS.md` (sections \"Aggregation throughput\", \"Bytes on the wire\", "
             "\"1,000 sites\", \"Past one machine\"; their notes are there) by the benchmarks' `--write`."]
    for tag, title in SECTIONS.items():
        text = section(tag) or ""
        cmd = re.search(r"`(bench/\S+\.py[^`]*)`", text)
        parts.append(f"\n**{title}** ({'`' + cmd.group(1) + '`' if cmd else 'not measured yet'}):")
        blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
        kept = []
        for i, block in enumerate(blocks):
            if block.startswith("|"):
                if i and not blocks[i - 1].startswith(("|", "- ")):
                    kept.append(blocks[i - 1])
                kept.append(block)
            elif block.startswith("- **"):
                kept.append("\n".join(ln for ln in block.splitlines() if ln.startswith("- **")))
        parts.extend(["", *"\n\n".join(kept).splitlines()] if kept else ["", "- not measured yet"])
    write_between(README, "scale-perf", "\n".join(parts))
