"""Engines agree: Flower's simulation engine and the in-process engine give identical results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kumiki.engines import run
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = {"method", "dataset", "metric", "rounds", "sites", "personalized", "global", "unseen", "bytes", "time", "privacy"}


def test_simulation_engine_matches_inprocess(tmp_path):
    sim_cfg = make_config(tmp_path, method="fedprox", rounds=2, sites=2, unseen=1, name="sim")
    ref_cfg = make_config(tmp_path, method="fedprox", rounds=2, sites=2, unseen=1, name="ref")
    sim = run(sim_cfg, "simulation", quiet=True)
    ref = run(ref_cfg, "inprocess", quiet=True)
    assert set(sim) == CONTRACT
    assert sim["personalized"]["per_site"] == ref["personalized"]["per_site"]
    assert sim["unseen"]["per_site"] == ref["unseen"]["per_site"]
    assert sim["bytes"] == ref["bytes"]
    assert json.loads((sim_cfg.run_dir() / "summary.json").read_text())["rounds"] == 2


def test_cli_run_writes_outputs_and_report(tmp_path):
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(f"""
[run]
name = "cli"
rounds = 2
output_dir = "{tmp_path / 'runs'}"
[method]
name = "fedavg"
[data]
dataset = "digits"
sites = 2
[model]
arch = "mlp"
""")
    r = subprocess.run([sys.executable, "-m", "kumiki.cli", "run", str(cfg_path), "--engine", "inprocess", "--set", "run.rounds=3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "runs" / "cli"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == CONTRACT and summary["rounds"] == 3
    assert json.loads((out / "config.json").read_text())["run"]["rounds"] == 3
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in rows if x["kind"] == "round"] == [1, 2, 3]
    assert sum(x["kind"] == "site" for x in rows) == 3 * 2
    assert (out / "report.html").stat().st_size > 10_000
    assert "round   3/3" in r.stderr  # progress is shown while running
