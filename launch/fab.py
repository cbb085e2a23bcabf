"""What ``flwr build`` / ``flwr run`` would put into this app's FAB, decided by Flower's own rules.

Flower 1.41 (``flwr/cli/build.py``) ships every file of the app directory that passes its publish filter
(which honours the app's ``.gitignore``) and its FAB include patterns (``*.py``, ``*.toml``, ``*.md``,
``*.json``, ``*.jsonl``, ``*.yaml`` ...). A FAB goes to every node of the federation, so a site folder's
``site.json`` or a run's ``metrics.jsonl`` inside the app directory would travel to every factory unless
git ignores it. These helpers call Flower's functions, so they stay right if its rules change.
"""

from __future__ import annotations

from pathlib import Path

import tomllib

APP_DIR = Path(__file__).resolve().parents[1]


def fab_paths(files: dict[str, bytes | Path], app_dir: Path = APP_DIR) -> list[str]:
    """The relative paths of ``files`` (relative path -> content) that Flower would put into the FAB,
    given the app's own pyproject.toml and .gitignore (added to ``files`` when absent)."""
    from flwr.cli.build import get_filtered_fab_paths
    from flwr.cli.utils import filter_paths_for_publish

    files = dict(files)
    for name in ("pyproject.toml", ".gitignore"):
        if name not in files and (app_dir / name).is_file():
            files[name] = app_dir / name
    config = tomllib.loads((app_dir / "pyproject.toml").read_text())
    return sorted(get_filtered_fab_paths(filter_paths_for_publish(files), config))


def shipped_under(folder: Path, app_dir: Path = APP_DIR, names: tuple[str, ...] = (
        "site.json", "config.json", "metrics.jsonl", "summary.json")) -> list[str]:
    """The files named ``names`` that would be shipped if they lay in ``folder`` (empty when ``folder`` is
    outside the app directory or ignored by its .gitignore)."""
    folder = folder.expanduser().resolve()
    try:
        rel = folder.relative_to(app_dir)
    except ValueError:
        return []
    probe = {f"{rel.as_posix()}/{sub}{n}": b"" for n in names for sub in ("", "x/")}
    return fab_paths(probe, app_dir)
