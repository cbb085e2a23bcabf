"""kumiki.locks.held: a lock file reads as held only while a live process holds it."""

from __future__ import annotations

import subprocess
import sys

from kumiki.locks import held

HOLD = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(60)")


def test_held_while_the_holder_lives_and_not_after(tmp_path):
    path = tmp_path / "server.lock"
    assert not held(path)  # no file
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert held(path)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert path.is_file() and not held(path)  # a stale file left by a dead holder is not held
