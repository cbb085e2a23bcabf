"""A run's output folder: checked before anything is touched, never overwritten, one run at a time.

``claim_run_dir`` is what every engine enters before it writes anything:

* the data sources are checked first (``check_sources``), so a bad ``data.path`` fails
  before the run dir is created, truncated or cleaned;
* an existing, non-empty run dir is refused, or with ``overwrite`` moved aside to
  ``<name>.replaced-<time>`` (nothing is ever deleted);
* a lock file (``.kumiki.lock``, holding the PID) keeps a second run off the same dir
  while the first one runs; a lock whose process is gone is stale and is taken over.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kumiki.config import KumikiConfig
from kumiki.data.sites import SiteDataError, site_name
from kumiki.data.sources import DataUnavailable, fashion_mnist_available

LOCK = ".kumiki.lock"


class RunDirError(RuntimeError):
    """The run dir cannot be used; the message says why and what to do."""


def check_sources(cfg: KumikiConfig) -> None:
    """Fail before touching any output when the run's data is not there."""
    data = cfg.data
    if data.dataset == "fashion-mnist" and not fashion_mnist_available(data.dataset_dir()):
        raise DataUnavailable(
            f"Fashion-MNIST not found in {data.dataset_dir()}; install it with `apt-get install dataset-fashion-mnist` "
            "or set data.path / FMNIST_DIR"
        )
    if data.dataset == "site-folders":
        root = Path(data.path)
        if not root.is_dir():
            raise SiteDataError(f"data.path {root} is not a folder (site-folders needs <path>/site-0/ ...)")
        missing = [site_name(i) for i in range(cfg.total_sites) if not (root / site_name(i) / "site.json").is_file()]
        if missing:
            raise SiteDataError(f"data.path {root}: no site folder (with site.json) for {', '.join(missing[:5])}")


def _holder(lock: Path) -> int | None:
    """PID of the live run holding ``lock``; a lock of a finished process is removed (stale)."""
    try:
        pid = int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        lock.unlink(missing_ok=True)
        return None
    except PermissionError:
        pass  # alive, owned by someone else
    return pid


@contextmanager
def claim_run_dir(cfg: KumikiConfig, overwrite: bool = False) -> Iterator[Path]:
    """Hold ``cfg.run_dir()`` for one run (module docstring); yields the resolved path."""
    check_sources(cfg)
    run_dir = cfg.run_dir().resolve()
    lock = run_dir / LOCK
    if run_dir.exists():
        pid = _holder(lock)
        if pid is not None:
            raise RunDirError(f"{run_dir} is in use by another Kumiki run (pid {pid}); wait for it to end, "
                              "or choose another run.name")
        if any(run_dir.iterdir()):
            if not overwrite:
                raise RunDirError(f"{run_dir} already holds a run; choose another run.name, or pass --overwrite "
                                  "to move the old one aside (nothing is deleted)")
            aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(run_dir, aside)
            print(f"kumiki: the previous run in {run_dir} was moved to {aside}", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise RunDirError(f"{run_dir} was claimed by another run a moment ago; choose another run.name") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    try:
        yield run_dir
    finally:
        lock.unlink(missing_ok=True)
