"""Copy benchmark sections of bench/RESULTS.md into the README, so the README never drifts from the figures.

    python bench/readme_sync.py           # rewrite README.md's copied blocks
    python bench/readme_sync.py --check   # exit 1 if a block differs from RESULTS.md (or names a missing one)

A README block ``<!-- results:NAME:start -->`` ... ``<!-- results:NAME:end -->`` receives the text between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in bench/RESULTS.md. A benchmark that writes a section
gets it into the README by adding such a block once (any NAME; each benchmark owns its own).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import RESULTS, read_section  # noqa: E402

README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- results:([A-Za-z0-9_.-]+):start -->\n.*?<!-- results:\1:end -->", re.S)


def synced(readme: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """The README with every block refilled from RESULTS.md, and the names RESULTS.md lacks."""
    missing: list[str] = []

    def fill(m: re.Match) -> str:
        name, text = m.group(1), read_section(m.group(1), results)
        if text is None:
            missing.append(name)
            return m.group(0)
        return f"<!-- results:{name}:start -->\n{text}\n<!-- results:{name}:end -->"

    return BLOCK.sub(fill, readme), missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that the README matches RESULTS.md")
    a = ap.parse_args(argv)
    old = README.read_text()
    new, missing = synced(old)
    for name in missing:
        print(f"bench/RESULTS.md has no section {name!r} (README block results:{name})", file=sys.stderr)
    if a.check:
        if new != old or missing:
            print("README.md differs from bench/RESULTS.md; run python bench/readme_sync.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        README.write_text(new)
        print(f"README.md: {len(BLOCK.findall(new))} block(s) from bench/RESULTS.md")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
