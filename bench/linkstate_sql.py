"""Where the SuperLink's SQLite link state spends its SQL (issue 26 item 2): statements per call, per poll, per message.

    PYTHONPATH=. .venv/bin/python bench/linkstate_sql.py [--mode quick|full] [--write]

The pilot (``deploy/pilot.toml``: 1 round in quick mode, 2 in full, small sites) runs on the real local engine three
times: the SuperLink's state in Flower's SQLite link state (``--database`` as compose keeps it, with
``KUMIKI_SUPERLINK_MESSAGES=database``), with durable nodes only (``--database``, the default
``KUMIKI_SUPERLINK_MESSAGES=memory``: ``launch/fastpath.py`` superlink-nodes), and in memory (no ``--database``). The SuperLink runs through ``serve`` below: it counts, in that process, every call of a
link-state method (``SqlLinkState`` / ``InMemoryLinkState``), the SQL statements each call executes
(SQLAlchemy's ``before_cursor_execute`` on every engine, charged to the outermost link-state call of the thread)
and the seconds spent in it, and writes the totals to ``$KUMIKI_LINKSTATE_TRACE`` every second. Nothing of this
is in the product: the bench rewrites the SuperLink's command line only.

Reading: ``get_message_ins`` and ``acknowledge_node_heartbeat`` are what an idle SuperNode costs (one Fleet pull,
one heartbeat); the rest is per message. Messages per run: 2 per site per round (train, evaluate) plus the
profile query, each answered by a reply.
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

TRACE_ENV = "KUMIKI_LINKSTATE_TRACE"


# --------------------------------------------------------------------------- inside the SuperLink
def install_tracer(path: str) -> None:
    """Count link-state calls, their SQL statements and seconds; dump them to ``path`` every second."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    stats: dict[str, list[float]] = {}  # name -> [calls, statements, seconds]
    local = threading.local()
    lock = threading.Lock()

    @event.listens_for(Engine, "before_cursor_execute")
    def count(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        name = getattr(local, "name", None) or "(outside a link-state call)"
        with lock:
            stats.setdefault(name, [0, 0, 0.0])[1] += 1

    def wrap(cls: type, name: str) -> None:
        inner = getattr(cls, name)

        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            if getattr(local, "name", None):  # nested: charged to the outer call
                return inner(*args, **kwargs)
            local.name = name
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                local.name = None
                with lock:
                    s = stats.setdefault(name, [0, 0, 0.0])
                    s[0] += 1
                    s[2] += dt

        setattr(cls, name, call)

    import inspect

    for cls in (SqlLinkState, InMemoryLinkState):
        for name in dir(cls):  # inherited methods too (SqlCoreState: objects, tasks, traffic)
            if not name.startswith("_") and inspect.isfunction(inspect.getattr_static(cls, name)):
                wrap(cls, name)

    def dump() -> None:
        while True:
            time.sleep(1.0)
            with lock:
                text = json.dumps(stats)
            Path(path + ".tmp").write_text(text)
            os.replace(path + ".tmp", path)

    threading.Thread(target=dump, daemon=True, name="linkstate-trace").start()


def serve(argv: list[str]) -> None:
    """``fastpath.py superlink <argv>`` with the tracer installed first."""
    install_tracer(os.environ[TRACE_ENV])
    from launch import fastpath

    fastpath.main(["superlink", *argv])


# --------------------------------------------------------------------------- the bench
def config(sites: int, rounds: int, out: Path, name: str):
    from bench.common import pilot_config

    return pilot_config([
        f"run.rounds={rounds}", f'run.name="{name}"', f'run.output_dir="{out}"', f"data.sites={sites}",
        "data.unseen_sites=0", "data.site_names=[]", "data.samples_per_site=120", "server.discovery_timeout_s=300.0"])


#: variant -> (SuperLink --database?, KUMIKI_SUPERLINK_MESSAGES)
VARIANTS = {"sqlite": (True, "database"), "durable-nodes": (True, "memory"), "memory": (False, "memory")}


def measure(sites: int, rounds: int, variant: str, out: Path) -> tuple[dict, dict]:
    """One traced run: ({method: [calls, statements, seconds]}, summary.json)."""
    from launch.engines import local

    db, messages = VARIANTS[variant]
    trace = out / f"trace-{variant}.json"
    trace.unlink(missing_ok=True)
    orig_start = local._Cluster.start

    def start(self, name, args, env, pipe=False):  # type: ignore[no-untyped-def]
        if name == "superlink":
            i = args.index("superlink")
            args = [sys.executable, str(Path(__file__).resolve()), "serve", *args[i + 1:]]
            env = {**env, TRACE_ENV: str(trace), "PYTHONPATH": str(ROOT), "KUMIKI_SUPERLINK_MESSAGES": messages}
        return orig_start(self, name, args, env, pipe)

    local._Cluster.start = start
    try:
        cfg = config(sites, rounds, out, f"linkstate-{variant}")
        summary = local.run_local(cfg, quiet=True, overwrite=True, tuning=local.Tuning(superlink_db=db))
    finally:
        local._Cluster.start = orig_start
    return json.loads(trace.read_text()), summary


def table(runs: dict[str, dict]) -> str:
    sql, dur, mem = runs["sqlite"], runs["durable-nodes"], runs["memory"]
    lines = ["| link-state method | calls | SQL statements, Flower's SQLite state | per call | SQL statements, durable "
             "nodes | ms in it: SQLite / durable nodes / memory |", "|---|---:|---:|---:|---:|---|"]
    for name in sorted(set(sql) | set(dur), key=lambda n: -sql.get(n, [0, 0, 0])[1]):
        c, n, t = sql.get(name, [0, 0, 0.0])
        dc, dn, dt = dur.get(name, [0, 0, 0.0])
        mt = mem.get(name, [0, 0, 0.0])[2]
        lines.append(f"| `{name}` | {int(c or dc)} | {int(n)} | {n / c if c else 0:.1f} | {int(dn)} | "
                     f"{1000 * t:.0f} / {1000 * dt:.0f} / {1000 * mt:.0f} |")
    tot = {k: [sum(v[i] for v in r.values()) for i in range(3)] for k, r in runs.items()}
    lines.append(f"| **all** | {int(tot['sqlite'][0])} | {int(tot['sqlite'][1])} | "
                 f"{tot['sqlite'][1] / max(tot['sqlite'][0], 1):.1f} | {int(tot['durable-nodes'][1])} | "
                 f"{1000 * tot['sqlite'][2]:.0f} / {1000 * tot['durable-nodes'][2]:.0f} / {1000 * tot['memory'][2]:.0f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2:])
        return
    from bench.results import load, machine, publish, stamp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--out", default="/tmp/kumiki-bench-linkstate")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    rounds = 1 if args.mode == "quick" else 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    before = load()
    runs, walls, per_round = {}, {}, {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        runs[variant], summary = measure(args.sites, rounds, variant, out)
        walls[variant] = time.perf_counter() - t0
        per_round[variant] = summary["time"]["per_round_s"]
    text = table(runs)
    print(text)
    timing = ", ".join(f"{v} {walls[v]:.0f} s ({per_round[v]:.1f} s/round)" for v in VARIANTS)
    print(f"whole runs: {timing}", file=sys.stderr)
    if args.write:
        cmd = f"nice -n 10 env PYTHONPATH=. .venv/bin/python bench/linkstate_sql.py --mode {args.mode} --write"
        publish("linkstate-sql", "\n".join([
            "## The SuperLink's SQLite link state: SQL per poll and per message (issue 26 item 2)", "",
            f"{stamp(cmd)} Machine: {machine()}. Load average (1/5/15 min) {before} before, {load()} after.", "",
            f"Pilot, {args.sites} sites, {rounds} round(s), `--engine local`, three SuperLinks: Flower's SQLite link "
            "state (`--database`, `KUMIKI_SUPERLINK_MESSAGES=database`; message objects in memory), durable nodes "
            "(`--database` with the default `KUMIKI_SUPERLINK_MESSAGES=memory`: registrations in the file, the rest "
            "in memory, `launch/fastpath.py` superlink-nodes) and no `--database` (Flower's in-memory state). "
            "Every link-state call of the SuperLink counted with the SQL it executes and the seconds in it. "
            f"Whole runs, one after the other: {timing}.",
            "", text]))


if __name__ == "__main__":
    main()
