"""The local engine's reaper: nothing a local run started outlives its launcher, not even after ``kill -9``.

A ``kill -9`` (or the OOM killer) gives the launcher no ``finally:``. Its direct children die with it
(``PR_SET_PDEATHSIG``, set by ``parent_death_signal``), but that signal is not inherited: the SuperExecs'
ClientApps and the ServerApp are grandchildren, and Flower's stock SuperLink even starts its SuperExec in a
session of its own. So every process of a run carries one marker in its environment
(``KUMIKI_RUN_TOKEN=<token>``, inherited by every descendant, whatever its session or parent), and this
small process, started by the launcher with a pipe as its stdin, waits for that pipe to close: when the
launcher ends, normally or not, it sends SIGTERM to every process carrying the token (the ServerApp then
records how the run ended), and to every process of the process groups the launcher told it about (one
group id a line on the pipe: each daemon's group, which also holds the helpers a daemon forks, such as
nginx's workers, whose environment nginx overwrites with their process titles), waits ``grace`` seconds,
SIGKILLs what is left, and exits.

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


def group_members(groups: set[int]) -> list[int]:
    """PIDs of live (non-zombie) processes whose process group is one of ``groups``."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) in groups:
            found.append(int(entry))
    return found


def reap(token: str, grace_s: float = 10.0, groups: set[int] | None = None) -> list[int]:
    """SIGTERM every marked process and every member of ``groups`` once (the ServerApp records the signal and
    writes its report), up to ``grace_s`` for them to end, then SIGKILL; returns the PIDs signalled."""
    termed: set[int] = set()
    groups = set(groups or ())

    def send(sig: int, skip: set[int]) -> list[int]:
        pids = sorted(set(marked(token)) | set(group_members(groups)))
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
    groups: set[int] = set()
    for line in sys.stdin.buffer:  # one process group id a line; EOF: the launcher ended (or was killed)
        try:
            groups.add(int(line))
        except ValueError:
            pass
    left = reap(token, grace, groups)
    if left:
        print(f"kumiki reaper: stopped {len(left)} process(es) of the run: {left}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
