"""The local engine's reaper: nothing a local run started outlives its launcher, not even after ``kill -9``.

A ``kill -9`` (or the OOM killer) gives the launcher no ``finally:``. Its direct children die with it
(``PR_SET_PDEATHSIG``, set by ``parent_death_signal``), but that signal is not inherited: the SuperExecs'
ClientApps and the ServerApp are grandchildren, and Flower's stock SuperLink even starts its SuperExec in a
session of its own. So every process of a run carries one marker in its environment
(``KUMIKI_RUN_TOKEN=<token>``, inherited by every descendant, whatever its session or parent), and this
small process, started by the launcher with a pipe as its stdin, waits for that pipe to close: when the
launcher ends, normally or not, it sends SIGTERM to every process carrying the token (the ServerApp then
records how the run ended), waits ``grace`` seconds, SIGKILLs what is left, and exits.

It also holds the run dir's lock (``launch.rundir``: the descriptor is passed to it), so the dir stays locked
until the last process of the run is gone; a later ``--overwrite`` never takes over a dir an orphan still
writes to.

    python -m launch.reaper <token> [grace_s]
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

TOKEN_ENV = "KUMIKI_RUN_TOKEN"
_PR_SET_PDEATHSIG = 1


def parent_death_signal(sig: int = signal.SIGKILL):
    """A ``preexec_fn``: the child gets ``sig`` when the thread that started it ends (Linux ``prctl``)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return preexec


def marked(token: str) -> list[int]:
    """PIDs of live processes (this user's) whose environment carries ``KUMIKI_RUN_TOKEN=<token>``."""
    needle = f"{TOKEN_ENV}={token}".encode()
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone, or another user's
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry))
    return found


def reap(token: str, grace_s: float = 10.0) -> list[int]:
    """SIGTERM every marked process once (the ServerApp records the signal and writes its report), up to
    ``grace_s`` for them to end, then SIGKILL; returns the PIDs signalled."""
    termed: set[int] = set()

    def send(sig: int, skip: set[int]) -> list[int]:
        pids = marked(token)
        for pid in pids:
            if pid in skip:
                continue
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        return pids

    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:  # again for processes started meanwhile; never twice to one process
        pids = send(signal.SIGTERM, termed)
        if not pids:
            break
        termed.update(pids)
        time.sleep(0.2)
    deadline = time.monotonic() + 10.0
    while send(signal.SIGKILL, set()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return sorted(termed)


def main(argv: list[str]) -> int:
    token, grace = argv[0], float(argv[1]) if len(argv) > 1 else 10.0
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):  # only the pipe ends its wait
        signal.signal(sig, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):  # the launcher writes nothing; EOF: it ended (or was killed)
        pass
    left = reap(token, grace)
    if left:
        print(f"kumiki reaper: stopped {len(left)} process(es) of the run: {left}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
