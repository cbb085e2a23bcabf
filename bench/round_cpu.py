"""Where a ``--engine local`` round's CPU goes (issue 26 item 5): CPU seconds of every process per steady round.

    PYTHONPATH=. .venv/bin/python bench/round_cpu.py [--workload pilot|pilot-1m] [--sites N] [--rounds R]
                                                     [--engines inprocess local]

``bench/overhead.py`` says how much longer a round on real processes takes than the same sites' compute; this
says what the extra seconds are spent on, on a machine whose cores the sites share. It runs
``bench/overhead.py``'s workload on the local engine (TLS, authentication, long polling: every default) and
samples, every 0.25 s, the CPU time (utime + stime + the reaped children's cutime + cstime, ``/proc/<pid>/stat``)
of every process the engine started, by process group, and the machine's busy CPU (``/proc/stat``). A round ends
when its line lands in metrics.jsonl; the figures are the CPU seconds between the end of round 1 and the end of
the last round but one (the steady rounds, that only train), per round:

* the sites' SuperExecs: the ClientApps they fork (Kumiki's training, its data loading and state writes, and the
  ClientApp's side of Flower: reading the message, SHA-256 of every object, (de)serialization, pushes and pulls);
* the SuperNodes, the SuperLink, the ServerApp's SuperExec (the ServerApp: aggregation, the server's side of the
  messages), the proxy and this launcher;
* the sites' own training seconds (``fit_s`` in metrics.jsonl, wall time under this load).

The in-process engine's run (``--engines inprocess local``, the default: both, one after the other) is the same
sites' compute in this one process with no transport: the difference between the two columns' CPU is what the
real processes add. With C cores, a round cannot take less than (all CPU seconds in it) / C: the floor the
framework's CPU leaves.
Nothing here is a test: it prints a table (and ``--json`` the raw figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import omp_threads  # noqa: E402
from bench.results import load, machine  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> tuple[int, float] | None:
    """(process group, utime + stime + cutime + cstime in seconds) of one process; None once it is gone."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(f[2]), sum(int(x) for x in f[11:15]) / TICK  # stat(5) fields 5 (pgrp) and 14-17, after "pid (comm)"


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (every process, ours and the others')."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / TICK  # all but idle and iowait


def by_group(groups: dict[int, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            got = proc_cpu(int(d))
            if got and got[0] in groups:
                out[groups[got[0]]] = out.get(groups[got[0]], 0.0) + got[1]
    return out


def role(name: str) -> str:
    if name.startswith("superexec-serverapp"):
        return "ServerApp + its SuperExec"
    for prefix, r in (("superexec-", "sites' SuperExecs + their ClientApps"), ("supernode-", "SuperNodes")):
        if name.startswith(prefix):
            return r
    return {"superlink": "SuperLink", "proxy": "proxy (nginx)", "flwr-run": "`flwr run --stream`"}.get(name, name)


def measure(workload: str, sites: int, rounds: int, out: Path, engine: str = "local") -> dict:
    """CPU per steady round of every process of one run: ``local`` (real processes) or ``inprocess`` (this process
    alone, one thread: the sites' compute without any transport, ``bench/overhead.py``'s reference)."""
    from bench.overhead import config
    from launch.engines import local, run

    cfg = config(workload, sites, rounds, out, f"cpu-{workload}-{sites}-{engine}")
    names: dict[int, str] = {}
    orig = local._Cluster.start

    def start(self, name, args, env, pipe=False):  # type: ignore[no-untyped-def]
        proc = orig(self, name, args, env, pipe)
        names[proc.popen.pid] = name  # each process leads its own group
        return proc

    samples: list[tuple[float, int, dict[str, float], float, float]] = []
    done = threading.Event()
    metrics = cfg.run_dir() / "metrics.jsonl"

    def sample() -> None:
        while not done.is_set():
            try:
                lines = sum(1 for x in metrics.read_text().splitlines() if '"kind": "round"' in x)
            except OSError:
                lines = 0
            samples.append((time.monotonic(), lines, by_group(dict(names)) if names else {}, machine_busy(),
                            time.process_time()))
            done.wait(0.25)

    local._Cluster.start = start
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        if engine == "local":
            with omp_threads(None):
                summary = local.run_local(cfg, quiet=True, overwrite=True)
        else:
            with omp_threads("1"):
                summary = run(cfg, "inprocess", quiet=True, overwrite=True)
    finally:
        done.set()
        t.join()
        local._Cluster.start = orig
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if '"kind": "round"' in x]
    first = next(s for s in samples if s[1] >= 1)  # round 1 just ended
    last = next(s for s in samples if s[1] >= rounds - 1)  # the last steady round just ended
    n = rounds - 2
    if n < 1:
        raise SystemExit("--rounds must be at least 3 (round 1 and the last are not steady)")
    per: dict[str, float] = {}
    for name in set(first[2]) | set(last[2]):
        per[role(name)] = per.get(role(name), 0.0) + (last[2].get(name, 0.0) - first[2].get(name, 0.0)) / n
    per["in-process engine (this process)" if engine == "inprocess" else "launcher (this process)"] = \
        (last[4] - first[4]) / n
    steady = rows[1:rounds - 1]
    return {"workload": workload, "sites": sites, "engine": engine, "status": summary["status"], "rounds": n,
            "wall_per_round_s": (last[0] - first[0]) / n,
            "round_s": [r["time"]["round_s"] for r in steady],
            "fit_s_per_round": sum(sum(t["fit_s"] or 0 for t in r["time"]["sites"].values()) for r in steady) / n,
            "cpu_per_round_s": per, "ours_per_round_s": sum(per.values()),
            "machine_busy_per_round_s": (last[3] - first[3]) / n}


def render(runs: list[dict], cores: int, load0: str, load1: str) -> str:
    """One column per run (the in-process reference first), one row per process."""
    r0 = runs[0]
    lines = [f"`bench/round_cpu.py --workload {r0['workload']} --sites {r0['sites']}`: "
             + "; ".join(f"{r['engine']}: {r['rounds']} steady round(s), {r['wall_per_round_s']:.2f} s each "
                         f"(ServerApp: {', '.join(f'{x:.2f}' for x in r['round_s'])} s)" for r in runs)
             + f". Machine: {machine()}. Load average {load0} at the start, {load1} at the end.", "",
             "| CPU s per steady round | " + " | ".join(f"`{r['engine']}`" for r in runs) + " |",
             "|---|" + "---:|" * len(runs)]
    keys: list[str] = []
    for r in runs:
        keys += [k for k, _ in sorted(r["cpu_per_round_s"].items(), key=lambda kv: -kv[1]) if k not in keys]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{r['cpu_per_round_s'][k]:.2f}" if k in r["cpu_per_round_s"]
                                               else "–" for r in runs) + " |")
    lines += ["| **this run, all its processes** | " + " | ".join(f"**{r['ours_per_round_s']:.2f}**" for r in runs)
              + " |",
              "| the sites' training (`fit_s`: wall seconds, summed over sites) | "
              + " | ".join(f"{r['fit_s_per_round']:.2f}" for r in runs) + " |",
              "| the whole machine, busy (this run and everyone else's) | "
              + " | ".join(f"{r['machine_busy_per_round_s']:.2f}" for r in runs) + " |",
              f"| floor: this run's CPU / the cores it can use ({cores}; in-process: its 1 thread), s per round | "
              + " | ".join(f"{r['ours_per_round_s'] / (1 if r['engine'] == 'inprocess' else cores):.2f}"
                           for r in runs) + " |",
              "| measured s per round | " + " | ".join(f"{r['wall_per_round_s']:.2f}" for r in runs) + " |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=("pilot", "pilot-1m"), default="pilot")
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--engines", nargs="+", choices=("inprocess", "local"), default=["inprocess", "local"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/kumiki-bench/round-cpu"))
    ap.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    a = ap.parse_args(argv)
    from client.threads import usable_cores

    load0 = load()
    runs = [measure(a.workload, a.sites, a.rounds, a.out, e) for e in a.engines]
    text = render(runs, usable_cores(), load0, load())
    print(text)
    if a.json:
        a.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
