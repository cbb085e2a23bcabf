"""WorldLM reproduction (issue 10): multilingual fortunes, 8 language sites in 4 sub-federations.

    .venv/bin/python bench/worldlm.py                      # ~25 min on 2 cores (2 runs at a time)
    .venv/bin/python bench/worldlm.py --data markov        # the synthetic tree (no Debian packages needed)
    .venv/bin/python bench/worldlm.py --write              # and update bench/RESULTS.md
    .venv/bin/python bench/worldlm.py --quick-dp --write   # the DP comparison only, tiny LM (minutes)

Sites: en, de, es, it, ru, pl, cs, zh (Debian ``fortunes-*``), each 500 sequences of 64 bytes (400 train,
100 test); the natural tree: germanic (en, de), romance (es, it), slavic (ru, pl, cs), sinitic (zh). Model: the
byte-level LM at d 128, 4 blocks, 4 heads, context 64 (0.87M parameters; the spec's 3.3M default is about 8x
slower per step on this CPU). Every method trains with WorldLM's optimizer (AdamW lr 1e-3, betas (0.9, 0.95),
clip 1.0, batch 16) for one pass over the site's data per round (WorldLM and HierFAVG with
``local_steps = none``), so every method sees the same tokens. 10 rounds: WorldLM's root phase is rounds 1-5,
the sub-federations' phase rounds 6-10; HierFAVG averages across sub-federations every 2 rounds.

Runs: WorldLM, FedAvg (whole model), HierFAVG, FedPer (personal ``head.*``), Local (finite data: not the
paper's infinite-data Local), then with central DP (z 1.0, s_clip 1.0, the spec's values) in the slavic
sub-federation for WorldLM, FedAvg and HierFAVG. FedAvg under sub-federation DP is WorldLM with no key layers
and a root phase of every round (the flat tree; ``tests/test_worldlm.py`` checks that it is FedAvg).
Reported: last-round mean personalized perplexity over the 8 sites (and per sub-federation), and the ratio
baseline / WorldLM (> 1: WorldLM is better).

The DP runs protect at the same level: WorldLM's key layers are clipped and noised with the backbone
(``dp_cover_k = true``, the default since issue 21), as FedAvg's whole model is. ``worldlm+dp-uncovered`` is the
old setting (key layers sent without noise, outside epsilon), kept only to show what covering them costs.
``--quick-dp``: only the DP comparison (WorldLM and FedAvg with and without DP, and the uncovered run) on the
tiny LM (d 64, 2 blocks, 2 heads, context 32), 200 sequences per site, 4 rounds (WorldLM: 2 root, 2 per
sub-federation); written to its own section (``worldlm-dp``).

``--ablate`` (issue 25: does WorldLM's attention do anything?): a reduced model and data (``QUICK_MODEL``, 120
sequences of 32 bytes per site, ``--rounds``: the root phase is the first half), Local as a reference, then WorldLM with each ``ABLATIONS`` setting: temperature 1e-4 (in effect self-only: each group keeps
its own key layers), 0.1 (the default), 1 and 1e4 (in effect uniform over groups), similarity on values
instead of deltas, a 64-dim sketch. ``--related r`` mixes a share r of one common transition table into every
Markov region (related languages; ``kumiki.data.text.MARKOV_RELATED``). Reported: perplexity and each group's mean
attention weight on its own key layers over the run's last attention round. ``--write`` puts the table between
the ``worldlm-ablate-<data>`` markers. Every finished run (any ``--seeds``) also goes to a JSON file in
``--workdir``; ``--ablate-table FILE...`` prints one table of all of them, per round (the ``worldlm-ablate``
section).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = {"hidden": 128, "blocks": 4, "heads": 4, "context": 64}
TRAIN = {"optimizer": "adamw", "lr": 1e-3, "betas": [0.9, 0.95], "grad_clip": 1.0, "batch_size": 16,
         "local_epochs": 1}
DP_GROUP = {"fortunes": "slavic", "markov": "region-1"}
DP = {"dp": "central", "dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_target_epsilon": 1000.0}
TINY = {"hidden": 64, "blocks": 2, "heads": 2, "context": 32}
RUNS = ("worldlm", "fedavg", "hierfavg", "fedper", "local", "worldlm+dp", "fedavg+dp", "hierfavg+dp",
        "worldlm+dp-uncovered")
QUICK_DP = ("worldlm+dp", "fedavg+dp", "worldlm", "fedavg", "worldlm+dp-uncovered")  # the DP pair first


#: ``--ablate``: the reduced model, and WorldLM's settings (label -> method knobs)
QUICK_MODEL = TINY
QUICK_SEQUENCES = 120
ABLATIONS = {
    "T=1e-4 (self-only)": {"temperature": 1e-4},
    "T=0.1 (default)": {},
    "T=1": {"temperature": 1.0},
    "T=1e4 (uniform)": {"temperature": 1e4},
    "T=0.1, attn on values": {"attn_on": "params"},
    "T=0.1, sketch 64": {"embed_dim": 64},
}


def config(name: str, data: str, rounds: int, out: Path, seed: int = 0, tiny: bool = False,
           knobs: dict | None = None, quick: bool = False, sites: int = 8):
    from kumiki import hierarchy
    from kumiki.config import validate

    method, _, dp = name.partition("+")
    samples = QUICK_SEQUENCES if quick else 200 if tiny else 500
    if data == "fortunes":
        d = {"dataset": "fortunes", "languages": ["en", "de", "es", "it", "ru", "pl", "cs", "zh"][:sites],
             "sites": sites, "samples_per_site": samples}
    else:
        d = {"dataset": "markov", "sites": sites, "samples_per_site": samples}
    tag = "".join(f"-{k}_{v}" for k, v in (knobs or {}).items())
    raw = {"run": {"name": f"{name.replace('+', '-')}{tag}-s{seed}", "rounds": rounds, "seed": seed,
                   "output_dir": str(out)},
           "method": {"name": "worldlm" if method == "fedavg" and dp else method, **(knobs or {})},
           "data": d, "model": dict(TINY if (tiny or quick) else MODEL), "train": dict(TRAIN),
           "server": {"discovery_timeout_s": 60.0}}
    if method in ("worldlm", "hierfavg") or dp:
        raw["method"]["local_steps"] = None
    if method == "fedavg" and dp:  # FedAvg as WorldLM's flat tree: no key layers, the root phase every round
        raw["method"]["key_layers"] = []
        raw["federation"] = {"root_rounds": rounds}
    if dp:
        tree = hierarchy.resolve(validate(raw))
        raw.setdefault("federation", {})["groups"] = [
            {"name": g, "sites": p.sites, **(DP if g == DP_GROUP[data] else {}),
             **({"dp_cover_k": False} if g == DP_GROUP[data] and dp == "dp-uncovered" else {})}
            for g, p in tree.groups.items()]
    return validate(raw)


def run_one(args: tuple[str, str, int, str, bool]) -> dict:
    import torch

    from launch.engines.inprocess import run_inprocess

    name, data, rounds, out, tiny = args
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = config(name, data, rounds, Path(out), tiny=tiny)
    s = run_inprocess(cfg, quiet=True, overwrite=True)
    return collect(name, cfg, s, time.perf_counter() - t0)


def collect(name: str, cfg, s: dict, seconds: float) -> dict:
    """One run's row from its summary and metrics.jsonl (``--from-runs`` reads both from the run dir)."""
    from kumiki import hierarchy

    tree = hierarchy.resolve(cfg)
    per_site = s["personalized"]["per_site"]
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    curve = [r["personalized"]["mean"] for r in rows if r.get("kind") == "round"]
    return {"run": name, "status": s["status"], "mean": s["personalized"]["mean"], "per_site": per_site,
            "regions": {g: sum(per_site[x] for x in p.sites) / len(p.sites) for g, p in tree.groups.items()},
            "global": s["global"]["mean"], "curve": curve, "privacy": s.get("privacy"), "seconds": seconds}


def run_ablation(args: tuple) -> dict:
    """One ``--ablate`` run: perplexity and each group's last attention weight on its own key layers."""
    import torch

    from kumiki.data import text
    from launch.engines.inprocess import run_inprocess

    label, name, knobs, data, rounds, out, related, sites, seed = args
    torch.set_num_threads(1)
    text.MARKOV_RELATED = related
    t0 = time.perf_counter()
    cfg = config(name, data, rounds, Path(out), seed=seed, knobs=knobs, quick=True, sites=sites)
    s = run_inprocess(cfg, quiet=True, overwrite=True)
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    rounds_rows = [r for r in rows if r.get("kind") == "round"]
    # per round: the smallest and largest own weight over the nodes that attended (root: groups; then sites)
    own_curve = []
    for r in rounds_rows:
        ws = [w for a in _find(r, "attention") for node in a["self_weight"].values() for w in node.values()]
        own_curve.append((min(ws), max(ws)) if ws else None)
    last = next((o for o in reversed(own_curve) if o is not None), None)
    return {"label": label, "seed": seed, "mean": s["personalized"]["mean"], "global": s["global"]["mean"],
            "curve": [r["personalized"]["mean"] for r in rounds_rows], "own_curve": own_curve,
            "self": last, "seconds": time.perf_counter() - t0}


def ablate_table(paths: list[str], rounds: int) -> str:
    """One table from the JSON files ``--ablate`` leaves in its workdir (every finished run, any seed, both data
    sets): per run, the personalized perplexity and the own weight per round, and the last round's perplexity
    against self-only's at the same seed (``--ablate-table``; the caller writes the prose around it)."""
    runs = [dict(r, data=Path(f).stem.removeprefix("ablate-")) for f in paths for r in json.loads(Path(f).read_text())]
    order = ["local", *(f"worldlm {k}" for k in ABLATIONS)]
    runs.sort(key=lambda r: (r["data"], order.index(r["label"]) if r["label"] in order else 99, r["seed"]))
    ref = {(r["data"], r["seed"]): r["curve"][-1] for r in runs if r["label"] == "worldlm T=1e-4 (self-only)"}
    name = {"fortunes-0": "fortunes (en, de; es, it)", "markov-0.7": "Markov, related (0.7 shared)"}

    def own(o):  # the smallest and largest own weight of a round, one number when they agree
        return "–" if o is None else f"{o[0]:.3f}" if f"{o[0]:.3f}" == f"{o[1]:.3f}" else f"{o[0]:.3f}–{o[1]:.3f}"

    out = ["| data | run | seed | rounds | perplexity per round | own weight per round | last / self-only |",
           "|---|---|---|---|---|---|---|"]
    for r in runs:
        base = ref.get((r["data"], r["seed"]))
        ratio = "–" if base is None else f"{r['curve'][-1] / base:.3f}"
        out.append(f"| {name.get(r['data'], r['data'])} | {r['label'].removeprefix('worldlm ')} | {r['seed']} | "
                   f"{len(r['curve'])} of {rounds} | {', '.join(f'{v:.2f}' for v in r['curve'])} | "
                   f"{', '.join(own(o) for o in r['own_curve']) if any(r['own_curve']) else '–'} | "
                   f"{ratio} |")
    return "\n".join(out) + "\n"


def _find(obj, key: str):
    """Every value under ``key`` anywhere in a nested dict (a round row's attention summary)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            else:
                yield from _find(v, key)


def ablate(args, data: str) -> int:
    from bench.conformance import _write_between

    jobs = [("local", "local", {})] * args.local + [(f"worldlm {k}", "worldlm", v) for k, v in ABLATIONS.items()
                                                   if not args.only or k in args.only]
    related = args.related if data == "markov" else 0.0
    todo = [(label, name, {**({"local_steps": None} if name == "worldlm" else {}), **knobs}, data, args.rounds,
             f"{args.workdir}/ablate-{data}-{related:g}", related, args.sites, seed)
            for seed in args.seeds for label, name, knobs in jobs]
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        res, every = {}, []
        dump = Path(args.workdir) / f"ablate-{data}-{related:g}.json"
        for r in pool.imap_unordered(run_ablation, todo):
            if r["seed"] == args.seeds[0]:
                res[r["label"]] = r
            every.append(r)
            dump.write_text(json.dumps(every, indent=1))  # every finished run, kept if the rest are stopped
            print(f"{r['label']:>30} seed {r['seed']}: ppl {r['mean']:.3f} curve {r['curve']} own {r['own_curve']} "
                  f"({r['seconds']:.0f}s)", file=sys.stderr, flush=True)
    cmd = " ".join(["bench/worldlm.py", *(sys.argv[1:])])
    what = (f"the synthetic Markov tree ({args.sites // 2} regions of 2 sites), related languages (share {related:g} "
            "of one common table in every region)" if data == "markov" and related
            else f"the synthetic Markov tree ({args.sites // 2} regions of 2 sites)" if data == "markov"
            else f"the fortunes tree ({', '.join(['en', 'de', 'es', 'it', 'ru', 'pl', 'cs', 'zh'][:args.sites])} in "
                 "their families)")
    text = (f"Generated by `{cmd}` on {time.strftime('%Y-%m-%d')}: {what}; {args.sites} sites of {QUICK_SEQUENCES} "
            "sequences, "
            f"the byte LM at d {QUICK_MODEL['hidden']}, {QUICK_MODEL['blocks']} blocks, context "
            f"{QUICK_MODEL['context']}, one pass per round, {args.rounds} rounds (root phase first half), seeds {', '.join(map(str, args.seeds))} (the table: seed {args.seeds[0]}); "
            f"{time.perf_counter() - t0:.0f} s for {len(res)} runs, {args.jobs} at a time, load average "
            f"{load0:.1f} at start and {os.getloadavg()[0]:.1f} at the end on 2 shared cores. Own weight: the "
            "smallest and largest over groups of a group's mean attention weight on its own key layers in the last "
            "round with attention (1: no mixing).\n\n"
            "| run | mean perplexity | ratio to WorldLM default | own weight (min–max) |\n|---|---|---|---|\n")
    ref = res.get("worldlm T=0.1 (default)", next(iter(res.values())))["mean"]
    text += "\n".join(f"| {label} | {res[label]['mean']:.3f} | {res[label]['mean'] / ref:.3f} | "
                      + ("–" if res[label]["self"] is None else f"{res[label]['self'][0]:.3f}–{res[label]['self'][1]:.3f}")
                      + " |" for label, _, _ in jobs if label in res) + "\n"
    print(text)
    if args.write:
        _write_between(ROOT / "bench" / "RESULTS.md", text, f"worldlm-ablate-{data}{'-related' if related else ''}")
    return 0


def _f(v: float) -> str:
    """A perplexity: 2 decimals, or 3 significant digits with an exponent once it has diverged."""
    return f"{v:.2f}" if abs(v) < 1e5 else f"{v:.3g}"


def _dp(r: dict) -> str:
    """'ε 19.1, key layers noised' for a DP run (its DP group's privacy record), '–' otherwise."""
    groups = ((r.get("privacy") or {}).get("groups") or {})
    g = next((v for v in groups.values() if v.get("mode") == "central"), None)
    if g is None:
        return "–"
    if r["run"].startswith(("fedavg", "hierfavg")):
        return f"ε {g['epsilon']:.1f}, the whole model noised"
    return f"ε {g['epsilon']:.1f}, key layers {'noised' if g['cover_k'] else 'NOT noised'}"


def render(res: dict[str, dict], data: str, rounds: int, seconds: float, load: str, cmd: str,
           model: str = "d 128, 4 blocks") -> str:
    first = res.get("worldlm") or next(iter(res.values()))
    wl = first["mean"] if "worldlm" in res else float("nan")
    regions = list(first["regions"])
    head = ("| run | mean perplexity | " + " | ".join(regions) + " | ratio run / WorldLM | DP group |\n|---|---|"
            + "---|" * len(regions) + "---|---|\n")
    lines = []
    for name in RUNS:
        r = res.get(name)
        if r is None:
            continue
        ref = res["worldlm+dp"]["mean"] if name.endswith(("+dp", "+dp-uncovered")) and "worldlm+dp" in res else wl
        lines.append(f"| {name} | {_f(r['mean'])} | " + " | ".join(_f(r['regions'][g]) for g in regions)
                     + f" | {r['mean'] / ref:.3g}x | {_dp(r)} |")
    curve = "\n".join(f"| {name} | " + " ".join(_f(v) for v in res[name]["curve"]) + " |" for name in RUNS
                      if name in res)
    return (f"Generated by `{cmd}` on {time.strftime('%Y-%m-%d')}: data {data}, byte LM {model}, {rounds} rounds, "
            f"8 sites, seed 0, in-process engine, one thread per run; {seconds:.0f} s of runs ({len(res)} runs) "
            f"({load}). Last-round personalized perplexity (bytes; lower is better), mean over the sites and per "
            "sub-federation; the ratio divides each run's mean by WorldLM's (the DP runs by WorldLM's under the "
            "same DP).\n\n" + head + "\n".join(lines) + "\n\nMean perplexity per round:\n\n| run | rounds 1.. |\n"
            "|---|---|\n" + curve + "\n")


def main(argv: list[str] | None = None) -> int:
    from bench.conformance import _write_between
    from kumiki.data import text

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=("fortunes", "markov"), default=None)
    ap.add_argument("--rounds", type=int, default=None, help="default 10 (--quick-dp: 6)")
    ap.add_argument("--runs", nargs="+", default=None, choices=RUNS, help="default: all (--quick-dp: its five)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/kumiki-worldlm")
    ap.add_argument("--quick-dp", action="store_true", help="the DP comparison only, tiny LM, 200 sequences, 4 rounds")
    ap.add_argument("--from-runs", action="store_true",
                    help="run nothing: table the runs in --workdir that finished (their summary.json)")
    ap.add_argument("--command", default=None, help="the command line the table names (default: this one)")
    ap.add_argument("--load", default=None, help="the load the runs saw (default: measured now, at start and end)")
    ap.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    ap.add_argument("--ablate", action="store_true", help="the attention ablation (module docstring)")
    ap.add_argument("--related", type=float, default=0.0, help="--ablate on markov: related languages")
    ap.add_argument("--sites", type=int, default=8, help="--ablate: sites (fortunes: the first languages)")
    ap.add_argument("--local", type=int, default=1, choices=(0, 1), help="--ablate: with Local as a reference")
    ap.add_argument("--only", nargs="*", default=[], help="--ablate: these ABLATIONS labels only")
    ap.add_argument("--ablate-table", nargs="+", default=None, metavar="JSON",
                    help="run nothing: print one table of the --ablate runs in these JSON files (their --workdir)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help="--ablate: seeds (the table shows the first; every run goes to the JSON in --workdir)")
    args = ap.parse_args(argv)
    args.runs = args.runs or list(QUICK_DP if args.quick_dp else RUNS[:-1])
    args.rounds = args.rounds or (4 if args.quick_dp else 10)
    data = args.data or ("markov" if text.fortunes_available(text.fortune_dir(), text.FORTUNE_LANGUAGES)
                         else "fortunes")
    if args.ablate_table:
        print(ablate_table(args.ablate_table, args.rounds))
        return 0
    if args.ablate:
        return ablate(args, data)
    runs = list(dict.fromkeys(args.runs))
    t0 = time.perf_counter()
    with open("/proc/loadavg") as f:
        load0 = f.read().split()[0]
    res = {}
    if args.from_runs:
        for n in runs:
            cfg = config(n, data, args.rounds, Path(args.workdir), tiny=args.quick_dp)
            f = cfg.run_dir() / "summary.json"
            if f.exists():
                s = json.loads(f.read_text())
                res[n] = collect(n, cfg, s, float(s["time"]["wall_s"]))
        runs = []
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for r in pool.imap_unordered(run_one, [(n, data, args.rounds, args.workdir, args.quick_dp) for n in runs]):
            res[r["run"]] = r
            print(f"{r['run']:>12}: {r['status']} mean ppl {r['mean']:.2f} ({r['seconds']:.0f}s)", file=sys.stderr,
                  flush=True)
    with open("/proc/loadavg") as f:
        load = f"load average {load0} at start, {f.read().split()[0]} at the end, on 2 cores shared with other work"
    cmd = args.command or "bench/worldlm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    wall = sum(r["seconds"] for r in res.values()) if args.from_runs else time.perf_counter() - t0
    table = render(res, data, args.rounds, wall, args.load or load, cmd.strip(),
                   "d 64, 2 blocks, context 32, 200 sequences per site" if args.quick_dp else "d 128, 4 blocks")
    print(table)
    (Path(args.workdir) / f"results-{data}{'-dp' if args.quick_dp else ''}.json").write_text(json.dumps(res, indent=1))
    if args.write:
        _write_between(ROOT / "bench" / "RESULTS.md", table, "worldlm-dp" if args.quick_dp else f"worldlm-{data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
