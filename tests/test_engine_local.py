"""The local deployment engine: a real flower-superlink + one flower-supernode per site on 127.0.0.1.

Small on purpose (digits, MLP, 2 sites, 2 rounds): it proves the deployment path end to end,
that the contract's summary comes back, and that no process the engine started survives it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launch.engines import local
from tests.conftest import make_config

pytestmark = pytest.mark.deploy

SUMMARY_KEYS = {"method", "dataset", "metric", "rounds", "sites", "personalized", "global", "unseen", "bytes", "time",
                "privacy"}


def proc_stats():
    """(pid, state, ppid, pgrp) of every process, from /proc/<pid>/stat."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
        yield int(entry.name), fields[0], int(fields[1]), int(fields[2])


def _group_members(pgids: set[int]) -> set[int]:
    """PIDs of live (non-zombie) processes whose process group is one of ``pgids``."""
    return {pid for pid, state, _, pgrp in proc_stats() if state != "Z" and pgrp in pgids}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class _Spy:
    """Records the engine's daemons (their PIDs are their process-group ids) and every member."""

    def __init__(self):
        self.groups: set[int] = set()
        self.pids: set[int] = set()

    def __call__(self, pids: list[int]) -> None:
        self.groups.update(pids)
        self.pids.update(pids)
        self.pids.update(_group_members(self.groups))

    def survivors(self) -> set[int]:
        return {p for p in self.pids | _group_members(self.groups) if _alive(p)}


def test_local_engine_two_sites(tmp_path):
    cfg = make_config(tmp_path, rounds=2, sites=2, arch="mlp", name="local")
    spy = _Spy()
    summary = local.run_local(cfg, quiet=True, timeout_s=300, ready_timeout_s=120, on_start=spy)

    run_dir = cfg.run_dir()
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == summary
    assert SUMMARY_KEYS <= set(summary)
    assert summary["method"] == "fedavg" and summary["dataset"] == "digits" and summary["metric"] == "accuracy"
    assert summary["rounds"] == 2 and summary["sites"] == 2
    # every packed message (kumiki/packing.py) crossed the real transport and was accepted, both ways
    assert summary["status"] == "ok" and summary["participation"]["incomplete_rounds"] == []
    assert 0 < summary["eval_share"]["overall"] < 1
    assert {"mean", "std", "bottom10", "per_site"} <= set(summary["personalized"])
    assert set(summary["personalized"]["per_site"]) == {"site-0", "site-1"}
    assert {"mean", "per_site"} <= set(summary["global"])
    assert set(summary["global"]["per_site"]) == {"site-0", "site-1"}
    for k in ("up_per_round", "down_per_round", "up_total", "down_total"):
        assert summary["bytes"][k] > 0, k
    assert summary["time"]["wall_s"] > 0 and summary["time"]["per_round_s"] > 0
    assert summary["unseen"] is None or not summary["unseen"].get("per_site")

    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["round"] for r in rounds if r["kind"] == "round"] == [1, 2]
    # the deployment really ran: the SuperLink, one SuperNode per site, a resolved config
    logs = {p.name for p in (run_dir / "logs").glob("*.log")}
    assert {"superlink.log", "supernode-site-0.log", "supernode-site-1.log", "flwr-run.log"} <= logs
    assert json.loads((run_dir / "resolved_config.json").read_text())["run"]["output_dir"] == str(run_dir.parent.resolve())
    # the fast path (launch/fastpath.py) applied in every real process, and TLS + authentication were on
    log_text = {p.stem: p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.log")}
    assert "kumiki fastpath (supernode): supernode-poll: on, pull-backoff: on" in log_text["supernode-site-0"]
    assert "fork-executor: on" in log_text["superexec-site-1"] and "fork-executor: on" in log_text["superexec-serverapp"]
    assert "Uvicorn running on https://" in log_text["superlink"]

    assert len(spy.groups) >= 4  # superlink + 2 supernodes (+ SuperExecs)
    assert spy.survivors() == set(), "processes started by the local engine are still alive"


def test_local_engine_reports_a_failed_run(tmp_path, monkeypatch):
    """``flwr run`` exits 0 when the ServerApp fails; the engine must raise, with logs, and clean up."""
    cfg = make_config(tmp_path, rounds=1, sites=2, arch="mlp", name="broken", server={"discovery_timeout_s": 30.0})
    real = local.node_configs

    def no_data(cfg_, sim):  # every site points at a folder that does not exist -> no site can answer
        return [{**nc, "data-dir": nc["data-dir"] + "-missing"} for nc in real(cfg_, sim)]

    monkeypatch.setattr(local, "node_configs", no_data)
    spy = _Spy()
    with pytest.raises(RuntimeError, match=r"(?s)ended with status .*failed.*recorded as 'failed'"):
        local.run_local(cfg, quiet=True, timeout_s=240, ready_timeout_s=120, on_start=spy)
    summary = json.loads((cfg.run_dir() / "summary.json").read_text())  # the ServerApp recorded how it ended
    assert summary["status"] == "failed" and "no training site" in summary["error"]
    assert spy.groups and spy.survivors() == set()


@pytest.mark.slow
def test_local_engine_stock_flower(tmp_path):
    """The same deployment with Flower exactly as shipped (stock executables, no tuning): ~1 min."""
    cfg = make_config(tmp_path, rounds=1, sites=2, arch="mlp", name="stock")
    spy = _Spy()
    summary = local.run_local(cfg, quiet=True, timeout_s=400, ready_timeout_s=120, tuning=local.Tuning.stock(),
                              on_start=spy)
    assert summary["rounds"] == 1 and set(summary["personalized"]["per_site"]) == {"site-0", "site-1"}
    assert spy.groups and spy.survivors() == set()
