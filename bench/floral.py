"""FLoRAL reproduction (issue 8; spec ``floral.md`` section 10) on cluster partitions.

    .venv/bin/python bench/floral.py [--data digits fashion-mnist] [--seeds 0 1] [--rounds 30] [--write]
    .venv/bin/python bench/floral.py --quick [--clusters 2 4] [--sites 4 8 16] [--conv-dims kernel code] [--write]

Tasks: label-shift clusters (y -> y + c mod 10) and rotation clusters ((360/C) c degrees), C adaptors
= the number of clusters, the server never told which site is where; "full" data and a scarce
variant (``--scarce`` examples per site, the spec's 5% task). Methods: fedavg, floral,
floral_ensemble (C full models), local_adaptors (one private adaptor set per site). Reported:
personalized accuracy (last round, mean over seeds), parameters per site that are federated and
personal, and bytes per round. Claims checked (spec section 10): FLoRAL >> FedAvg on label shift;
FLoRAL close to the ensemble at a fraction of its parameters; FLoRAL >= local adaptors when data
are scarce. ``--write`` puts the table between the ``floral`` markers of bench/RESULTS.md.

``--quick`` is what a user of the defaults gets (issue 25): digits, label-shift clusters only, the default
``[model]`` (CNN-S with batch norm) and ``[train]``, 100 examples per site, 15 rounds, FedAvg and FLoRAL
(one row per ``--conv-dims`` value, and per ``--set`` variant), over ``--clusters`` x ``--sites``, with
C = the number of clusters. Its table goes between the ``floral-quick`` markers.

A ``--set`` variant may name its method (``name=fedavg``) and set ``privacy.*``, ``model.*`` and ``train.*`` keys
besides FLoRAL's knobs; ``--per-site`` sizes the sites and ``--no-defaults`` drops the default FedAvg / FLoRAL
rows, so FLoRAL under DP on the cluster task (issue 25) runs as, e.g.::

    bench/floral.py --quick --quick-clusters 2 --sites 4 --per-site 400 --rounds 10 --no-defaults --write-tag floral-dp-clusters \
        --set "name=fedavg,model.norm=group" "model.norm=group" \
              "name=fedavg,privacy.enabled=true,privacy.fix_model=true" "privacy.enabled=true,privacy.fix_model=true"
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import knob_value  # noqa: E402

METHODS = ("fedavg", "floral", "floral_ensemble", "local_adaptors")


def config(data: str, transform: str, method: str, seed: int, per_site: int, rounds: int, out: Path, clusters: int,
           sites: int = 8, default_model: bool = False, extra: dict | None = None, train: dict | None = None,
           more: dict | None = None, tag: dict | None = None):
    """One run's config. ``default_model``: no ``[model]`` / ``[train]`` (the user's defaults: CNN-S with BN);
    otherwise the paper's MnistNN shape at lr 0.1. ``extra``: method knobs (e.g. ``conv_dims``); ``more``: other
    sections' keys (``privacy``, ``model``); ``tag``: what names the run (default: ``extra``)."""
    from kumiki.config import validate

    method_raw = {"name": method, **({"num_adaptors": clusters} if method not in ("fedavg", "local_adaptors") else {}),
                  **(extra or {})}
    tag = re.sub(r"[^A-Za-z0-9_.-]", "", "-".join(f"{k}_{v}" for k, v in (tag or extra or {}).items()
                                                  if not k.startswith("train.")))
    raw = {
        "run": {"name": f"{data}-{transform}-{per_site}-{sites}x{clusters}-{method}{'-' + tag if tag else ''}-s{seed}",
                "rounds": rounds, "seed": seed, "output_dir": str(out)},
        "method": method_raw,
        "data": {"dataset": data, "sites": sites, "unseen_sites": 0, "samples_per_site": per_site,
                 "partition": {"kind": "clusters", "clusters": clusters, "cluster_transform": transform}},
    }
    if not default_model:
        raw["model"] = {"arch": "mlp", "hidden": 200}
        raw["train"] = {"batch_size": 32, "lr": 0.1}
    for sec, vals in (more or {}).items():
        raw[sec] = {**raw.get(sec, {}), **vals}
    if train:
        raw["train"] = {**raw.get("train", {}), **train}
        raw["run"]["name"] += "-" + "-".join(f"{k}_{v}" for k, v in train.items())
    return validate(raw)


def split_sizes(cfg) -> tuple[int, int]:
    """(federated, personal) parameters of one site's model."""
    from kumiki.split import ParamSplit
    from models import build_model
    from server.federation import model_spec

    model = build_model(model_spec(cfg), cfg.method)
    split = ParamSplit.build(model, cfg.method.split_rules())
    sizes = {k: v.numel() for k, v in model.state_dict().items() if v.is_floating_point()}
    return sum(sizes.get(k, 0) for k in split.shared), sum(sizes.get(k, 0) for k in split.personal)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=["digits"])
    ap.add_argument("--transforms", nargs="+", default=["label_shift", "rotation"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=None, help="default: 30 (15 in quick mode)")
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--full", type=int, default=200, help="examples per site (train + test) in the full task")
    ap.add_argument("--scarce", type=int, default=40, help="examples per site in the scarce task")
    ap.add_argument("--scarce-rounds", type=int, default=150,
                    help="rounds of the scarce task (one step per round there; the paper runs 1500)")
    ap.add_argument("--out", default="/tmp/kumiki-bench-floral")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--quick", action="store_true", help="the defaults' check: digits, label shift, default model")
    ap.add_argument("--sites", type=int, nargs="+", default=[4, 8, 16], help="site counts (quick mode)")
    ap.add_argument("--quick-clusters", type=int, nargs="+", default=[2, 4], help="cluster counts (quick mode)")
    ap.add_argument("--conv-dims", nargs="*", default=["kernel", "code"], help="FLoRAL rows (quick mode)")
    ap.add_argument("--set", dest="sets", nargs="*", default=[],
                    help="extra FLoRAL variants (quick mode), each 'knob=value[,knob=value]', e.g. router_lr=1.0 or "
                         "train.local_epochs=3,conv_dims=code or layers=encoder.fc+head")
    ap.add_argument("--jobs", type=int, default=1, help="quick mode: runs in parallel, one thread each")
    ap.add_argument("--per-site", type=int, default=100, help="quick mode: examples per site (train + test)")
    ap.add_argument("--no-defaults", action="store_true", help="quick mode: only the --set rows")
    ap.add_argument("--write-tag", default="floral-quick", help="quick mode: the RESULTS.md markers --write fills")
    ap.add_argument("--method", default="floral", help="quick mode: the method of the --set variants")
    args = ap.parse_args(argv)
    if args.quick:
        return quick(args)

    import torch

    from launch.engines import run

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the sites' threads (client/threads.py)
    t0 = time.time()
    rows = []
    for data in args.data:
        for transform in args.transforms:
            for per_site, rounds in ((args.full, args.rounds or 30), (args.scarce, args.scarce_rounds)):
                for method in METHODS:
                    accs, up, down = [], [], []
                    for seed in args.seeds:
                        cfg = config(data, transform, method, seed, per_site, rounds, Path(args.out), args.clusters)
                        s = run(cfg, "inprocess", quiet=True, overwrite=True)
                        accs.append(s["personalized"]["mean"])
                        up.append(s["bytes"]["up_per_round"])
                        down.append(s["bytes"]["down_per_round"])
                    fed, pers = split_sizes(cfg)
                    row = (data, transform, per_site, rounds, method, statistics.mean(accs), fed, pers,
                           statistics.mean(up), statistics.mean(down))
                    rows.append(row)
                    print(f"{data} {transform} {per_site}/site {rounds} rounds {method}: {100 * row[5]:.1f}% "
                          f"federated {fed:,} personal {pers:,} up {row[8] / 1024:.0f} KiB/round", flush=True)
    text = (f"Generated by `bench/floral.py` on {time.strftime('%Y-%m-%d')}: 8 sites, {args.clusters} clusters "
            f"(site i in cluster i mod {args.clusters}, unknown to the server), MLP (hidden 200, the paper's MnistNN "
            f"shape), train lr 0.1 batch 32, seeds {', '.join(map(str, args.seeds))}, "
            f"C = {args.clusters}, each method's defaults otherwise; {time.time() - t0:.0f} s in all.\n\n"
            "| data | clusters by | examples/site | rounds | method | personalized % | federated params | personal params "
            "| up KiB/round | down KiB/round |\n|---|---|---|---|---|---|---|---|---|---|\n")
    text += "\n".join(f"| {d} | {t} | {n} | {r} | {m} | {100 * a:.1f} | {f:,} | {p:,} | {u / 1024:,.0f} | {w / 1024:,.0f} |"
                      for d, t, n, r, m, a, f, p, u, w in rows) + "\n"
    print(text)
    if args.write:
        from bench.conformance import _write_between

        _write_between(ROOT / "bench" / "RESULTS.md", text, tag="floral")
    return 0


def quick(args) -> int:
    """The defaults' check (module docstring): FedAvg and FLoRAL variants over clusters x sites."""
    t0 = time.time()
    variants = [] if args.no_defaults else [("fedavg", {})] + [("floral", {"conv_dims": d}) for d in args.conv_dims]
    for s in args.sets:
        extra = {k: v.split("+") if k == "layers" else knob_value(v) for k, v in (kv.split("=", 1) for kv in s.split(","))}
        variants.append((extra.pop("name", args.method), extra))
    per_site, rows = args.per_site, []
    rounds = args.rounds or 15
    todo = [(clusters, sites, method, extra, seed, per_site, rounds, args.out)
            for clusters in args.quick_clusters for sites in args.sites for method, extra in variants
            for seed in args.seeds]
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs) as pool:
            done = pool.map(_quick_run, todo)
    else:
        done = [_quick_run(t) for t in todo]
    results = {(c, n, m, repr(e), seed): r for (c, n, m, e, seed, *_), r in zip(todo, done)}
    for clusters in args.quick_clusters:
        for sites in args.sites:
            for method, extra in variants:
                got = [results[(clusters, sites, method, repr(extra), seed)] for seed in args.seeds]
                accs, pis = [a for a, _ in got], [p for _, p in got]
                label = method + "".join(f" {k}={v}" for k, v in extra.items())
                sep = None if None in pis else f"{statistics.mean(p[0] for p in pis):.2f} ({'/'.join(str(p[1]) for p in pis)})"
                rows.append((clusters, sites, label, statistics.mean(accs), sep))
                print(f"{clusters} clusters {sites} sites {label}: {100 * rows[-1][3]:.1f}% separation {sep}",
                      flush=True)
    text = (f"Generated by `bench/floral.py --quick` on {time.strftime('%Y-%m-%d')}: digits, label-shift clusters "
            f"(site i in cluster i mod C, unknown to the server), C adaptors = C clusters, {per_site} examples per "
            f"site ({int(per_site * 0.8)} train), the default `[model]` (CNN-S, batch norm) and `[train]`, each method's defaults "
            f"otherwise, {rounds} rounds, seeds {', '.join(map(str, args.seeds))}; {time.time() - t0:.0f} s in all. "
            "Separation: the mean over sites of the router weight on the adaptor its cluster's sites favour most "
            "(1/C: not separated; 1: each site routes to one adaptor), after the last round; in brackets, how many "
            "distinct adaptors the clusters favour (C: each cluster owns one), per seed.\n\n"
            "| clusters | sites | method | personalized % | separation |\n|---|---|---|---|---|\n")
    text += "\n".join(f"| {c} | {n} | {m} | {100 * a:.1f} | {p or '–'} |"
                      for c, n, m, a, p in rows) + "\n"
    print(text)
    if args.write:
        from bench.results import write_section

        write_section(args.write_tag, text, ROOT / "bench" / "RESULTS.md")
    return 0


def _quick_run(job) -> tuple[float, tuple[float, int] | None]:
    """One quick-mode run: (personalized mean, separation)."""
    import torch

    from launch.engines import run

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    clusters, sites, method, extra, seed, per_site, rounds, out = job
    sections = {sec: {k.split(".", 1)[1]: v for k, v in extra.items() if k.startswith(sec + ".")}
                for sec in ("train", "privacy", "model")}
    knobs = {k: v for k, v in extra.items() if "." not in k}
    if sections["privacy"]:  # runs in one output dir share each site's privacy ledger (it never resets): one each
        out = Path(out) / re.sub(r"[^A-Za-z0-9_.-]", "", f"dp-{clusters}x{sites}-{method}-s{seed}-" +
                                 "-".join(f"{k}_{v}" for k, v in extra.items()))
    cfg = config("digits", "label_shift", method, seed, per_site, rounds, Path(out), clusters, sites=sites,
                 default_model=True, extra=knobs, train=sections["train"],
                 more={sec: sections[sec] for sec in ("privacy", "model") if sections[sec]}, tag=extra)
    s = run(cfg, "inprocess", quiet=True, overwrite=True)
    print(f"  {clusters} clusters {sites} sites {method} {extra} seed {seed}: {100 * s['personalized']['mean']:.1f}%",
          flush=True)
    return s["personalized"]["mean"], separation(cfg, clusters)


def separation(cfg, clusters: int) -> tuple[float, int] | None:
    """How far the routers separated the clusters (``quick``'s table), from each site's saved router theta_k:
    (mean router weight on the cluster's favourite adaptor, distinct favourites); None without a router."""
    import torch

    pis = {}
    for f in sorted((cfg.run_dir() / "state").glob("site-*/site_state.pt")):
        theta = torch.load(f, weights_only=False)["personal"].get("router.theta")
        if theta is not None:
            pis[int(f.parent.name.rsplit("-", 1)[1])] = torch.softmax(torch.as_tensor(theta).double(), 0).tolist()
    if not pis:
        return None
    by_cluster: dict[int, list[list[float]]] = {}
    for site, pi in pis.items():
        by_cluster.setdefault(site % clusters, []).append(pi)
    vals, favourites = [], set()
    for members in by_cluster.values():
        mean = [statistics.mean(col) for col in zip(*members)]
        favourite = max(range(len(mean)), key=mean.__getitem__)
        favourites.add(favourite)
        vals += [pi[favourite] for pi in members]
    return statistics.mean(vals), len(favourites)


if __name__ == "__main__":
    sys.exit(main())
