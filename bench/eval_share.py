"""One message per site per round (issue 13 part 2): the latency it saves, and each method's share of a round
spent evaluating.

    .venv/bin/python bench/eval_share.py --mode quick [--write]   # digits MLP, ~5 min
    .venv/bin/python bench/eval_share.py --mode full  [--write]   # the pilot config, ~30 min

* **Share spent evaluating** (in-process engine: no transport, the sites take turns, so a round's wall time is
  its sites' compute): every method on the same config with its own defaults, FedHB first; from metrics.jsonl,
  the seconds the sites spent evaluating (``eval_time_s``) over the rounds' wall time, and over the sites'
  whole compute. The same run with ``eval.in_train_reply = false`` (a separate evaluate message after every
  aggregation, as before) gives the in-process saving: one message fewer per site per round and, for FedAvg
  and FedProx, one evaluation pass instead of two. Each pair runs twice, in alternating order (one message,
  separate, separate, one message), and each figure is the mean of its two runs.
* **Latency saved per round on real processes** (``--engine local``: SuperLink, one SuperNode per site, TLS):
  the same config with the evaluation in the training reply and with a separate evaluate message, one after the
  other, also twice in alternating order. Steady state = the median round before the last (the last round
  sends its evaluate messages in both).

``--write`` puts the section between the ``eval-share`` markers of bench/RESULTS.md and refreshes the docs'
copies of it (``docs/gen.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import load, machine, median, run_rows, stamp, publish  # noqa: E402

METHODS = ("fedhb", "fedavg", "fedprox", "fedavg_ft", "ditto", "dualfed", "fedper", "fedrep", "floral", "local")


def config(mode: str, method: str, fused: bool, out: Path, name: str, every: int = 1):
    from kumiki.config import load_config

    sets = [f'method.name="{method}"', f'run.name="{name}"', f'run.output_dir="{out}"',
            f"eval.in_train_reply={'true' if fused else 'false'}", f"eval.every={every}"]
    if mode == "quick":
        sets += ["run.rounds=3", 'data.dataset="digits"', "data.sites=3", "data.unseen_sites=1",
                 "data.site_names=[]", "data.domains=[]", "data.samples_per_site=300", 'model.arch="mlp"',
                 "model.hidden=64"]
    else:
        sets += ["run.rounds=3"]
    return load_config(str(ROOT / "deploy" / "pilot.toml"), sets)


def mean_of(runs: list[dict]) -> dict:
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}


def shares(rounds: list[dict], sites: list[dict]) -> dict:
    wall = sum(r["time"]["round_s"] for r in rounds)
    ev = sum(s.get("eval_time_s") or 0.0 for s in sites)
    fit = sum(s.get("fit_time_s") or 0.0 for s in sites)
    return {"per_round_s": wall / len(rounds), "eval_of_round": ev / wall if wall else None,
            "eval_of_compute": ev / (ev + fit) if ev + fit else None}


def steady(rounds: list[dict]) -> float:
    return median([r["time"]["round_s"] for r in rounds[:-1]] or [rounds[-1]["time"]["round_s"]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--local-methods", nargs="+", default=None, help="methods timed on --engine local")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "kumiki-bench" / "eval-share")
    ap.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # in-process: one thread, as the tests and benchmarks use
    import torch

    torch.set_num_threads(1)
    full = a.mode == "full"
    methods = a.methods or (list(METHODS) if full else ["fedhb", "fedavg", "fedavg_ft"])
    local_methods = a.local_methods or (["fedhb", "fedavg_ft"] if full else ["fedavg"])
    load0 = load()

    rows = []
    for m in methods:
        runs: dict[bool, list] = {True: [], False: []}
        for fused in (True, False, False, True):  # alternating: load drifts over minutes on a shared machine
            runs[fused].append(run_rows(config(a.mode, m, fused, a.out, f"{m}-{'one' if fused else 'two'}"),
                                        "inprocess"))
        one, two = runs[True][0], runs[False][0]
        rows.append({"method": m, "one": mean_of([shares(r[1], r[2]) for r in runs[True]]),
                     "two": mean_of([shares(r[1], r[2]) for r in runs[False]]),
                     "same": one[0]["personalized"] == two[0]["personalized"] and one[0]["global"] == two[0]["global"]})
        print(json.dumps(rows[-1]), flush=True)
    every = None
    if "fedhb" in methods:
        ev = run_rows(config(a.mode, "fedhb", True, a.out, "fedhb-every2", every=2), "inprocess")
        every = shares(ev[1], ev[2])
    load1 = load()
    local_rows = []
    for m in local_methods:
        res: dict[bool, list] = {True: [], False: []}
        for fused in (True, False, False, True):
            s, r, _ = run_rows(config(a.mode, m, fused, a.out, f"{m}-local-{'one' if fused else 'two'}"), "local")
            res[fused].append({"per_round_s": s["time"]["per_round_s"], "steady_s": steady(r),
                               "ok": float(s["status"] == "ok")})
        local_rows.append({"method": m, **{("one" if k else "two"): mean_of(v) for k, v in res.items()}})
        print(json.dumps(local_rows[-1]), flush=True)
    text = render(a.mode, rows, every, local_rows, load0, load1, load())
    print("\n" + text)
    if a.write:
        publish("eval-share", text)
    return 0


def render(mode: str, rows, every, local_rows, load0, load1, load2) -> str:
    what = ("the pilot config (`deploy/pilot.toml`: Fashion-MNIST, CNN-S, 4 + 1 factories) with 3 rounds"
            if mode == "full" else "digits, MLP (hidden 64), 3 + 1 sites, 300 examples each, 3 rounds")
    lines = [f"{stamp(f'bench/eval_share.py --mode {mode}')} Machine: {machine()}; {what}, each method's own "
             f"defaults. Load average {load0} at the start, {load1} after the in-process runs, {load2} at the end "
             "(other engineers at work on the same 2 cores: read the ratios).", "",
             "**Share of a round spent evaluating** (in-process: the sites take turns, so the round's wall time is "
             "their compute), and what the evaluation in the training reply saves there:", "",
             "| method | evaluating, % of the round | % of the sites' compute | the same, separate evaluate "
             "(before) | s/round, one message | s/round, separate evaluate | saved | same metrics |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, t = r["one"], r["two"]
        saved = 1 - o["per_round_s"] / t["per_round_s"]
        lines.append(f"| {r['method']} | {100 * o['eval_of_round']:.0f} % | {100 * o['eval_of_compute']:.0f} % | "
                     f"{100 * t['eval_of_round']:.0f} % | {o['per_round_s']:.2f} | {t['per_round_s']:.2f} | "
                     f"{100 * saved:.0f} % | {'yes' if r['same'] else 'NO'} |")
    if every:
        fedhb = next(r for r in rows if r["method"] == "fedhb")["one"]
        lines += ["", f"FedHB with `eval.every = 2` (rounds 2 and 3 evaluated): {every['per_round_s']:.2f} s/round "
                      f"against {fedhb['per_round_s']:.2f}, evaluation {100 * every['eval_of_round']:.0f} % of the "
                      "round."]
    if local_rows:
        lines += ["", "**Latency saved per round on real processes** (`--engine local`, TLS and authentication on):",
                  "", "| method | one message: steady s/round | separate evaluate: steady s/round | saved per round "
                  "| mean s/round (last round included), one / separate |", "|---|---|---|---|---|"]
        for r in local_rows:
            o, t = r["one"], r["two"]
            lines.append(f"| {r['method']} | {o['steady_s']:.2f} | {t['steady_s']:.2f} | "
                         f"{t['steady_s'] - o['steady_s']:.2f} s ({100 * (1 - o['steady_s'] / t['steady_s']):.0f} %) | "
                         f"{o['per_round_s']:.2f} / {t['per_round_s']:.2f} |"
                         + ("" if o["ok"] == t["ok"] == 1 else " (a run did not end ok)"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
