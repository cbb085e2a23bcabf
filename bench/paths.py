"""The same speed on every path (issue 13 part 1): per-round latency of one config, side by side.

    .venv/bin/python bench/paths.py [--mode quick|full] [--paths local stock native] [--out DIR]

Paths, all real Flower processes on 127.0.0.1 with TLS and SuperNode authentication:

* ``local``:  ``kumiki run --engine local`` (the fast path, launch/fastpath.py);
* ``stock``:  the same engine with ``Tuning.stock()``: Flower 1.41 as shipped (stock
  executables, subprocess isolation, fixed sleeps) = what compose and the Flower-native
  commands would run without the fast path;
* ``native``: ``deploy/native.py up`` + ``run``: a long-lived SuperLink and SuperNodes started
  with the documented Flower-native commands (``python launch/fastpath.py superlink|supernode|
  superexec``), ``flwr run`` submitting the app; the SuperLink keeps its link state in SQLite
  (``--database``, as compose does: registrations survive a restart);
* ``native-memory``: the same with ``--state memory`` (Flower's in-memory state, like ``local``).

Modes: ``quick`` = digits, MLP, 2 sites, 3 rounds; ``full`` = the pilot config
(deploy/pilot.toml: Fashion-MNIST, CNN-S, 4 + 1 sites) with 3 rounds. Prints a table with
s/round (the ServerApp's own per-round time), wall time with start-up, and each path's ratio
to ``local``; ``--markdown`` prints the rows for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kumiki.config import KumikiConfig, validate  # noqa: E402
from bench.common import pilot_config  # noqa: E402
from kumiki.data.prepare import materialize  # noqa: E402
from launch.engines import local  # noqa: E402


def config(mode: str, out: Path, name: str) -> KumikiConfig:
    if mode == "quick":
        return validate({
            "run": {"name": name, "rounds": 3, "seed": 0, "output_dir": str(out / "runs")},
            "method": {"name": "fedavg"},
            "data": {"dataset": "digits", "sites": 2, "partition": {"kind": "dirichlet", "alpha": 0.3}},
            "model": {"arch": "mlp", "hidden": 64},
        })
    return pilot_config(["run.rounds=3", f'run.name="{name}"', f'run.output_dir="{out / "runs"}"'])


def run_engine(cfg: KumikiConfig, tuning: local.Tuning) -> dict:
    return local.run_local(cfg, quiet=True, overwrite=True, tuning=tuning)


def run_native(cfg: KumikiConfig, out: Path, state: str = "file") -> dict:
    """deploy/native.py: demo site folders for cfg's sites, up, run, down."""
    fed, data = out / "native-fed", out / "native-data"
    shutil.rmtree(fed, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    sites = []
    for folder in materialize(cfg, data / ".m"):
        dest = data / folder.name / "data"
        dest.parent.mkdir(parents=True)
        folder.rename(dest)
        sites.append(folder.name)
    script = [sys.executable, str(ROOT / "deploy" / "native.py"), "--dir", str(fed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        subprocess.run([*script, "up", "--data", str(data), "--sites", ",".join(sites), "--state", state], check=True, env=env,
                       stdout=subprocess.DEVNULL, timeout=600)
        cfg_file = out / "native-config.json"
        cfg_file.write_text(cfg.model_dump_json())
        subprocess.run([*script, "run", str(cfg_file)], check=True, env=env, stdout=subprocess.DEVNULL, timeout=1800)
    finally:
        subprocess.run([*script, "down"], env=env, stdout=subprocess.DEVNULL, timeout=120)
    out_dir = Path(cfg.run.output_dir)
    run_dir = (out_dir if out_dir.is_absolute() else fed / out_dir) / cfg.run.name
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--paths", nargs="+", default=["local", "stock", "native", "native-memory"],
                    choices=("local", "stock", "native", "native-memory"))
    ap.add_argument("--out", default="/tmp/kumiki-bench/paths")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    rows = []
    for path in a.paths:
        cfg = config(a.mode, out, f"{a.mode}-{path}")
        shutil.rmtree(cfg.run_dir(), ignore_errors=True)
        t0 = time.perf_counter()
        if path.startswith("native"):
            s = run_native(cfg, out, "memory" if path == "native-memory" else "file")
        else:
            s = run_engine(cfg, local.Tuning() if path == "local" else local.Tuning.stock())
        wall = time.perf_counter() - t0
        rows.append((path, s["time"]["per_round_s"], wall, s["status"]))
        print(f"{path}: {s['time']['per_round_s']:.2f} s/round, {wall:.1f} s with start-up, status {s['status']}",
              flush=True)
    base = next((r[1] for r in rows if r[0] == "local"), rows[0][1])
    load = os.getloadavg()
    what = "digits, MLP, 2 sites, 3 rounds" if a.mode == "quick" else "deploy/pilot.toml, 3 rounds"
    print(f"\n{a.mode} mode ({what}); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs\n")
    print("| path | s / round | × local | wall s (with start-up) | status |")
    print("|---|---|---|---|---|")
    names = {"local": "`--engine local` (fast path)", "stock": "`--engine local`, `Tuning.stock()` (Flower as shipped)",
             "native": "`deploy/native.py` (Flower-native commands + fast path; SuperLink state in SQLite)",
             "native-memory": "`deploy/native.py --state memory` (the same, SuperLink state in memory)"}
    for path, per, wall, status in rows:
        print(f"| {names[path] if a.markdown else path} | {per:.2f} | {per / base:.2f} | {wall:.1f} | {status} |")


if __name__ == "__main__":
    main()
