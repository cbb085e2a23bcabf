"""Per-round overhead of each engine, and bytes per round, on the same small config.

    .venv/bin/python bench/overhead.py [--sites 3] [--rounds 3] [--engines inprocess simulation local]

The local engine is the real deployment topology (SuperLink + one SuperNode per
site, a fresh ClientApp process per message); the difference to the in-process
engine is Flower's transport and process overhead. Prints a table and ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kumiki.config import validate  # noqa: E402
from launch.engines import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--method", default="fedavg")
    ap.add_argument("--engines", nargs="+", default=["inprocess", "simulation", "local"])
    ap.add_argument("--out", default="/tmp/kumiki-bench/overhead")
    a = ap.parse_args()
    rows = []
    for engine in a.engines:
        cfg = validate({
            "run": {"name": f"{engine}-{a.sites}", "rounds": a.rounds, "output_dir": a.out},
            "method": {"name": a.method},
            "data": {"dataset": "digits", "sites": a.sites, "partition": {"kind": "dirichlet", "alpha": 0.3}},
            "model": {"arch": "mlp", "hidden": 64},
        })
        t0 = time.perf_counter()
        s = run(cfg, engine, quiet=True)
        total = time.perf_counter() - t0
        rows.append((engine, total, s["time"]["per_round_s"], s["bytes"]["up_per_round"], s["bytes"]["down_per_round"]))
        print(f"{engine}: {total:.1f}s total, {s['time']['per_round_s']:.2f}s/round", flush=True)
    base = rows[0][2]
    print(f"\n{a.sites} sites, {a.rounds} rounds, digits MLP, method {a.method}\n")
    print("| engine | total s (incl. start-up) | s / round | x in-process | up B/round | down B/round |")
    print("|---|---|---|---|---|---|")
    for engine, total, per, up, down in rows:
        print(f"| {engine} | {total:.1f} | {per:.2f} | {per / base:.1f} | {up:,} | {down:,} |")


if __name__ == "__main__":
    main()
