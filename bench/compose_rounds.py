"""The containerized pilot's seconds per round beside `--engine local`, and the SuperLink's link state in
containers: SQLite (the runbook's default, registrations survive a restart) against Flower's in-memory state.

    python bench/compose_rounds.py              # 5 rounds each; writes the compose-rounds section of bench/RESULTS.md
    python bench/compose_rounds.py --rounds 3 --no-publish

One run, on this machine, side by side (the machine is shared: read the ratios): deploy/factories.toml
(three factories, the runbook's rehearsal data from `deploy/native.py demo-data`) on

  compose, SQLite     the runbook's deployment (deploy/compose_test.py's steps: images, certs, server, register,
                      three factory projects), KUMIKI_SUPERLINK_DATABASE=state/superlink.db
  compose, in-memory  the same with KUMIKI_SUPERLINK_DATABASE=:flwr-in-memory: (registrations do not survive a
                      restart of the SuperLink: the factories are registered again)
  local engine        `kumiki run --engine local`: the same config and data as plain processes on 127.0.0.1

Needs a Docker engine with Compose v2 (../shared/tools/docker-engine.sh).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import load, machine, publish, stamp  # noqa: E402


def _compose_test():
    spec = importlib.util.spec_from_file_location("kumiki_compose_test", ROOT / "deploy" / "compose_test.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kumiki_compose_test"] = mod
    spec.loader.exec_module(mod)
    return mod


def compose_run(ct, r, state: str, rounds: int) -> dict:
    database = {"sqlite": "state/superlink.db", "memory": ":flwr-in-memory:"}[state]
    base_env = r.server_env
    r.server_env = lambda: {**base_env(), "KUMIKI_SUPERLINK_DATABASE": database}
    try:
        r.step(f"server ({state})", r.server_up)
        r.step(f"register ({state})", r.register)
        r.step(f"factories ({state})", r.factories_up)
        name = f"bench-compose-{state}"
        t0 = time.monotonic()
        r.kumiki("submit", "deploy/factories.toml", "kumiki", "--set", f"run.name='{name}'", "--set",
                 f"run.rounds={rounds}", "--timeout-s", str(r.a.run_timeout), timeout=r.a.run_timeout + 60)
        wall = time.monotonic() - t0
        summary = json.loads((r.work / "runs" / name / "summary.json").read_text())
        return {"per_round_s": summary["time"]["per_round_s"], "wall_s": wall, "status": summary["status"]}
    finally:
        r.step(f"teardown ({state})", r.teardown_projects)
        r.server_env = base_env


def local_run(r, rounds: int) -> dict:
    sites = r.work / "local-sites"
    sites.mkdir(exist_ok=True)
    for i, site in enumerate(("factory-a", "factory-b", "factory-c")):
        link = sites / f"site-{i}"
        if not link.exists():
            link.symlink_to(r.work / "data" / site / "data")
    t0 = time.monotonic()
    out = r.work / "local-runs"
    subprocess.run([str(Path(sys.executable).parent / "kumiki"), "run", "deploy/factories.toml", "--engine", "local",
                    "--set", f"data.path='{sites}'", "--set", f"run.output_dir='{out}'", "--set",
                    "run.name='bench-local'", "--set", f"run.rounds={rounds}"], cwd=ROOT, check=True, timeout=1800,
                   stdin=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    summary = json.loads((out / "bench-local" / "summary.json").read_text())
    return {"per_round_s": summary["time"]["per_round_s"], "wall_s": wall, "status": summary["status"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-publish", action="store_true", help="print the table, do not write bench/RESULTS.md")
    ap.add_argument("--up-timeout", type=int, default=None,
                    help="compose_test.py's --up-timeout (a loaded machine needs more than its default)")
    a = ap.parse_args(argv)
    command = "python bench/compose_rounds.py " + " ".join(sys.argv[1:] if argv is None else argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    ct = _compose_test()
    args = ct.parser().parse_args(["--prefix", "kumiki-bench",
                                   *(["--up-timeout", str(a.up_timeout)] if a.up_timeout else [])])
    r = ct.Runner(args)
    before = load()
    rows = {}
    try:
        r.step("preflight", r.preflight)
        r.step("images", r.images)
        r.step("certs", r.certs)
        r.step("data", r.data)
        rows["compose, SQLite link state"] = compose_run(ct, r, "sqlite", a.rounds)
        rows["compose, in-memory link state"] = compose_run(ct, r, "memory", a.rounds)
        rows["--engine local (processes)"] = r.step_value("local", local_run, r, a.rounds)
    finally:
        r.teardown_projects()
        r.summary(bool(rows))
    sql, mem = rows["compose, SQLite link state"], rows["compose, in-memory link state"]
    loc = rows["--engine local (processes)"]
    lines = [
        "### The containerized pilot: seconds per round (compose vs `--engine local`, SQLite vs in-memory link state)",
        "",
        f"{stamp(command.strip())} Commit {commit}. {machine()}; Docker "
        f"({r.times[0][2]}); load (1/5/15 min) before {before}, after {load()}.",
        f"deploy/factories.toml ({a.rounds} rounds, 3 factories, the runbook's rehearsal data); each compose row is "
        "the runbook's deployment (4 compose projects, TLS, SuperNode authentication, the fast path).",
        "",
        "| path | s per round | x local | wall s (submit to status) | status |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['per_round_s']:.2f} | {row['per_round_s'] / loc['per_round_s']:.2f} | "
                     f"{row['wall_s']:.0f} | {row['status']} |")
    lines += ["", f"SQLite link state costs {sql['per_round_s'] - mem['per_round_s']:+.2f} s per round against "
              f"in-memory ({sql['per_round_s'] / mem['per_round_s']:.2f}x); the runbook keeps SQLite, since the "
              "in-memory state forgets every registration when the SuperLink restarts."]
    text = "\n".join(lines)
    print("\n" + text)
    if not a.no_publish:
        publish("compose-rounds", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
