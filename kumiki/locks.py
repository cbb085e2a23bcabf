"""A lock file held by a live process: how one process tells whether another (a region's server) still runs.

The holder keeps an exclusive ``flock`` on the file for as long as it lives; the kernel drops it when the
process dies, so a stale file left by a crash never reads as held. Shared by the site side (a regional
aggregator's ClientApp mod) and the server side (the region's long-lived server), which import nothing of
each other.
"""

from __future__ import annotations

import fcntl
from pathlib import Path


def held(path: str | Path) -> bool:
    """Whether some live process holds an exclusive ``flock`` on ``path`` (False when there is no such file)."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False
