"""WorldLM reproduction (issue 10): multilingual fortunes, 8 language sites in 4 sub-federations.

    .venv/bin/python bench/worldlm.py                      # ~25 min on 2 cores (2 runs at a time)
    .venv/bin/python bench/worldlm.py --data markov        # the synthetic tree (no Debian packages needed)
    .venv/bin/python bench/worldlm.py --write              # and update bench/RESULTS.md

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

``--ablate`` (issue 25: does WorldLM's attention do anything?): a reduced model and data (``QUICK_MODEL``, 120
sequences of 32 bytes per site, ``--rounds``: the root phase is the first half), Local as a reference, then WorldLM with each ``ABLATIONS`` setting: temperature 1e-4 (in effect self-only: each group keeps
its own key layers), 0.1 (the default), 1 and 1e4 (in effect uniform over groups), similarity on values
instead of deltas, a 64-dim sketch. ``--related r`` mixes a share r of one common transition table into every
Markov region (related languages; ``kumiki.data.text.MARKOV_RELATED``). Reported: perplexity and each group's mean
attention weight on its own key layers over the run's last attention round. ``--write`` puts the table between
the ``worldlm-ablate-<data>`` markers.
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
RUNS = ("worldlm", "fedavg", "hierfavg", "fedper", "local", "worldlm+dp", "fedavg+dp", "hierfavg+dp")
#: ``--ablate``: the reduced model, and WorldLM's settings (label -> method knobs)
QUICK_MODEL = {"hidden": 64, "blocks": 2, "heads": 2, "context": 32}
QUICK_SEQUENCES = 120
ABLATIONS = {
    "T=1e-4 (self-only)": {"temperature": 1e-4},
    "T=0.1 (default)": {},
    "T=1": {"temperature": 1.0},
    "T=1e4 (uniform)": {"temperature": 1e4},
    "T=0.1, attn on values": {"attn_on": "params"},
    "T=0.1, sketch 64": {"embed_dim": 64},
}


def config(name: str, data: str, rounds: int, out: Path, seed: int = 0, knobs: dict | None = None,
           quick: bool = False, sites: int = 8):
    from kumiki import hierarchy
    from kumiki.config import validate

    method, _, dp = name.partition("+")
    n = QUICK_SEQUENCES if quick else 500
    if data == "fortunes":
        d = {"dataset": "fortunes", "languages": ["en", "de", "es", "it", "ru", "pl", "cs", "zh"][:sites],
             "sites": sites, "samples_per_site": n}
    else:
        d = {"dataset": "markov", "sites": sites, "samples_per_site": n}
    tag = "".join(f"-{k}_{v}" for k, v in (knobs or {}).items())
    raw = {"run": {"name": f"{name.replace('+', '-')}{tag}-s{seed}", "rounds": rounds, "seed": seed,
                   "output_dir": str(out)},
           "method": {"name": "worldlm" if method == "fedavg" and dp else method, **(knobs or {})},
           "data": d, "model": dict(QUICK_MODEL if quick else MODEL), "train": dict(TRAIN),
           "server": {"discovery_timeout_s": 60.0}}
    if method in ("worldlm", "hierfavg") or dp:
        raw["method"]["local_steps"] = None
    if method == "fedavg" and dp:  # FedAvg as WorldLM's flat tree: no key layers, the root phase every round
        raw["method"]["key_layers"] = []
        raw["federation"] = {"root_rounds": rounds}
    if dp:
        tree = hierarchy.resolve(validate(raw))
        raw.setdefault("federation", {})["groups"] = [
            {"name": g, "sites": p.sites, **(DP if g == DP_GROUP[data] else {})} for g, p in tree.groups.items()]
    return validate(raw)


def run_one(args: tuple[str, str, int, str]) -> dict:
    import torch

    from kumiki import hierarchy
    from launch.engines.inprocess import run_inprocess

    name, data, rounds, out = args
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = config(name, data, rounds, Path(out))
    s = run_inprocess(cfg, quiet=True, overwrite=True)
    tree = hierarchy.resolve(cfg)
    per_site = s["personalized"]["per_site"]
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    curve = [r["personalized"]["mean"] for r in rows if r.get("kind") == "round"]
    return {"run": name, "status": s["status"], "mean": s["personalized"]["mean"], "per_site": per_site,
            "regions": {g: sum(per_site[x] for x in p.sites) / len(p.sites) for g, p in tree.groups.items()},
            "global": s["global"]["mean"], "curve": curve, "privacy": s.get("privacy"),
            "seconds": time.perf_counter() - t0}


def run_ablation(args: tuple) -> dict:
    """One ``--ablate`` run: perplexity and each group's last attention weight on its own key layers."""
    import torch

    from kumiki.data import text
    from launch.engines.inprocess import run_inprocess

    label, name, knobs, data, rounds, out, related, sites = args
    torch.set_num_threads(1)
    text.MARKOV_RELATED = related
    t0 = time.perf_counter()
    cfg = config(name, data, rounds, Path(out), knobs=knobs, quick=True, sites=sites)
    s = run_inprocess(cfg, quiet=True, overwrite=True)
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    att = [a for r in rows if r.get("kind") == "round" for a in _find(r, "attention")]
    own = [w for node in att[-1]["self_weight"].values() for w in node.values()] if att else []
    return {"label": label, "mean": s["personalized"]["mean"], "global": s["global"]["mean"],
            "self": (min(own), max(own)) if own else None, "seconds": time.perf_counter() - t0}


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
             f"{args.workdir}/ablate-{data}-{related:g}", related, args.sites) for label, name, knobs in jobs]
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        res = {}
        for r in pool.imap_unordered(run_ablation, todo):
            res[r["label"]] = r
            print(f"{r['label']:>30}: ppl {r['mean']:.3f} self {r['self']} ({r['seconds']:.0f}s)", file=sys.stderr,
                  flush=True)
    cmd = " ".join(["bench/worldlm.py", *(sys.argv[1:])])
    what = (f"the synthetic Markov tree ({args.sites // 2} regions of 2 sites), related languages (share {related:g} "
            "of one common table in every region)" if data == "markov" and related
            else f"the synthetic Markov tree ({args.sites // 2} regions of 2 sites)" if data == "markov"
            else f"the fortunes tree ({', '.join(['en', 'de', 'es', 'it', 'ru', 'pl', 'cs', 'zh'][:args.sites])} in "
                 "their families)")
    text = (f"Generated by `{cmd}` on {time.strftime('%Y-%m-%d')}: {what}; {args.sites} sites of {QUICK_SEQUENCES} "
            "sequences, "
            f"the byte LM at d {QUICK_MODEL['hidden']}, {QUICK_MODEL['blocks']} blocks, context "
            f"{QUICK_MODEL['context']}, one pass per round, {args.rounds} rounds (root phase first half), seed 0; "
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


def render(res: dict[str, dict], data: str, rounds: int, seconds: float, load: str) -> str:
    wl = res["worldlm"]["mean"]
    regions = list(res["worldlm"]["regions"])
    head = ("| run | mean perplexity | " + " | ".join(regions) + " | ratio run / WorldLM |\n|---|---|"
            + "---|" * len(regions) + "---|\n")
    lines = []
    for name in RUNS:
        r = res.get(name)
        if r is None:
            continue
        ref = res["worldlm+dp"]["mean"] if name.endswith("+dp") and "worldlm+dp" in res else wl
        lines.append(f"| {name} | {r['mean']:.2f} | " + " | ".join(f"{r['regions'][g]:.2f}" for g in regions)
                     + f" | {r['mean'] / ref:.2f}x |")
    curve = "\n".join(f"| {name} | " + " ".join(f"{v:.1f}" for v in res[name]["curve"]) + " |" for name in RUNS
                      if name in res)
    return (f"Generated by `bench/worldlm.py --data {data}` on {time.strftime('%Y-%m-%d')}: {rounds} rounds, 8 sites, "
            f"seed 0, in-process engine, one thread per run; {seconds:.0f} s wall for {len(res)} runs ({load}). "
            "Last-round personalized perplexity (bytes; lower is better), mean over the sites and per "
            "sub-federation; the ratio divides each run's mean by WorldLM's (the DP runs by WorldLM's under the "
            "same DP).\n\n" + head + "\n".join(lines) + "\n\nMean perplexity per round:\n\n| run | rounds 1.. |\n"
            "|---|---|\n" + curve + "\n")


def main(argv: list[str] | None = None) -> int:
    from bench.conformance import _write_between
    from kumiki.data import text

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=("fortunes", "markov"), default=None)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/kumiki-worldlm")
    ap.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    ap.add_argument("--ablate", action="store_true", help="the attention ablation (module docstring)")
    ap.add_argument("--related", type=float, default=0.0, help="--ablate on markov: related languages")
    ap.add_argument("--sites", type=int, default=8, help="--ablate: sites (fortunes: the first languages)")
    ap.add_argument("--local", type=int, default=1, choices=(0, 1), help="--ablate: with Local as a reference")
    ap.add_argument("--only", nargs="*", default=[], help="--ablate: these ABLATIONS labels only")
    args = ap.parse_args(argv)
    data = args.data or ("markov" if text.fortunes_available(text.fortune_dir(), text.FORTUNE_LANGUAGES)
                         else "fortunes")
    if args.ablate:
        return ablate(args, data)
    runs = list(dict.fromkeys(["worldlm", *args.runs]))
    t0 = time.perf_counter()
    with open("/proc/loadavg") as f:
        load0 = f.read().split()[0]
    res = {}
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for r in pool.imap_unordered(run_one, [(n, data, args.rounds, args.workdir) for n in runs]):
            res[r["run"]] = r
            print(f"{r['run']:>12}: {r['status']} mean ppl {r['mean']:.2f} ({r['seconds']:.0f}s)", file=sys.stderr,
                  flush=True)
    with open("/proc/loadavg") as f:
        load = f"load average {load0} at start, {f.read().split()[0]} at the end, on 2 cores shared with other work"
    table = render(res, data, args.rounds, time.perf_counter() - t0, load)
    print(table)
    (Path(args.workdir) / f"results-{data}.json").write_text(json.dumps(res, indent=1))
    if args.write:
        _write_between(ROOT / "bench" / "RESULTS.md", table, f"worldlm-{data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
