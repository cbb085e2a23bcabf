"""Write a file whole or not at all: written aside, flushed to disk, then renamed over the old one.

Kumiki's files are read by other processes while they are written (a region's server takes ``job.json`` as soon
as it exists; an operator's `kumiki status` reads ``summary.json``) and must survive a crash or a kill mid-write
(the privacy ledger, the resume checkpoint, a site's data). A reader therefore sees the old file or the new one,
never a half-written one, and a failed write leaves no temporary file behind.

The temporary file is unique per write (``mkstemp`` in the same folder, so the rename stays on one file system),
so two writers of one path never share a half-written file; it is created 0600 and only then given its final
mode, so a private file (a key) is never readable by others, not even briefly.

numpy only (no Kumiki imports): the sites, the server, the launcher and data preparation all use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *, mode: int = 0o644) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_bytes(path: str | Path, data: bytes, *, mode: int = 0o644) -> None:
    atomic_write(path, lambda f: f.write(data), mode=mode)


def atomic_text(path: str | Path, text: str) -> None:
    atomic_bytes(path, text.encode("utf-8"))


def atomic_json(path: str | Path, obj: Any, indent: int | None = None) -> None:
    atomic_text(path, json.dumps(obj, indent=indent))


def atomic_npz(path: str | Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))
