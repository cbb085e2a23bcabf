"""Privacy reproduction (issues 11 and 21): the pilot config under per-site DP-SGD at several budgets.

    .venv/bin/python bench/privacy.py [--epsilons 1 4 8 inf] [--methods fedavg fedavg_ft ...] [--write]
    .venv/bin/python bench/privacy.py --quick --write     # every method x epsilon 1, 4, inf at 5 rounds

The pilot (``deploy/pilot.toml``) with ``model.norm = "group"`` (DP-SGD cannot train BatchNorm);
epsilon = inf is the same model trained without DP. Each (method, epsilon) runs in its own output
dir, so each starts with a fresh privacy ledger (runs of the same sites share one). DualFed
runs under DP with ``con_lambda = 0`` and ``privacy.fix_model`` (its projector's BatchNorm). Reported:
personalized and global accuracy at the end (as the server received them), epsilon spent per site, and the
rounds each site trained before its budget stopped it.

Under DP a site sends no metric of a model it trained outside DP-SGD (FedAvg-FT's fine-tuned copy, FedHB's
personalization: docs/privacy.md): the server's personalized column is then "withheld", and the bench, which
operates every site, reads the figure each site kept in its own log (``evaluation-local.jsonl`` in its state
dir) into a separate column, marked as outside epsilon.

``--quick`` runs fewer rounds (5) at epsilon 1, 4 and inf, seed 0, for every method below: the noise is solved
for the 5 planned rounds, so its figures are not the 10-round table's; it evaluates after the last round only
(``eval.every = 5``: evaluation runs on a copy and never changes training, and FedHB's 5 personalization epochs
per evaluation would otherwise dominate). Rows go to ``<out>/rows.jsonl`` as each
run ends (``--resume`` skips the (method, epsilon) pairs already there; ``--table-only`` runs nothing and tables
the rows there, e.g. those of several streams run in parallel, concatenated), and ``--write`` puts the table of
all rows between the ``privacy`` markers of bench/RESULTS.md.

``--variants`` (issue 25, FLoRAL under DP): extra rows per (method, epsilon), each a list of ``--set``
assignments joined by ``;`` (e.g. ``method.dp_precondition=true`` or ``privacy.scope="shared"``), labelled by
that text; with ``--rounds`` / ``--samples`` / ``--dataset`` for a quick mode; ``--write-tag`` picks the markers.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ["fedavg", "fedprox", "fedavg_ft", "fedhb", "dualfed", "floral"]


def site_local(run_dir: Path, path: str = "personalized") -> float | None:
    """The mean over training sites of the last ``<path>-accuracy`` each site kept in its own log (None: none)."""
    last = {}
    for f in sorted((run_dir / "state").glob("*/evaluation-local.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        vals = [r["metrics"][f"{path}-accuracy"] for r in rows if f"{path}-accuracy" in r.get("metrics", {})]
        if vals:
            last[f.parent.name] = vals[-1]
    return sum(last.values()) / len(last) if last else None


def run_one(method: str, eps: float, rounds: int | None, out_root: Path, last_only: bool = False,
            variant: str = "", samples: int | None = None, dataset: str | None = None) -> dict:
    from kumiki.config import load_config
    from launch.engines import run

    extra = [v for v in variant.split(";") if v]
    label = method + (f" ({', '.join(extra)})" if extra else "")
    out = out_root / (f"{method}-{re.sub(r'[^A-Za-z0-9_.=-]', '', variant)}-eps{eps:g}" if extra else f"{method}-eps{eps:g}")
    sets = [f'method.name="{method}"', 'model.norm="group"', f'run.output_dir="{out}"',
            f'run.name="{method}"', *([f"run.rounds={rounds}"] if rounds else []),
            # evaluation never changes training (it runs on a copy): the quick mode evaluates after the last round only
            *([f"eval.every={rounds}"] if last_only and rounds else []),
            *([f"data.samples_per_site={samples}"] if samples else []),
            *([f'data.dataset="{dataset}"'] if dataset else [])]
    if math.isfinite(eps):
        sets += ["privacy.enabled=true", f"privacy.target_epsilon={eps}"]
        if method == "dualfed":  # its two DP fixes (docs/differential-privacy.md)
            sets += ["method.con_lambda=0.0", "privacy.fix_model=true"]
    sets += extra
    cfg = load_config(str(ROOT / "deploy" / "pilot.toml"), sets)
    load0 = os.getloadavg()[0]
    s = run(cfg, "inprocess", quiet=True, overwrite=True)
    p = s.get("privacy") or {}
    spent = p.get("epsilon_per_site", {})
    trained = s["participation"]["trained_rounds"]
    return {"method": label, "eps": eps if math.isfinite(eps) else None,
            "personalized": s["personalized"]["mean"], "global": s["global"]["mean"],
            "site_personalized": site_local(out / method),
            "spent": max(spent.values()) if spent else None, "lo": min(trained.values()) if trained else 0,
            "hi": max(trained.values()) if trained else 0, "rounds": s["rounds"], "wall_s": s["time"]["wall_s"],
            "load": [load0, os.getloadavg()[0]]}


def table(rows: list[dict], cmd: str, quick: bool, missing: list[str] = (), note: str = "") -> str:
    from bench.results import machine

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    loads = [x for r in rows for x in r["load"]]
    rounds = sorted({r["rounds"] for r in rows})
    text = (f"Generated by `{cmd}` on {time.strftime('%Y-%m-%d')} (after issue 21: secret noise, data-free terms "
            "after the noise, per-site ledgers, no metric of a model trained outside DP-SGD sent): the pilot config "
            f"(Fashion-MNIST, 4 factories + 1 unseen, CNN-S with group norm, {'/'.join(map(str, rounds))} rounds, "
            "seed 0, one run per cell), per-site DP-SGD (RDP accountant, delta 1e-5, clip 1, noise solved from the "
            "target over the planned rounds and each method's passes per round), in-process engine. ε is each "
            "site's per-record budget: one training record of a site, in everything the site sends (every tensor, "
            "no training-split metric), against the server and any observer; not the test split (docs/privacy.md). "
            f"{machine()}; load average (1 min) {min(loads):.1f}–{max(loads):.1f} while it ran (shared machine); "
            f"{sum(r['wall_s'] for r in rows):.0f} s of runs. DualFed under DP runs with `con_lambda = 0` and "
            "`privacy.fix_model`; its no-DP row keeps SupCon. Accuracy in %. *personalized (server)*: what the "
            "server received; *withheld* where the site's personalized model was fine-tuned on its training split "
            "outside DP-SGD (FedAvg-FT, FedHB), whose metric stays at the site. *kept at the site*: that site-local "
            "figure (mean of the sites' own logs), outside epsilon, for the operator only.\n\n"
            "| method | target ε | personalized % (server) | kept at the site % | global % | max ε spent "
            "| rounds trained per site |\n|---|---|---|---|---|---|---|\n")
    for r in rows:
        e = "∞ (no DP)" if r["eps"] is None else f"{r['eps']:g}"
        withheld = r["eps"] is not None and r["personalized"] is None
        spent = "–" if r["spent"] is None else f"{r['spent']:.2f}"
        local = pct(r["site_personalized"]) if withheld else "–"
        text += (f"| {r['method']} | {e} | {'withheld' if withheld else pct(r['personalized'])} | {local} | "
                 f"{pct(r['global'])} | {spent} | "
                 f"{r['lo']}–{r['hi']} of {r['rounds']} |\n")
    if missing:
        text += ("\n**Not run** (the machine's load left no time for them; `--resume` on the same `--out` runs just "
                 "these): " + ", ".join(missing) + ".\n")
    if note:
        text += "\n" + note.strip() + "\n"
    if quick:
        text += ("\nQuick mode: 5 rounds instead of the pilot's 10 and one seed, so the noise is solved for 5 planned "
                 "rounds (less noise per step than a 10-round run at the same epsilon); one noise draw per cell; "
                 "evaluated after the last round (`eval.every = 5`).\n")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epsilons", type=float, nargs="+", default=None, help="default 1 4 8 inf (--quick: 1 4 inf)")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--rounds", type=int, default=None, help="default: the pilot's (--quick: 5)")
    ap.add_argument("--quick", action="store_true", help="5 rounds at epsilon 1, 4 and inf")
    ap.add_argument("--out", default="/tmp/kumiki-bench-privacy")
    ap.add_argument("--resume", action="store_true", help="skip the runs already in <out>/rows.jsonl")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: the table of the rows in <out>/rows.jsonl (runs made in parallel streams, merged)")
    ap.add_argument("--command", default=None, help="the command line the table names (default: this one)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--variants", nargs="*", default=[""],
                    help="';'-joined --set lists, one row each ('' = the method's defaults)")
    ap.add_argument("--samples", type=int, default=None, help="data.samples_per_site (default: the pilot's)")
    ap.add_argument("--dataset", default=None, help="data.dataset (default: the pilot's)")
    ap.add_argument("--write-tag", default="privacy")
    ap.add_argument("--note", default="", help="a paragraph under the table (e.g. how some rows were run)")
    args = ap.parse_args(argv)
    epsilons = args.epsilons or ([1.0, 4.0, math.inf] if args.quick else [1.0, 4.0, 8.0, math.inf])
    rounds = args.rounds or (5 if args.quick else None)

    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the sites' threads (client/threads.py)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "rows.jsonl"
    keep = (args.resume or args.table_only) and store.exists()
    rows = [json.loads(line) for line in store.read_text().splitlines() if line.strip()] if keep else []
    if not (args.resume or args.table_only):
        store.write_text("")
    done = {(r["method"], r["eps"]) for r in rows}
    labels = []  # (method, variant, the row's label)
    for method in args.methods:
        for variant in args.variants:
            extra = [v for v in variant.split(";") if v]
            labels.append((method, variant, method + (f" ({', '.join(extra)})" if extra else "")))
    for method, variant, label in labels:
        for eps in epsilons:
            if not math.isfinite(eps) and any(v.startswith("privacy.") for v in variant.split(";")):
                continue  # a privacy-only variant without DP is the default row again
            key = (label, eps if math.isfinite(eps) else None)
            if key in done or args.table_only:
                continue
            r = run_one(method, eps, rounds, out, last_only=args.quick, variant=variant, samples=args.samples,
                        dataset=args.dataset)
            rows.append(r)
            with open(store, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)
    order = {label: i for i, (_, _, label) in enumerate(labels)}
    rows = sorted((r for r in rows if r["method"] in order),
                  key=lambda r: (order[r["method"]], math.inf if r["eps"] is None else r["eps"]))
    cmd = args.command or "bench/privacy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    have = {(r["method"], r["eps"]) for r in rows}
    missing = [f"{label} at ε {'∞' if not math.isfinite(e) else f'{e:g}'}" for _, v, label in labels for e in epsilons
               if (label, e if math.isfinite(e) else None) not in have
               and not (not math.isfinite(e) and any(x.startswith("privacy.") for x in v.split(";")))]
    text = table(rows, cmd.strip(), args.quick, missing, args.note)
    print(text)
    if args.write:
        from bench.results import write_section

        write_section(args.write_tag, text, ROOT / "bench" / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
