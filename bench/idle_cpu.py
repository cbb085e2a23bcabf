"""Idle CPU of a waiting ``--engine local`` federation (issue 26 item 3): CPU seconds of each process over a window.

    PYTHONPATH=. .venv/bin/python bench/idle_cpu.py [--mode quick|full] [--sites N] [--window S] [--write]

How the federation is made to wait: the pilot (``deploy/pilot.toml``, 1 round, tiny sites) starts on the real
local engine (TLS, authentication, the proxy where nginx is installed, every latency knob at its default); as
soon as its daemons are up, the last site's SuperExec is stopped (SIGSTOP; with Flower's own SuperNode, the
SuperExec it starts). That site's SuperNode stays up: it takes the ServerApp's profile query and waits for its
ClientApp's reply, which does not come, as it would for a slow site's training; the ServerApp waits for that
reply. Every other process waits too:
the SuperLink, the other sites' SuperNodes (polling the SuperLink for messages) and SuperExecs (polling their
SuperNode for tasks), the ServerApp's SuperExec. After ``--settle`` seconds, and once the ServerApp is up and no
site has run a ClientApp for 5 s (the profile replies are done), each process's CPU time (utime +
stime of every process in its group, from ``/proc/<pid>/stat``) is read at the start and at the end of the
window; the ServerApp (a fork of its SuperExec, its PID in ``<run_dir>/.serverapp.pid``) is counted apart
from its parent. Then the stopped site continues and the run ends normally.

The figure is the share of one core: CPU seconds / window seconds. Each variant is measured in turn in the same
run: Kumiki's fast path with long polling off (``Tuning(long_poll_s=None)``: every wait a fixed poll) and on (the
default, ``launch/fastpath.py`` superlink-wait / supernode-wait); ``--stock`` adds Flower 1.41 as shipped
(``Tuning.stock()``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import load, machine, publish, stamp  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
GOAL_SUPERNODE = 0.01  # of one core
#: what the table says (written under it; the figures it names are from the run in bench/RESULTS.md)
NOTE = "Reading: with long polling a SuperNode waiting for a message asks the SuperLink once per hold (5 s) instead of every 0.3 s, and its SuperExec asks the SuperNode once per hold instead of every 0.15 s; a message or a task still arrives at once (a hold ends on the event that fills it). The whole waiting federation then costs less than Flower as shipped, which polls slowly (its SuperNode sleeps a fixed 3 s between empty pulls, with no setting for it; its SuperExec polls every 1 s, HttpGrid every 3 s) and pays for it in latency at every hop (bench/paths.py). The holds sit in the Fleet API's handlers, which both of Flower's Fleet transports call (HTTP, the default here, and gRPC-rere)."


def cpu_s(pid: int) -> float | None:
    """utime + stime of one process, in seconds (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5), after "pid (comm)"


def group_members(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # field 5: the process group
            out.append(int(d))
    return out


def config(sites: int, out: Path, name: str):
    from bench.common import pilot_config

    return pilot_config([
        "run.rounds=1", f'run.name="{name}"', f'run.output_dir="{out}"', f"data.sites={sites}",
        "data.unseen_sites=0", "data.site_names=[]", "data.samples_per_site=120",
        "server.discovery_timeout_s=600.0", "server.round_timeout_s=600"])


def variants(stock: bool) -> dict:
    """The tunings measured: long polling off (Kumiki's fast path before it), on (the default), Flower as shipped."""
    from launch.engines import local

    out = {"polling (long polling off)": local.Tuning(long_poll_s=None), "long polling (default)": local.Tuning()}
    if stock:
        out["Flower 1.41 as shipped"] = local.Tuning.stock()
    return out


def measure(sites: int, window_s: float, settle_s: float, tuning, out: Path) -> tuple[dict, float, bool]:
    """One waiting federation: ({process name: share of one core over the window}, window s, ServerApp found)."""
    from launch.engines import local
    from server.lifecycle import PID_FILE

    cfg = config(sites, out, f"idle-{sites}")
    stock_nodes = not tuning.warm_superexec  # Flower's SuperNode starts its SuperExec itself, in its own group
    started: list[int] = []
    up = threading.Event()
    # the cluster's processes, by name, read after start-up from the engine's own records
    names: dict[int, str] = {}

    def on_start(pids: list[int]) -> None:
        started.extend(pids)
        up.set()

    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = local.run_local(cfg, quiet=True, overwrite=True, tuning=tuning, on_start=on_start)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e
            up.set()

    orig_start = local._Cluster.start

    def start(self, name, args, env, pipe=False):  # type: ignore[no-untyped-def]
        proc = orig_start(self, name, args, env, pipe)
        names[proc.popen.pid] = name
        return proc

    local._Cluster.start = start  # only to learn which PID is which process
    t = threading.Thread(target=run, daemon=True)
    t.start()
    up.wait(600)
    if "error" in result:
        raise result["error"]
    site = sorted(n for n in list(names.values()) if n.startswith("supernode-"))[-1].removeprefix("supernode-")
    node_group = next(p for p, n in list(names.items()) if n == f"supernode-{site}")
    # the last site's SuperExec (Flower's own SuperNode: its SuperExec child) stops: its SuperNode stays up and
    # heartbeating, takes the ServerApp's message and waits for a ClientApp reply that does not come
    stopped = ([p for p in group_members(node_group) if p != node_group] if stock_nodes
               else [p for g, n in list(names.items()) if n == f"superexec-{site}" for p in group_members(g)])
    for p in stopped:
        os.kill(p, signal.SIGSTOP)
    try:
        time.sleep(settle_s)
        pid_file = cfg.run_dir() / PID_FILE
        # quiet = the ServerApp is up and no other site runs a ClientApp (a SuperExec's group is the SuperExec
        # alone; with Flower's own SuperNode, its SuperExec child is the group's second member) for 5 s in a row
        calm, deadline = 0, time.monotonic() + 300
        while calm < 5 and time.monotonic() < deadline:
            busy = any(len(group_members(p)) > (2 if stock_nodes else 1) for p, n in list(names.items())
                       if site not in n and n.startswith("supernode-" if stock_nodes else "superexec-")
                       and n != "superexec-serverapp")
            calm = calm + 1 if pid_file.is_file() and not busy else 0
            time.sleep(1.0)
        serverapp = int(pid_file.read_text().split()[0]) if pid_file.is_file() else None

        def snapshot() -> dict[str, float]:
            shot: dict[str, float] = {}
            for pgid, name in list(names.items()):
                for pid in group_members(pgid):
                    if pid in stopped:
                        continue
                    key = ("serverapp" if pid == serverapp else
                           f"supernode-waiting-{site}" if name == f"supernode-{site}" else name)
                    shot[key] = shot.get(key, 0.0) + (cpu_s(pid) or 0.0)
            shot["launcher (this process)"] = time.process_time()
            return shot

        a, t0 = snapshot(), time.monotonic()
        time.sleep(window_s)
        b, dt = snapshot(), time.monotonic() - t0
    finally:
        for p in stopped:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
        local._Cluster.start = orig_start
    t.join(900)
    if "error" in result:
        raise result["error"]
    return {k: (b[k] - a.get(k, 0.0)) / dt for k in b}, dt, serverapp is not None


def role(name: str) -> str:
    for prefix, r in (("supernode-waiting-", "SuperNode waiting for its ClientApp's reply"),
                      ("supernode-", "SuperNode waiting for a message"), ("superexec-serverapp", "SuperExec (ServerApp's)"),
                      ("superexec-", "SuperExec (site's)")):
        if name.startswith(prefix):
            return r
    return {"superlink": "SuperLink", "serverapp": "ServerApp", "flwr-run": "`flwr run --stream` (operator CLI)",
            "proxy": "proxy (nginx)", "reaper": "reaper"}.get(name, name)


def table(rows: dict[str, dict[str, float]]) -> str:
    """Share of one core per role (sites: the mean per waiting site), one column per measured variant."""
    variants = list(rows)
    per_role: dict[str, dict[str, list[float]]] = {}
    for v, shares in rows.items():
        for name, share in shares.items():
            per_role.setdefault(role(name), {}).setdefault(v, []).append(share)
    order = ["SuperLink", "SuperNode waiting for a message", "SuperNode waiting for its ClientApp's reply",
             "SuperExec (site's)", "SuperExec (ServerApp's)", "ServerApp",
             "`flwr run --stream` (operator CLI)", "proxy (nginx)", "reaper", "launcher (this process)"]
    lines = ["| process | " + " | ".join(f"{v} (% of a core)" for v in variants) + " |",
             "|---|" + "---:|" * len(variants)]
    for r in sorted(per_role, key=lambda r: order.index(r) if r in order else 99):
        cells = []
        for v in variants:
            vals = per_role[r].get(v)
            cells.append("—" if not vals else f"{100 * sum(vals) / len(vals):.2f}"
                         + (f" (each of {len(vals)})" if len(vals) > 1 else ""))
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    totals = [f"{100 * sum(rows[v].values()):.1f}" for v in variants]
    lines.append("| **all processes** | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--sites", type=int, default=None, help="sites (the last one's SuperExec is stopped); default 3")
    ap.add_argument("--window", type=float, default=None, help="seconds measured (quick 10, full 45)")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds between start-up and the window")
    ap.add_argument("--stock", action="store_true", help="also measure Flower 1.41 as shipped (Tuning.stock())")
    ap.add_argument("--out", default="/tmp/kumiki-bench-idle")
    ap.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md")
    args = ap.parse_args()
    sites = args.sites or 3
    window = args.window or (10.0 if args.mode == "quick" else 45.0)
    before = load()
    rows: dict[str, dict[str, float]] = {}
    for variant, tuning in variants(args.stock).items():
        shares, dt, saw = measure(sites, window, args.settle, tuning, Path(args.out))
        rows[variant] = shares
        print(f"{variant}: {dt:.1f}s window, ServerApp {'found' if saw else 'NOT found'}", file=sys.stderr)
    text = table(rows)
    print(text)
    if args.write:
        cmd = (f"nice -n 10 env PYTHONPATH=. .venv/bin/python bench/idle_cpu.py --mode {args.mode}"
               + (" --stock" if args.stock else "") + " --write")
        sn = [v for k, v in rows["long polling (default)"].items() if k.startswith("supernode-")]
        ok = bool(sn) and max(sn) < GOAL_SUPERNODE
        publish("idle-cpu", "\n".join([
            "## Idle CPU of a waiting federation (issue 26 item 3)", "",
            f"{stamp(cmd)} Machine: {machine()}. Load average (1/5/15 min) {before} before, {load()} after.", "",
            f"{sites} sites on `--engine local` (TLS, authentication), the last one's SuperExec stopped (SIGSTOP) so "
            f"that site's SuperNode waits for its ClientApp's reply and the ServerApp for the site's; CPU time of each process over a {window:.0f} s window "
            "(utime + stime of its process group, `/proc/<pid>/stat`), as a share of one core.", "",
            text, "",
            f"Goal: a waiting SuperNode below {100 * GOAL_SUPERNODE:.0f} % of a core: "
            f"{'**met**' if ok else '**not met**'} (highest site {100 * max(sn or [0]):.2f} %).", "",
            NOTE,
        ]))


if __name__ == "__main__":
    main()
