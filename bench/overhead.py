"""Framework overhead per round (issue 13 part 3), side by side with Flower as shipped.

    .venv/bin/python bench/overhead.py --mode quick [--write]   # pilot workload, 3 sites, ~5 min
    .venv/bin/python bench/overhead.py --mode full  [--write]   # + 10 sites, ~1M-parameter model, ~30 min
    # issue 26 item 5 on a quiet machine (~15 min): every engine, Flower as shipped and long polling off at 3 sites
    .venv/bin/python bench/overhead.py --mode full --engines inprocess simulation local stock polling \
        --compare-sites 3 --write

overhead = (round wall time - the slowest site's compute) / round wall time

The round wall time is the ServerApp's own (``time.round_s`` in metrics.jsonl: its messages, aggregation and
any evaluation sent in it); the slowest site's compute is what the sites report for their messages
(``fit-time-s`` + ``eval-time-s``: the ClientApp's work, data loading and state writes included), the
slowest per exchange, summed over the round's exchanges (``time.site_compute_s``). The rest is the framework:
transport, polling, process start-up, serialization, the server's own work.

Workloads: the pilot config (``deploy/pilot.toml`` with FedAvg-FT, ``bench.common.PILOT_MEASURED``;
Fashion-MNIST, CNN-S with 0.42M parameters, 600 images per factory) at 3 and 10 training factories, and the
same with a ~1M-parameter CNN (hidden 320; full mode). Engines: ``simulation`` (Flower's, on Ray), ``local`` (real SuperLink and SuperNodes with TLS and
authentication, Kumiki's fast path), and ``local`` with ``Tuning.stock()`` (Flower 1.41 as shipped, which is
what compose and the Flower-native commands run without the fast path); on request (``--engines``), ``polling``:
the fast path with long polling off (``Tuning(long_poll_s=None)``, its fixed polls before issue 26 item 3).
Steady state: the median of the rounds between the first (start-up) and the last (the whole test split and a
separate evaluate message). Goals: overhead at most 10 % at 10 sites; Kumiki's round at most 1/5 of Flower as
shipped; ``--engine local`` within 1.3x of the in-process engine at 10 sites (1.1x with the ~1M model, issue 26).

With more sites than cores, the slowest site's compute is not what bounds a round: the sites queue for the
cores (the simulation engine runs as many at once as there are cores; the local engine runs them all, and
each one's compute stretches while it waits). So a second figure: the compute bound, the in-process engine's
round (no transport, the sites take turns with one thread each: their summed compute) divided by
min(cores, sites), and the overhead against it, 1 - bound / round.

``--write`` puts the section between the ``overhead`` markers of bench/RESULTS.md and refreshes the docs'
copies of it (``docs/gen.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import omp_threads  # noqa: E402
from bench.results import load, machine, median, run_rows, stamp, verdict, publish  # noqa: E402

GOAL_OVERHEAD = 0.10
GOAL_STOCK = 1 / 5
#: issue 26: ``--engine local``'s steady round within this many times the in-process engine's at 10 sites
GOAL_LOCAL = {"pilot": 1.3, "pilot-1m": 1.1}
WORKLOADS = {"pilot": 128, "pilot-1m": 320}  # CNN hidden units: 0.42M and 1.02M parameters
ENGINES = ("inprocess", "simulation", "local", "stock", "polling")
#: what ``--mode`` runs unless ``--engines`` says: ``polling`` (the fast path with long polling off, as before
#: issue 26 item 3) only when asked, for the latency table of ``--engines local polling stock``
DEFAULT_ENGINES = ("inprocess", "simulation", "local", "stock")


def config(workload: str, sites: int, rounds: int, out: Path, name: str):
    from bench.common import pilot_config

    return pilot_config([
        f"run.rounds={rounds}", f'run.name="{name}"', f'run.output_dir="{out}"', f"data.sites={sites}",
        "data.unseen_sites=0", "data.site_names=[]", f"model.hidden={WORKLOADS[workload]}",
        "server.discovery_timeout_s=300.0"])


def measure(workload: str, sites: int, engine: str, rounds: int, out: Path) -> dict:
    from launch.engines import local

    cfg = config(workload, sites, rounds, out, f"{workload}-{sites}-{engine}")
    t0 = time.perf_counter()
    kw = ({"tuning": local.Tuning.stock()} if engine == "stock"
          else {"tuning": local.Tuning(long_poll_s=None)} if engine == "polling" else {})
    # the compute reference: one thread, the sites in turn; every other engine its own setting (client/threads.py)
    with omp_threads("1" if engine == "inprocess" else None):
        summary, rows, _ = run_rows(cfg, "local" if engine in ("stock", "polling") else engine, **kw)
    wall = time.perf_counter() - t0
    per = [{"round_s": r["time"]["round_s"], "compute_s": r["time"]["site_compute_s"]} for r in rows]
    for p in per:
        p["overhead"] = (p["round_s"] - p["compute_s"]) / p["round_s"] if p["round_s"] else None
    # steady: the rounds between the first (start-up) and the last (the whole test split, a separate evaluate
    # message): with ``eval.every = "auto"`` the pilot evaluates every 5th round, so these only train
    later = per[1:-1] if len(per) >= 3 else (per[1:] or per)
    return {"workload": workload, "sites": sites, "engine": engine, "status": summary["status"], "wall_s": wall,
            "round1_s": per[0]["round_s"], "round1_overhead": per[0]["overhead"], "last_s": per[-1]["round_s"],
            "round_s": median([p["round_s"] for p in later]), "compute_s": median([p["compute_s"] for p in later]),
            "overhead": median([p["overhead"] for p in later]),
            "rounds": [[round(p["round_s"], 3), round(p["compute_s"], 3)] for p in per]}


def times(r: dict, ref: dict) -> str:
    base = ref.get((r["workload"], r["sites"]))
    return "1.00" if r["engine"] == "inprocess" else (f"{r['round_s'] / base:.2f}" if base else "–")


def render(command: str, results: list[dict], loads: list[str], rounds: int) -> str:
    from models import build_model

    from server.eval_plan import eval_every
    from server.federation import model_spec

    params = {w: sum(p.numel() for p in build_model(model_spec(config(w, 3, 1, Path("/tmp"), "x"))).parameters())
              for w in {r["workload"] for r in results}}
    names = {"inprocess": "in-process (no transport, sites in turn)", "simulation": "simulation (Ray)",
             "local": "`--engine local` (fast path)", "stock": "Flower 1.41 as shipped (`Tuning.stock()`)",
             "polling": "`--engine local`, long polling off (`Tuning(long_poll_s=None)`)"}
    lines = [f"{stamp(command)} Machine: {machine()}. Each run: the pilot config "
             f"(FedAvg-FT, Fashion-MNIST, 600 images per factory) with {rounds} rounds, no unseen site, "
             f"`eval.every = \"auto\"` (k = {eval_every(config('pilot', 3, rounds, Path('/tmp'), 'x'))}: the last round "
             "evaluates, and every k-th); every site on this one machine; steady = the median of the rounds between "
             "the first and the last. Load average at the start of each group of runs: " + "; ".join(loads)
             + " (the load average lags: a group that follows a 10-site run starts under that run's tail; "
               "a load well above the cores means other work shared them: read the ratios).", "",
             "| model | sites | engine | steady s/round | slowest site's compute s | overhead (issue's definition) | "
             "compute bound s | overhead against it | round 1 s | last round s (evaluates) | × in-process | "
             "× Flower as shipped |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    inproc = {(r["workload"], r["sites"]): r["round_s"] for r in results if r["engine"] == "inprocess"}
    stock = {(r["workload"], r["sites"]): r["round_s"] for r in results if r["engine"] == "stock"}
    for r in results:
        ref = stock.get((r["workload"], r["sites"]))
        x = f"{r['round_s'] / ref:.2f}" if ref and r["engine"] != "stock" else ("1.00" if ref else "–")
        bound = r.get("bound_s")
        own = "– (the reference)" if r["engine"] == "inprocess" else f"{100 * r['overhead']:.0f} %"
        lines.append(f"| {r['workload']} ({params[r['workload']] / 1e6:.2f}M) | {r['sites']} | {names[r['engine']]} | "
                     f"{r['round_s']:.2f} | {r['compute_s']:.2f} | {own} | "
                     + (f"{bound:.2f} | {100 * (1 - bound / r['round_s']):.0f} % | " if bound else "– | – | ")
                     + f"{r['round1_s']:.2f} | {r['last_s']:.2f} | {times(r, inproc)} | {x} |"
                     + ("" if r["status"] == "ok" else f" status {r['status']}"))
    lines.append("")
    big = [r for r in results if r["engine"] in ("simulation", "local") and r["sites"] == max(x["sites"] for x in results)]
    for r in big:
        lines.append(f"- Goal \"framework overhead at most 10 % at 10 sites\", {r['workload']}, {r['engine']}: "
                     f"{verdict(r['overhead'] <= GOAL_OVERHEAD) if r['sites'] >= 10 else 'n/a (quick mode: 3 sites)'}"
                     f" ({100 * r['overhead']:.0f} %).")
    for r in results:
        ref = inproc.get((r["workload"], r["sites"]))
        if r["engine"] == "local" and ref and r["sites"] >= 10:
            goal = GOAL_LOCAL[r["workload"]]
            lines.append(f"- Goal \"`--engine local` within {goal}× of the in-process engine at 10 sites\", "
                         f"{r['workload']}: {verdict(r['round_s'] <= goal * ref)} ({r['round_s']:.2f} s against "
                         f"{ref:.2f} s: {r['round_s'] / ref:.2f}×).")
    for r in results:
        ref = stock.get((r["workload"], r["sites"]))
        if r["engine"] == "local" and ref:
            lines.append(f"- Goal \"at most 1/5 of Flower as shipped\", {r['workload']}, {r['sites']} sites: "
                         f"{verdict(r['round_s'] <= GOAL_STOCK * ref)} ({r['round_s']:.2f} s against {ref:.2f} s: "
                         f"1/{ref / r['round_s']:.1f}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--sites", type=int, nargs="+", default=None)
    ap.add_argument("--workloads", nargs="+", default=None, choices=tuple(WORKLOADS))
    ap.add_argument("--engines", nargs="+", default=None, choices=ENGINES)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--compare-sites", type=int, nargs="+", default=None, metavar="N",
                    help="run the engines that are only compared with (stock: Flower as shipped, the slowest, ~8 min "
                         "a 10-site run; polling) at these site counts only; default: wherever --engines has them")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "kumiki-bench" / "overhead")
    ap.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md")
    a = ap.parse_args(argv)
    full = a.mode == "full"
    if a.sites or a.workloads:
        groups = [(w, n) for w in a.workloads or ["pilot"] for n in a.sites or [3]]
    else:  # full: the pilot at 3 and 10 sites, the ~1M model at 10 (the goal's size)
        groups = [("pilot", 3), ("pilot", 10), ("pilot-1m", 10)] if full else [("pilot", 3)]
    engines = a.engines or list(DEFAULT_ENGINES)
    rounds = a.rounds or 4  # two steady rounds between the first and the last
    results, loads = [], []
    for w, n in groups:
        loads.append(f"{w}, {n} sites: {load()}")
        for e in engines:
            if e in ("stock", "polling") and a.compare_sites is not None and n not in a.compare_sites:
                continue
            results.append(measure(w, n, e, rounds, a.out))
            print(json.dumps(results[-1]), flush=True)
    from client.threads import usable_cores

    ref = {(r["workload"], r["sites"]): r["round_s"] for r in results if r["engine"] == "inprocess"}
    for r in results:
        if (r["workload"], r["sites"]) in ref and r["engine"] != "inprocess":
            r["bound_s"] = ref[(r["workload"], r["sites"])] / min(usable_cores(), r["sites"])
    command = " ".join(["bench/overhead.py", *(sys.argv[1:] if argv is None else argv)])
    command = command if "--mode" in command else f"{command} --mode {a.mode}"
    text = render(command.replace(" --write", ""), results, loads + [f"end: {load()}"], rounds)
    print("\n" + text)
    if a.write:
        publish("overhead", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
