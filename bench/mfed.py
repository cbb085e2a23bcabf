"""M-Fed reproduction (issue 9; spec ``mfed.md`` section 10): cross-task encoder sharing vs local and per-task FedAvg.

    .venv/bin/python bench/mfed.py [--data fashion-mnist] [--seeds 0 1] [--rounds 30] [--write]

Eight sites over the four tasks, two each (classification, segmentation mask, edge map, denoising; targets
derived from the images), Dirichlet(0.3) label skew, at most ``--samples`` examples per site (train + test), the
default model (CNN-S, batch norm), each method's defaults (M-Fed: Adam lr 1e-3, batch 32, mu 0.1). Setups:

* ``same``: the two sites of a task share its default decoder (one decoder group per task);
* ``mixed``: the two sites of a task use different decoders (two groups per task: decoders never average, the
  task's sites share only the encoder).

Methods, all on the same sites, data and model (switches of ``method.name = "mfed"``):

* ``mfed``: encoder over all sites, decoders within their group, the prox pull (mu = 0.1);
* ``mfed_bn_personal``: the same with the encoder's BatchNorm statistics kept on each site (the spec's advice where
  a task's inputs differ: denoising sites see noisy images);
* ``encoder_only``: the same without the pull (``decoder_reg = none``): cross-task encoder sharing alone;
* ``per_task_fedavg``: whole-model FedAvg among each task's sites only (``encoder_scope = task``,
  ``decoder_init = from_global``, ``decoder_reg = none``): no cross-task sharing;
* ``local``: nothing travels (``encoder_scope = none``).

Reported: each task's personalized metric (last round, mean over sites and seeds), the multi-task summary
Delta = (1/T) sum_t (-1)^l_t (M_t - M_t,local) / M_t,local (percent; l_t = 1 where lower is better), and the gain
over local of each task's data-poorest site. ``--write`` puts the tables between the ``mfed`` markers of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ("classification", "segmentation", "edges", "denoising")
SETUPS = {
    "same": list(TASKS) * 2,
    "mixed": ["classification", "segmentation", "edges", "denoising",
              "classification/linear", "segmentation/upsample", "edges/convt", "denoising/upsample"],
}
METHODS = {
    "mfed": {},
    "mfed_bn_personal": {"encoder_bn_stats": "personal"},
    "encoder_only": {"decoder_reg": "none"},
    "per_task_fedavg": {"encoder_scope": "task", "decoder_init": "from_global", "decoder_reg": "none"},
    "local": {"encoder_scope": "none"},
}


def config(data: str, setup: str, method: str, seed: int, rounds: int, samples: int, out: Path, tolerance: int = 1):
    from kumiki.config import validate

    return validate({
        "run": {"name": f"{data}-{setup}-{method}-s{seed}", "rounds": rounds, "seed": seed, "output_dir": str(out)},
        "method": {"name": "mfed", "sites": SETUPS[setup], "edge_tolerance_px": tolerance, **METHODS[method]},
        "data": {"dataset": data, "sites": len(SETUPS[setup]), "samples_per_site": samples,
                 "partition": {"kind": "dirichlet", "alpha": 0.3}},
    })


def finished(cfg) -> dict | None:
    """The summary of a finished, complete run of exactly this config in its run dir, else None."""
    import json

    from server.resume import config_changes

    d = cfg.run_dir()
    try:
        summary = json.loads((d / "summary.json").read_text())
        recorded = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return None
    same = not config_changes(recorded, cfg) and summary.get("rounds") == cfg.run.rounds
    return summary if summary.get("status") == "ok" and same else None


def delta(scores: dict[str, float], local: dict[str, float]) -> float:
    """The MTL summary (Maninis et al. 2019): mean relative gain over local, sign by each metric's direction."""
    from kumiki.tasks import TASKS as INFO

    gains = [(1 if INFO[t].higher_is_better else -1) * (scores[t] - local[t]) / abs(local[t]) for t in local]
    return 100 * sum(gains) / len(gains)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="fashion-mnist (default where installed) or digits")
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--mixed-seeds", type=int, nargs="+", default=None, help="seeds of the mixed setup (default: --seeds)")
    ap.add_argument("--edge-tolerance", type=int, default=None,
                    help="edge F-score tolerance in pixels (default: 1, and 0 on digits, whose 8 x 8 edge maps cover "
                         "two thirds of the image: within 1 px every pixel is near an edge)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--samples", type=int, default=500, help="cap on each site's examples (train + test)")
    ap.add_argument("--out", default="/tmp/kumiki-bench-mfed")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="take a finished run of the same config from --out instead "
                                                          "of running it again")
    args = ap.parse_args(argv)

    import torch

    from kumiki.config import FMNIST_DEFAULT_DIR
    from kumiki.data.sources import fashion_mnist_available
    from kumiki.tasks import TASKS as INFO
    from launch.engines import run

    torch.set_num_threads(1)
    data = args.data or ("fashion-mnist" if fashion_mnist_available(FMNIST_DEFAULT_DIR) else "digits")
    tolerance = args.edge_tolerance if args.edge_tolerance is not None else (0 if data == "digits" else 1)
    t0 = time.time()
    text = (f"Generated by `bench/mfed.py` on {time.strftime('%Y-%m-%d')}: {data}, 8 sites (2 per task), "
            f"Dirichlet(0.3), at most {args.samples} examples per site (20% test), {args.rounds} rounds, CNN-S "
            f"(batch norm), Adam lr 1e-3 batch 32, edge tolerance {tolerance} px; last-round personalized "
            "metric, mean over sites and seeds (accuracy, mIoU and F-score in %, PSNR in dB; the noisy inputs "
            "themselves score 12.8 dB). Targets other than the class are derived from the images.\n")
    for setup in args.setups:
        per: dict[str, dict[str, list[float]]] = {}
        poor: dict[str, dict[str, list[float]]] = {}
        unequal = False  # do a task's sites differ in size (Dirichlet without a binding samples cap)?
        glob: dict[str, dict[str, list[float]]] = {}
        secs: dict[str, float] = {}
        seeds = args.mixed_seeds if setup == "mixed" and args.mixed_seeds else args.seeds
        for method in METHODS:
            for seed in seeds:
                cfg = config(data, setup, method, seed, args.rounds, args.samples, Path(args.out), tolerance)
                s = (args.reuse and finished(cfg)) or run(cfg, "inprocess", quiet=True, overwrite=True)
                secs[method] = secs.get(method, 0.0) + s["time"]["wall_s"]
                sizes = s["participation"]["profiles"]
                for task, e in s["tasks"].items():
                    per.setdefault(method, {}).setdefault(task, []).append(e["personalized"]["mean"])
                    if e["global"]:
                        glob.setdefault(method, {}).setdefault(task, []).append(e["global"]["mean"])
                    smallest = min(e["personalized"]["per_site"], key=lambda site: sizes[site]["num_train"])
                    unequal |= len({sizes[site]["num_train"] for site in e["personalized"]["per_site"]}) > 1
                    poor.setdefault(method, {}).setdefault(task, []).append(e["personalized"]["per_site"][smallest])
                print(f"{setup} {method} seed {seed}: " + ", ".join(
                    f"{t} {e['personalized']['mean']:.3f}" for t, e in s["tasks"].items()), flush=True)
        mean = {m: {t: statistics.mean(v) for t, v in d.items()} for m, d in per.items()}
        poorest = {m: {t: statistics.mean(v) for t, v in d.items()} for m, d in poor.items()}
        gmean = {m: {t: statistics.mean(v) for t, v in d.items()} for m, d in glob.items()}

        def fmt(task, v):
            return "–" if v is None else (f"{v:.2f}" if INFO[task].metric == "psnr" else f"{100 * v:.1f}")

        text += (f"\n**{setup}** ({', '.join(SETUPS[setup])}; seeds {', '.join(map(str, seeds))})\n\n| method | "
                 + " | ".join(
            f"{t} {INFO[t].metric}" for t in TASKS) + " | Δ vs local % | global (shared path) | s/run |\n"
            "|---|" + "---|" * (len(TASKS) + 3) + "\n")
        for m in METHODS:
            g = gmean.get(m)
            text += (f"| {m} | " + " | ".join(fmt(t, mean[m].get(t)) for t in TASKS)
                     + f" | {delta(mean[m], mean['local']):+.1f} | "
                     + (" / ".join(fmt(t, g.get(t)) for t in TASKS) if g else "–")
                     + f" | {secs[m] / len(seeds):.0f} |\n")
        if not unequal:
            text += "\nEvery site holds the same number of examples (the samples cap binds): no data-poor site.\n"
            continue
        text += ("\nData-poorest site of each task (fewest training examples), personalized, and its gain over "
                 "local:\n\n| method | " + " | ".join(TASKS) + " |\n|---|" + "---|" * len(TASKS) + "\n")
        for m in METHODS:
            text += f"| {m} | " + " | ".join(
                f"{fmt(t, poorest[m][t])} ({'+' if poorest[m][t] >= poorest['local'][t] else ''}"
                f"{fmt(t, poorest[m][t] - poorest['local'][t])})" for t in TASKS) + " |\n"
    text += f"\n{time.time() - t0:.0f} s in all (in-process engine, one thread per run).\n"
    print(text)
    if args.write:
        from bench.conformance import _write_between

        _write_between(ROOT / "bench" / "RESULTS.md", text, tag=f"mfed-{data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
