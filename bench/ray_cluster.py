"""The 1,000-site run on a Ray cluster (issue 13 part 7, "past one machine"): what can be verified on one machine.

    PYTHONPATH=. .venv/bin/python bench/ray_cluster.py [--sites 1000] [--rounds 2] [--write]

Starts a Ray cluster the way a multi-machine one starts (``ray start --head``, here on 127.0.0.1 with its own
port and temp dir, so it cannot meet anyone else's Ray), runs ``bench/scale.py``'s config on Kumiki's
simulation engine with ``KUMIKI_RAY_ADDRESS`` naming that cluster (Ray refuses to start a second instance
and a wrong address fails the run, so a finished run ran on the cluster), then stops exactly the processes
it started. Another machine would join with ``ray start --address=HEAD:PORT``; that step needs a second
machine and is not taken here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours(marker: str) -> list[int]:
    """PIDs whose command line names our Ray temp dir (the processes ``ray start`` spawned for us)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return [p for p in pids if p != os.getpid()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--write", action="store_true", help="write the result into bench/RESULTS.md (ray markers)")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="kumiki-ray-"))
    tmp = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))  # Ray's socket paths must stay short
    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             f"--num-cpus={os.cpu_count() or 2}", "--include-dashboard=false", f"--temp-dir={tmp}",
                             "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    result: dict = {}
    try:
        time.sleep(15)  # the head's GCS and raylet come up
        if head.poll() is not None:
            raise RuntimeError(f"ray start failed: {head.stderr.read().decode()[-500:]}")
        from bench.results import load
        from bench.scale import config
        from launch.engines import run

        os.environ.update({"KUMIKI_RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"})
        cfg = config(args.sites, args.rounds, out, name="ray")
        before, t0 = load(), time.perf_counter()
        summary = run(cfg, "simulation", quiet=True)
        rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
        rounds = [r for r in rows if r["kind"] == "round"]
        result = {"status": summary["status"], "sites": args.sites, "rounds": len(rounds),
                  "round_s": [round(r["time"]["round_s"], 1) for r in rounds],
                  "accepted": [r["sites"]["accepted"] for r in rounds],
                  "evaluated": [len(r["sites"]["evaluated"]) for r in rounds],
                  "wall_s": round(time.perf_counter() - t0, 1), "load": (before, load())}
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the process group of the `ray start` we launched
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        time.sleep(3)
        for pid in ours(str(tmp)):  # anything it spawned outside its group, found by our own temp dir
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
    print(json.dumps(result))
    if args.write and result:
        from bench.results import publish

        when = time.strftime("%Y-%m-%d %H:%M")
        line = (f"- **Ray cluster (verified on this machine, {when}): {result['status']}**: `bench/ray_cluster.py "
                f"--sites {args.sites} --rounds {args.rounds}` started a Ray head (`ray start --head`, 127.0.0.1) and "
                f"ran the same config on `--engine simulation` with `KUMIKI_RAY_ADDRESS` naming it: "
                f"{result['rounds']} rounds, {', '.join(map(str, result['accepted']))} updates accepted and "
                f"{', '.join(map(str, result['evaluated']))} sites evaluated per round, "
                f"{', '.join(map(str, result['round_s']))} s per round on the same 2 cores (load {result['load'][0]} "
                f"→ {result['load'][1]}). A second machine joining (`ray start --address`) was not tried: there is "
                f"none here.")
        publish("ray", line)
    return 0 if result.get("status") == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
