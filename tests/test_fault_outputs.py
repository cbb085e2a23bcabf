"""Fault family: reruns, concurrent runs and partial runs never overwrite or mix outputs (issue 7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.engines.inprocess import run_inprocess
from launch.rundir import LOCK, RunDirError
from server.recorder import Recorder
from tests.conftest import config_file, make_config

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rerun_of_a_run_name_is_refused_and_the_old_run_kept(tmp_path):
    cfg = make_config(tmp_path, rounds=1, sites=2)
    run_inprocess(cfg, quiet=True)
    before = _snapshot(cfg.run_dir())
    with pytest.raises(RunDirError, match="already holds a run.*--overwrite"):
        run_inprocess(cfg, quiet=True)
    assert _snapshot(cfg.run_dir()) == before


def test_overwrite_moves_the_old_run_aside(tmp_path):
    cfg = make_config(tmp_path, rounds=1, sites=2)
    run_inprocess(cfg, quiet=True)
    old = _snapshot(cfg.run_dir())
    run_inprocess(cfg, quiet=True, overwrite=True)
    [aside] = [p for p in cfg.run_dir().parent.iterdir() if p.name.startswith("t.replaced-")]
    assert _snapshot(aside) == old, "nothing of the old run was lost"
    assert json.loads((cfg.run_dir() / "summary.json").read_text())["status"] == "ok"
    assert not (cfg.run_dir() / LOCK).exists(), "the lock goes with the run"


def test_a_rerun_that_fails_early_touches_nothing(tmp_path):
    """A bad data.path used to truncate metrics.jsonl and delete state/ before failing."""
    cfg = make_config(tmp_path, rounds=1, sites=2)
    run_inprocess(cfg, quiet=True)
    before = _snapshot(cfg.run_dir())
    bad = make_config(tmp_path, rounds=1, sites=2, data={"dataset": "fashion-mnist", "path": str(tmp_path / "nope")})
    from kumiki.data.sources import DataUnavailable

    with pytest.raises(DataUnavailable):
        run_inprocess(bad, quiet=True, overwrite=True)
    assert _snapshot(cfg.run_dir()) == before
    assert [p.name for p in cfg.run_dir().parent.iterdir()] == ["t"], "nothing was moved aside either"


def test_a_second_run_on_a_locked_run_dir_is_refused_and_a_stale_lock_taken_over(tmp_path):
    cfg = make_config(tmp_path, rounds=1, sites=2)
    cfg.run_dir().mkdir(parents=True)
    hold = ("import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write(f'{os.getpid()} now\\n'); f.flush(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(cfg.run_dir() / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"in use by another Kumiki run \\(pid {holder.pid}"):
            run_inprocess(cfg, quiet=True, overwrite=True)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    (cfg.run_dir() / LOCK).write_text(f"{holder.pid} then\n")  # that process is gone: a stale lock
    assert run_inprocess(cfg, quiet=True)["status"] == "ok"


def test_the_server_refuses_to_record_over_an_earlier_run(tmp_path):
    """The Flower-native path (no engine to claim the dir): the ServerApp itself refuses."""
    cfg = make_config(tmp_path, rounds=1, sites=2)
    cfg.run_dir().mkdir(parents=True)
    (cfg.run_dir() / "metrics.jsonl").write_text('{"kind": "round"}\n')
    with pytest.raises(FileExistsError, match="already holds a run"):
        Recorder(cfg.run_dir(), cfg, "deployment")
    assert (cfg.run_dir() / "metrics.jsonl").read_text() == '{"kind": "round"}\n'


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_report_refuses_a_partial_run_unless_asked_and_then_says_partial(tmp_path):
    cfg = make_config(tmp_path, rounds=2, sites=2)
    run_inprocess(cfg, quiet=True)
    metrics = cfg.run_dir() / "metrics.jsonl"
    metrics.write_text("\n".join(metrics.read_text().splitlines()[:-1]) + "\n")  # a run stopped before its end
    r = _cli("report", str(cfg.run_dir()))
    assert r.returncode == 2 and "did not finish" in r.stderr
    r = _cli("report", str(cfg.run_dir()), "--partial")
    assert r.returncode == 0, r.stderr
    assert "Partial run:" in (cfg.run_dir() / "report.html").read_text()


def test_cli_exit_code_follows_the_run_status(tmp_path):
    """A site that cannot join (here: its data folder is missing) makes the run incomplete: exit 3, not 0."""
    src = make_config(tmp_path / "src", sites=3)
    from kumiki.data.prepare import materialize

    folders = materialize(src, tmp_path / "sites")
    (folders[2] / "test.npz").unlink()
    data = f'dataset = "site-folders"\npath = "{tmp_path / "sites"}"\nsites = 3\ninput_shape = [1, 8, 8]\nnum_classes = 10'
    conf = config_file(tmp_path, "exit", 1, data)
    r = _cli("run", str(conf), "--engine", "inprocess")
    assert r.returncode == 3, r.stderr[-1500:]
    assert "status 'incomplete'" in r.stderr
    summary = json.loads((tmp_path / "runs" / "exit" / "summary.json").read_text())
    assert summary["status"] == "incomplete" and summary["participation"]["discovered"] == ["site-0", "site-1"]
    r = _cli("run", str(conf), "--engine", "inprocess")
    assert r.returncode == 2 and "already holds a run" in r.stderr
