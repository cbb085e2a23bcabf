"""The regional aggregator starts its region's server once: a slow start is not a dead server."""

from __future__ import annotations

import time

import pytest

from client import bridge

REAL_SLEEP = time.sleep  # the fixture below makes time.sleep a no-op (for the bridge's loop)


@pytest.fixture
def region(tmp_path, monkeypatch):
    """A job folder and a fake Flower: ``statuses`` is what ``flwr ls`` says, call after call."""
    job = tmp_path / "region" / "jobs" / "000001-train"
    job.mkdir(parents=True)
    calls = {"starts": 0, "statuses": []}

    def start(node_config, region_dir):
        calls["starts"] += 1
        return 100 + calls["starts"]

    def status(node_config, run_id):
        if not calls["statuses"]:
            return "finished:completed"
        said = calls["statuses"].pop(0)
        if not calls["statuses"] and calls.get("answer_after_last"):
            (job / "result.json").write_text("{}")  # the server took the lock and answered
        return said

    monkeypatch.setattr(bridge, "BOOT_GRACE_S", 0.0)
    monkeypatch.setattr(bridge, "start_server", start)
    monkeypatch.setattr(bridge, "run_status", status)
    monkeypatch.setattr(bridge, "server_alive", lambda region_dir: False)
    monkeypatch.setattr(bridge.time, "sleep", lambda s: None)
    return job, calls


def test_a_server_whose_run_is_still_starting_is_not_started_again(region, monkeypatch):
    job, calls = region
    calls["statuses"], calls["answer_after_last"] = ["pending", "starting", "running", "running"], True
    clock = iter(range(0, 10_000, 10))  # every look at the clock is 10 s later: each loop may ask Flower again
    monkeypatch.setattr(bridge.time, "monotonic", lambda: float(next(clock)))
    bridge.run_region(job, {"region-timeout-s": 5_000})
    assert calls["starts"] == 1 and not calls["statuses"]


def test_a_server_whose_run_finished_without_the_lock_is_started_again_then_given_up(region, monkeypatch):
    job, calls = region
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(bridge.time, "monotonic", lambda: float(next(clock)))
    with pytest.raises(RuntimeError, match="stopped 3 times"):
        bridge.run_region(job, {"region-timeout-s": 5_000})
    assert calls["starts"] == 3


@pytest.mark.parametrize("status, alive", [("pending", True), ("starting", True), ("running", True),
                                           ("finished:completed", False), ("finished:failed", False),
                                           ("unknown", False)])
def test_booting(status, alive):
    assert bridge.booting(status) is alive


def test_the_next_job_of_a_region_does_not_start_a_server_that_is_still_starting(region, monkeypatch):
    """The profile job submitted the server; the train job that follows finds its run id in the region's
    folder and waits for it instead of submitting a second server (seen under load: two 'Successfully
    started' in one region's flwr-run.log)."""
    job, calls = region
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(bridge.time, "monotonic", lambda: float(next(clock)))
    (job.parent.parent / bridge.RUN_ID_FILE).write_text("101")
    calls["statuses"], calls["answer_after_last"] = ["starting", "running"], True
    bridge.run_region(job, {"region-timeout-s": 5_000})
    assert calls["starts"] == 0 and not calls["statuses"]


def test_a_status_flower_cannot_tell_is_waited_on_before_a_restart(region, monkeypatch):
    """``flwr ls`` timing out on a busy machine says 'unknown': no restart within UNKNOWN_GRACE_S of it."""
    job, calls = region
    clock = iter(range(0, 100_000, 10))
    monkeypatch.setattr(bridge.time, "monotonic", lambda: float(next(clock)))
    calls["statuses"] = ["unknown"] * 4 + ["running"]
    calls["answer_after_last"] = True
    bridge.run_region(job, {"region-timeout-s": 50_000})
    assert calls["starts"] == 1 and not calls["statuses"]
    assert (job.parent.parent / bridge.RUN_ID_FILE).read_text() == "101"


def test_two_jobs_that_find_no_server_at_once_start_one(region, monkeypatch):
    """Two jobs of one region (the root re-asked while the first start was still in ``flwr run``) both find no
    server: the second waits on the first's submission instead of starting a second server."""
    import threading

    job, calls = region
    real_sleep = REAL_SLEEP
    second = job.parent / "000002-query.profile"
    second.mkdir()
    entered = threading.Event()

    def slow_start(node_config, region_dir):
        calls["starts"] += 1
        entered.set()
        real_sleep(0.5)  # flwr run takes its time; the other job looks meanwhile
        return 100 + calls["starts"]

    def status(node_config, run_id):
        real_sleep(0.01)
        if calls["starts"] and entered.is_set():
            for j in (job, second):
                (j / "result.json").write_text("{}")
        return "running"

    monkeypatch.setattr(bridge, "start_server", slow_start)
    monkeypatch.setattr(bridge, "run_status", status)
    t = threading.Thread(target=bridge.run_region, args=(job, {"region-timeout-s": 30}))
    t.start()
    entered.wait(10)
    bridge.run_region(second, {"region-timeout-s": 30})
    t.join(30)
    assert calls["starts"] == 1


def test_an_interrupted_job_write_leaves_no_job_for_the_server(tmp_path, monkeypatch):
    """The region's server takes a job as soon as its ``job.json`` exists: a write cut off half-way (on a loaded
    machine, the server read such a file and its whole run died) must leave no ``job.json`` at all."""
    import os
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, RecordDict

    job_dir = tmp_path / "jobs" / "train-1"
    job_dir.mkdir(parents=True)
    msg = SimpleNamespace(content=RecordDict({"config": ConfigRecord({"server-round": 1})}),
                          metadata=SimpleNamespace(message_type="train"))  # what write_job reads of a Message

    def cut_off(fd):  # the process dies after writing job.json's bytes, before they are known to be on disk
        raise OSError("cut off")

    monkeypatch.setattr(os, "fsync", cut_off)
    with pytest.raises(OSError, match="cut off"):
        bridge.write_job(job_dir, msg, {"site": "region-0", "region-dir": str(tmp_path)})
    assert not (job_dir / "job.json").exists()


def test_the_region_server_answers_an_unreadable_job_with_an_error_and_serves_on(tmp_path):
    """One unreadable job is answered with an error; the region's server does not die with it."""
    import json

    from server.region import RegionService
    from tests.conftest import make_lm_config

    cfg = make_lm_config(tmp_path, name="r", rounds=1)
    state = tmp_path / "state"
    bad = state / "jobs" / "train-bad"
    bad.mkdir(parents=True)
    (bad / "job.json").write_text('{"kind": "tra')  # what a half-written job looked like
    assert RegionService(None, cfg, state).serve_pending() == 1
    answer = json.loads((bad / "result.json").read_text())
    assert answer["error"] and "unreadable job" in answer["error"]["reason"]


def test_the_bridge_submits_its_region_app_through_fastpath_so_it_is_signed(tmp_path, monkeypatch):
    """A region's sites run only apps signed with the region's key (deploy/compose/region.yml, the regions engine):
    the bridge's `flwr run` and `flwr ls` go through launch/fastpath.py flwr, which signs with KUMIKI_APP_SIGNING_KEY
    from the environment; `region-flwr` still names another executable."""
    import sys

    seen = []

    class Done:
        returncode, stdout, stderr = 0, "Successfully started run 7\n", ""

    monkeypatch.setattr(bridge.subprocess, "run", lambda cmd, env, **kw: seen.append((cmd, env)) or Done())
    monkeypatch.setenv("KUMIKI_APP_SIGNING_KEY", "/keys/region/app-signing.key")
    nc = {"region-flwr-home": str(tmp_path / "home"), "region-federation": "region", "region-config": "c.toml"}
    assert bridge.start_server(nc, tmp_path) == 7
    cmd, env = seen[-1]
    assert cmd[:3] == [sys.executable, str(bridge.APP_DIR / "launch" / "fastpath.py"), "flwr"] and cmd[3] == "run"
    assert env["KUMIKI_APP_SIGNING_KEY"] == "/keys/region/app-signing.key" and env["FLWR_HOME"] == nc["region-flwr-home"]
    bridge.run_status(nc, 7)
    assert seen[-1][0][:4] == cmd[:3] + ["ls"]
    bridge.start_server({**nc, "region-flwr": "/opt/flwr"}, tmp_path)
    assert seen[-1][0][:2] == ["/opt/flwr", "run"]
