"""Fault family: processes die or are signalled (issue 7).

* a site's node vanishes and comes back under a new node id (a restarted SuperNode): the rounds in
  between go on without it, and it resumes with its personal state (in-process, fast);
* a real ``flower-supernode`` killed mid-run: the local engine restarts it and the run completes;
* SIGTERM to ``kumiki run --engine local`` stops every process it started, like Ctrl-C (SIGHUP takes
  the same handler, checked without processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from kumiki import contract as C
from launch.engines import local
from launch.engines.inprocess import run_inprocess
from tests.conftest import config_file, make_config
from tests.test_engine_local import _alive, _group_members, proc_stats

ROOT = Path(__file__).resolve().parents[1]


def _rows(cfg):
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: r for r in rows if r["kind"] == "round"}


def test_a_site_that_goes_offline_and_reconnects_resumes_with_its_state(tmp_path):
    cfg = make_config(tmp_path, rounds=3, sites=3, method="fedper")
    heads = {}

    def hook(grid):
        get_ids = grid.get_node_ids

        def node_ids():  # site-1 (node 2) is offline in round 2, then back as node 7 (a restarted SuperNode)
            evaluated = {int(m.content[C.CONFIG][C.ROUND]) for m in grid.sent if m.metadata.message_type == "train"}
            if len(evaluated) == 1 and 2 not in grid.offline:
                grid.offline.add(2)
                state = Path(grid.contexts[2].node_config["state-dir"]) / "site_state.pt"
                heads["before"] = torch.load(state, weights_only=True)["personal"]["head.weight"]
            if len(evaluated) == 2 and 7 not in grid.contexts:
                grid.contexts[7] = Context(run_id=1, node_id=7, node_config=dict(grid.contexts[2].node_config),
                                           state=RecordDict(), run_config={})
            return get_ids()

        grid.get_node_ids = node_ids

    summary = run_inprocess(cfg, quiet=True, grid_hook=hook)
    rows = _rows(cfg)
    assert rows[1]["sites"]["took_part"] == ["site-0", "site-1", "site-2"]
    assert rows[2]["sites"]["took_part"] == ["site-0", "site-2"]
    assert {"site": "site-1", "reason": "offline (not connected)"} in rows[2]["sites"]["rejected"]
    assert rows[3]["sites"]["took_part"] == ["site-0", "site-1", "site-2"], "it came back"
    saved = torch.load(cfg.run_dir() / "state" / "site-1" / "site_state.pt", weights_only=True)
    assert saved["last_round"] == 3 and not torch.equal(saved["personal"]["head.weight"], heads["before"])
    assert summary["status"] == "incomplete" and summary["participation"]["trained_rounds"]["site-1"] == 2


@pytest.mark.deploy
def test_local_engine_restarts_a_killed_supernode_and_finishes(tmp_path):
    cfg = make_config(tmp_path, rounds=4, sites=2, arch="mlp", name="kill", server={"round_timeout_s": 30.0})
    killed = []

    def on_start(pids):
        victim = next(p for p in local_procs if p.name == "supernode-site-1")
        os.killpg(victim.popen.pid, signal.SIGKILL)
        killed.append(victim.popen.pid)

    local_procs = []
    real_start = local._Cluster.start

    def spy_start(self, *a, **kw):
        p = real_start(self, *a, **kw)
        local_procs.append(p)
        return p

    local._Cluster.start = spy_start
    try:
        summary = local.run_local(cfg, quiet=True, timeout_s=300, ready_timeout_s=120, on_start=on_start)
    finally:
        local._Cluster.start = real_start
    assert killed and summary["rounds"] == 4
    assert "restarting it" in "".join(p.log.read_text(errors="replace") for p in local_procs if p.name == "flwr-run") \
        or len([p for p in local_procs if p.name == "supernode-site-1"]) >= 2
    assert len([p for p in local_procs if p.name == "supernode-site-1"]) >= 2, "the engine restarted it"
    assert summary["participation"]["trained_rounds"]["site-1"] >= 1


def test_sigterm_and_sighup_unwind_like_ctrl_c():
    """The CLI turns both into KeyboardInterrupt, so every ``finally:`` (process clean-up) runs."""
    from launch.cli import stop_on_signals

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        stop_on_signals()
        for sig in saved:
            with pytest.raises(KeyboardInterrupt, match=signal.Signals(sig).name):
                os.kill(os.getpid(), sig)
                time.sleep(1.0)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.deploy
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])
def test_a_signal_stops_a_local_run_and_every_process_it_started(tmp_path, sig):
    conf = config_file(tmp_path, "sig", 50)
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "run", str(conf), "--engine", "local"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        seen = ""
        while time.monotonic() < deadline and "round   1/" not in seen:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
        assert "round   1/" in seen, seen[-2000:]
        children = {p for p in _group_members(_sessions_of(proc.pid))} - {proc.pid}
        assert children, "the engine started processes"
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert rc != 0
    time.sleep(1.0)
    assert not [p for p in children if _alive(p)], "processes outlived the signalled run"
    summary = tmp_path / "runs" / "sig" / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] != "ok"


def _sessions_of(pid: int) -> set[int]:
    """Process groups of ``pid``'s descendants (the engine puts each daemon in its own group)."""
    stats = list(proc_stats())
    groups, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, _, ppid, pgrp in stats:
            if ppid == parent:
                todo.append(child)
                groups.add(pgrp)
    return groups
