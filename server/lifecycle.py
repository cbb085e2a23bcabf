"""How a deployed ServerApp ends, so the run records it: stopped by a signal, or dead without a word.

* ``stopped_by_signals``: flwr-serverapp's own handlers turn SIGTERM/SIGINT into ``sys.exit(0)``, so a stopped
  run used to be recorded as ``failed · SystemExit: 0``. Inside this context SIGTERM, SIGINT and SIGHUP raise
  :class:`Stopped` naming the signal instead; the round driver's ``except BaseException`` records it and writes
  the report, as for any other end.
* ``alive_marker``: the ServerApp keeps ``<run_dir>/.serverapp.pid`` while it runs and removes it however
  it ends in Python. A file whose process is gone means the ServerApp died where no Python code runs (SIGKILL,
  the OOM killer): the local engine (``serverapp_died``) sees that within a second instead of waiting for the
  SuperLink's heartbeat (about a minute), stops the run and records it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PID_FILE = ".serverapp.pid"
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(BaseException):
    """The run was stopped by a signal (a BaseException: nothing on the way may swallow it as an error)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def stopped_by_signals() -> Iterator[None]:
    """SIGTERM/SIGINT/SIGHUP raise :class:`Stopped` in the main thread (elsewhere: nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        for sig in SIGNALS:  # once: recording how the run ended is not interrupted by more (SIGKILL still ends it)
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    saved = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


@contextmanager
def alive_marker(run_dir: Path) -> Iterator[None]:
    """``<run_dir>/.serverapp.pid`` holds this process's PID while the block runs."""
    path = Path(run_dir) / PID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not reaped yet
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def serverapp_died(run_dir: Path) -> int | None:
    """The PID of a ServerApp of ``run_dir`` that died without ending in Python (its marker is left), else None."""
    path = Path(run_dir) / PID_FILE
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if _alive(pid) or not path.exists():  # re-read: it may have just ended normally and removed the file
        return None
    return pid
