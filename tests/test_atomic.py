"""kumiki.atomic: a reader sees the old file or the new one, never part of one, and a failed write leaves no debris."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from kumiki.atomic import atomic_bytes, atomic_json, atomic_npz, atomic_write


def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ledger.json"
    atomic_json(path, {"spent": 1.5})

    def half(f):
        f.write(b'{"spent": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert json.loads(path.read_text()) == {"spent": 1.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_a_rename_that_fails_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "job.json"
    atomic_json(path, {"round": 1})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        atomic_json(path, {"round": 2})
    assert json.loads(path.read_text()) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]


def test_private_files_are_owner_only_and_others_world_readable(tmp_path):
    atomic_bytes(tmp_path / "site.key", b"secret", mode=0o600)
    atomic_bytes(tmp_path / "site.crt", b"public")
    assert stat.S_IMODE((tmp_path / "site.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "site.crt").stat().st_mode) == 0o644
    assert (tmp_path / "site.key").read_bytes() == b"secret"


def test_npz_round_trips_and_replaces(tmp_path):
    path = tmp_path / "state.npz"
    atomic_npz(path, w=np.arange(3.0))
    atomic_npz(path, w=np.ones(2), r=np.array(7))
    with np.load(path) as z:
        assert sorted(z.files) == ["r", "w"]
        np.testing.assert_array_equal(z["w"], np.ones(2))
