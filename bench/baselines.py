"""The results table of docs/results.md ("Baselines on the pilot config"): the four baselines on the pilot config, mean of 3 seeds.

    .venv/bin/python bench/baselines.py [--seeds 0 1 2] [--rounds 10]

Runs on the in-process engine, which is bit-identical to the simulation engine
(tests/test_engines.py) and skips Ray's start-up; prints a Markdown table
(accuracies in %) and writes it to bench/baselines.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import run_grid, table  # noqa: E402
from kumiki.data.sources import fashion_mnist_available  # noqa: E402
from kumiki.config import FMNIST_DEFAULT_DIR  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default="/tmp/kumiki-bench/baselines")
    args = ap.parse_args()
    overrides = [f"run.rounds={args.rounds}"] if args.rounds else []
    if not fashion_mnist_available(FMNIST_DEFAULT_DIR):
        overrides += ['data.dataset="digits"', "data.samples_per_site=300"]
    t0 = time.perf_counter()
    res = run_grid(ROOT / "deploy" / "pilot.toml", ["fedavg", "fedprox", "fedavg_ft", "local"], args.seeds, Path(args.out),
                   overrides=overrides, )
    md = (f"Pilot config (deploy/pilot.toml{', ' + ' '.join(overrides) if overrides else ''}), seeds {args.seeds}, "
          f"mean over seeds; accuracy in %. Total {time.perf_counter() - t0:.0f} s.\n\n" + table(res))
    print(md)
    (ROOT / "bench" / "baselines.md").write_text(md)


if __name__ == "__main__":
    main()
