"""Fault family: processes die or are signalled (issue 7).

* a site's node vanishes and comes back under a new node id (a restarted SuperNode): the rounds in
  between go on without it, and it resumes with its personal state (in-process, fast);
* a real ``flower-supernode`` killed mid-run: the local engine restarts it and the run completes;
* SIGTERM to ``kumiki run --engine local`` stops every process it started, like Ctrl-C (SIGHUP takes
  the same handler, checked without processes), and records the signal; ``kill -9`` of it leaves no orphan
  (issue 22), and the run dir stays locked until the last process of the run is gone;
* a ServerApp killed outright is noticed within seconds and the run recorded as failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from kumiki import contract as C
from kumiki.locks import held
from launch import reaper
from launch.engines import local
from launch.rundir import LOCK
from server.lifecycle import PID_FILE
from launch.engines.inprocess import run_inprocess
from tests.conftest import config_file, make_config
from tests.test_engine_local import _alive, proc_stats

ROOT = Path(__file__).resolve().parents[1]


def _rounds(cfg):
    return _round_rows(cfg.run_dir())


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


def _when(cond, timeout_s=240.0, every=0.2):
    """Wait (bounded) until ``cond()`` is truthy; returns its value (None on time-out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(every)
    return None


def _round_rows(run_dir: Path) -> dict[int, dict]:
    try:
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return {}
    return {r["round"]: r for r in rows if r.get("kind") == "round"}


@pytest.mark.deploy
def test_local_engine_restarts_a_killed_supernode_and_finishes(tmp_path):
    """site-1's SuperNode is killed after round 1: the engine restarts it, the site trains again in a later round,
    and the rounds it missed record it once, under its own name (no phantom ``node-1``: the SuperLink's own
    error reply for the vanished node)."""
    cfg = make_config(tmp_path, rounds=4, sites=2, arch="mlp", name="kill", server={"round_timeout_s": 30.0})
    killed: list[int] = []
    local_procs = []
    real_start = local._Cluster.start

    def spy_start(self, *a, **kw):
        p = real_start(self, *a, **kw)
        local_procs.append(p)
        return p

    def killer():
        if _when(lambda: 1 in _round_rows(cfg.run_dir()), 240):
            victim = next(p for p in local_procs if p.name == "supernode-site-1")
            killed.append(max(_round_rows(cfg.run_dir())))
            os.killpg(victim.popen.pid, signal.SIGKILL)

    local._Cluster.start = spy_start
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        summary = local.run_local(cfg, quiet=True, timeout_s=300, ready_timeout_s=120)
    finally:
        local._Cluster.start = real_start
        thread.join(timeout=10)
    assert killed and summary["rounds"] == 4
    assert len([p for p in local_procs if p.name == "supernode-site-1"]) >= 2, "the engine restarted it"
    rows = _rounds(cfg)
    assert any("site-1" in rows[r]["sites"]["took_part"] for r in rows if r > killed[0]), \
        f"site-1 trained in no round after its restart (killed after round {killed[0]})"
    rejected = [x["site"] for r in rows.values() for x in r["sites"]["rejected"]]
    assert set(rejected) <= {"site-1"}, f"rejections of sites that do not exist: {rejected}"


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


def _descendants(pid: int) -> set[int]:
    stats = list(proc_stats())
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, state, ppid, _ in stats:
            if ppid == parent and state != "Z" and child not in found:
                found.add(child)
                todo.append(child)
    return found


def _token_of(pids: set[int]) -> str | None:
    for pid in pids:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(reaper.TOKEN_ENV.encode() + b"="):
                return item.split(b"=", 1)[1].decode()
    return None


@pytest.mark.deploy
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_signal_stops_a_local_run_and_every_process_it_started(tmp_path, sig):
    """SIGTERM: the run says why it stopped, records the signal (not ``SystemExit: 0``) and writes its report.
    SIGKILL (no ``finally:`` runs): every process of the run still dies, grandchildren included, and the run dir
    stays locked while any of them lives, so no ``--overwrite`` can take it over under a live orphan."""
    conf = config_file(tmp_path, "sig", 50)
    run_dir = tmp_path / "runs" / "sig"
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
        children = _descendants(proc.pid)
        token = _token_of(children)
        assert children and token, "the engine started processes, each marked with the run's token"
        assert held(run_dir / LOCK)
        proc.send_signal(sig)
        orphans_unlocked = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            locked = held(run_dir / LOCK)  # first the lock, then the processes: none may outlive the lock
            alive = [p for p in children if _alive(p)] + reaper.marked(token)
            if not locked and alive:
                orphans_unlocked.append(alive)
            if not alive and not locked:
                break
            time.sleep(0.05)
        rc = proc.wait(timeout=60)
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert not [p for p in children if _alive(p)] and not reaper.marked(token), "processes outlived the run"
    assert not orphans_unlocked, f"the run dir was free while processes of the run lived: {orphans_unlocked[:3]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "SystemExit" not in summary["error"]
    # SIGKILL: the reaper's SIGTERM (or Flower's parent monitor, SIGINT) reaches the ServerApp
    assert summary["error"] == "stopped by SIGTERM" if sig == signal.SIGTERM else summary["error"].startswith("stopped by SIG")
    assert (run_dir / "report.html").is_file()
    if sig == signal.SIGTERM:
        assert rc == 128 + signal.SIGTERM
        assert "stopped by SIGTERM" in rest and "report.html" in rest, rest[-2000:]
    else:
        assert rc == -signal.SIGKILL


@pytest.mark.deploy
def test_a_dead_serverapp_is_noticed_within_seconds_and_recorded(tmp_path, monkeypatch):
    """kill -9 of the ServerApp (as the OOM killer would): the engine's own check notices it (it used to wait
    ~67 s for the SuperLink's heartbeat) and records the run as failed, with its report.

    The bound is on the moment the engine's check sees the death, not on the teardown and report after it: on
    a loaded machine (load 20-40) stopping the processes and drawing the report took 26 s more."""
    cfg = make_config(tmp_path, rounds=50, sites=2, arch="mlp", name="deadserver")
    marker = cfg.run_dir() / PID_FILE
    killed: list[float] = []
    seen: list[float] = []
    real_check = local.serverapp_died

    def check(run_dir):
        dead = real_check(run_dir)
        if dead is not None and not seen:
            seen.append(time.monotonic())
        return dead

    monkeypatch.setattr(local, "serverapp_died", check)

    def killer():
        pid = _when(lambda: 1 in _round_rows(cfg.run_dir()) and marker.is_file() and int(marker.read_text()), 240)
        if pid:
            os.kill(pid, signal.SIGKILL)
            killed.append(time.monotonic())

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    with pytest.raises(RuntimeError, match="the ServerApp .* died without ending the run"):
        local.run_local(cfg, quiet=True, timeout_s=400, ready_timeout_s=120)
    thread.join(timeout=10)
    # well inside the SuperLink's ~67 s heartbeat, with room for a loaded machine's scheduling
    assert killed and seen and seen[0] - killed[0] < 30, f"noticed after {seen[0] - killed[0]:.1f}s" if seen else seen
    summary = json.loads((cfg.run_dir() / "summary.json").read_text())
    assert summary["status"] == "failed" and "ServerApp" in summary["error"] and summary["rounds"] >= 1
    assert (cfg.run_dir() / "report.html").is_file()


def test_the_reaper_stops_marked_processes_and_recorded_groups_when_its_pipe_closes():
    """launch/reaper.py, as a killed launcher leaves it: its pipe closes. It stops a process that carries the run's
    token in another session (Flower's stock SuperLink starts its SuperExec that way), and the rest of a recorded
    process group whose leader is gone (nginx's worker after its master died: nginx overwrites its environment)."""
    token = uuid.uuid4().hex
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    marked = subprocess.Popen(sleeper, env={**os.environ, reaper.TOKEN_ENV: token}, start_new_session=True)
    leader = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               f"p = subprocess.Popen({sleeper!r}); print(p.pid, flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    member = int(leader.stdout.readline())
    keeper = subprocess.Popen([sys.executable, str(Path(reaper.__file__)), token, "2"], stdin=subprocess.PIPE,
                              start_new_session=True)
    try:
        keeper.stdin.write(f"{leader.pid}\n".encode())
        keeper.stdin.flush()
        os.kill(leader.pid, signal.SIGKILL)
        leader.wait(timeout=10)
        assert _alive(member) and _alive(marked.pid)
        keeper.stdin.close()  # the launcher is gone
        keeper.wait(timeout=30)
        assert _when(lambda: not _alive(member) and not _alive(marked.pid), 10), "the reaper left processes alive"
    finally:
        for pid in (marked.pid, member):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        marked.wait(timeout=10)
