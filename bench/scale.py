"""1,000 sites on one machine (issue 13 part 7): time per round, memory peak and growth, disk of the site state;
side by side with PFLlib on the same model, partition and threads.

    PYTHONPATH=. .venv/bin/python bench/scale.py [--mode quick|full] [--pfllib DIR] [--write]

The workload: Fashion-MNIST split IID over the sites (60 examples each at 1,000 sites: 48 train, 12 test),
FedPer (the base travels, each site's head is its durable personal state), CNN-S (hidden 128, no normalization
layer: PFLlib averages parameters, never buffers), SGD lr 0.05, batch 16 (three steps per site, no
remainder, in both), one local epoch, 10 % of the sites sampled per round, every site evaluated every round
(PFLlib's ``eval_gap = 1``). ``full``: 1,000 sites, 10 rounds; ``quick``: 100 sites, 4 rounds.

* Kumiki: ``kumiki run --engine inprocess`` of that config (the real ClientApp per message, each site's
  state file written atomically after every round it trains, run outputs, checkpoints), in its own process.
* PFLlib: its own ``FedPer`` server and clients (``flcore/servers/serverper.py``), unchanged, in its own
  process, given the same model object (Kumiki's CNN-S split as PFLlib's ``BaseHeadSplit(base, head)``) and the
  same site data (Kumiki's partition written in PFLlib's ``dataset/<name>/{train,test}/<i>.npz`` format). PFLlib
  is not part of Kumiki: get it with ``git clone https://github.com/TsingZ0/PFLlib`` and pass ``--pfllib
  PATH`` (or set ``PFLLIB_DIR``); without it only Kumiki runs. h5py, which PFLlib needs only to save its
  result file, is replaced by a stub when absent.

Both run one torch thread (``OMP_NUM_THREADS=1``), one after the other on the same machine; per-round time
is the mean over the rounds after the first, in wall seconds and in the CPU seconds of the process; memory is
each process's peak RSS and its RSS after every round (growth: the slope from the second round on). ``--runs N``
repeats the three, alternating their order; every run's raw figures go to ``OUT/scale-results.json``, and
``--from-results FILE...`` rebuilds the section from such files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: RSS slope (MiB per round, rounds 2+) below which memory counts as not growing (allocator noise is ~10 MiB)
GROWTH_MB = 20
MODES = {"quick": {"sites": 100, "rounds": 4}, "full": {"sites": 1000, "rounds": 10}}
DATASET = "KumikiFMNIST"


def rss() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) * 1024
    return float("nan")


def config(sites: int, rounds: int, out: Path, name: str = "scale"):
    from kumiki.config import validate

    return validate({
        "run": {"name": name, "rounds": rounds, "seed": 0, "output_dir": str(out)},
        "method": {"name": "fedper"},
        "data": {"dataset": "fashion-mnist", "sites": sites, "partition": {"kind": "iid"}, "test_fraction": 0.2},
        "model": {"arch": "cnn", "hidden": 128, "norm": "none"},
        "train": {"batch_size": 16, "lr": 0.05, "local_epochs": 1},
        "eval": {"unseen_adapt_epochs": 0},
        "server": {"fraction_train": 0.1, "discovery_timeout_s": 600.0, "round_timeout_s": 3600.0},
    })


# ----------------------------------------------------------------------------- Kumiki
def run_kumiki(sites: int, rounds: int, out: Path) -> dict:
    import torch

    from launch.engines.inprocess import run_inprocess
    from server import recorder as rec

    torch.set_num_threads(1)
    per_round = []
    record = rec.Recorder.round

    def logged(self, rnd, strategy, round_s):
        row = record(self, rnd, strategy, round_s)
        now = time.perf_counter()  # round to round: training, aggregation, evaluation, records, checkpoint
        cpu = time.process_time()
        per_round.append({"round": rnd, "round_s": now - (per_round[-1]["t"] if per_round else t0), "t": now,
                          "cpu_s": cpu - (per_round[-1]["cpu"] if per_round else c0), "cpu": cpu, "rss": rss()})
        print(json.dumps({"kumiki_round": per_round[-1]}), flush=True)
        return row

    rec.Recorder.round = logged
    cfg = config(sites, rounds, out)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = run_inprocess(cfg, quiet=True)
    state = cfg.run_dir() / "state"
    files = [p for p in state.rglob("*") if p.is_file()]
    return {"status": summary["status"], "rounds": per_round, "wall_s": time.perf_counter() - t0,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "state_bytes": sum(p.stat().st_size for p in files), "state_files": len(files),
            "state_disk": _du(state), "site_dirs": sum(1 for p in state.iterdir() if p.is_dir()),
            "sites_with_state": sum(1 for p in files if p.name == "site_state.pt"),
            "personalized": summary["personalized"]["mean"]}


def _du(path: Path) -> int:
    """Bytes the folder takes on disk (blocks, as ``du`` counts them)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- PFLlib
def export_partition(sites: int, rounds: int, out: Path) -> Path:
    """Kumiki's site folders (materialized as the Kumiki run does, same seed) in PFLlib's dataset format."""
    import numpy as np

    from kumiki.data.sites import load_site
    from kumiki.data.prepare import materialize

    cfg = config(sites, rounds, out / "export")
    folders = materialize(cfg, out / "export" / "sites")
    root = out / "pfllib" / "dataset" / DATASET
    for split in ("train", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for i, folder in enumerate(folders):
        d = load_site(folder)
        for split, x, y in (("train", d.x_train, d.y_train), ("test", d.x_test, d.y_test)):
            with open(root / split / f"{i}.npz", "wb") as f:
                np.savez_compressed(f, data={"x": np.asarray(x, np.float32), "y": np.asarray(y, np.int64)})
    (out / "pfllib" / "system").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "export")
    return out / "pfllib"


def run_pfllib(sites: int, rounds: int, pfllib: Path, work: Path, evaluation: str = "shipped") -> dict:
    """PFLlib's FedPer as shipped, or (``evaluation = "test"``) with its per-round training-loss pass over every
    client's training data skipped, so that it evaluates what Kumiki evaluates (each site's test split)."""
    import random

    import numpy as np
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(pfllib / "system"))
    os.chdir(work / "system")  # PFLlib reads ../dataset/<name>/...
    try:
        import h5py  # noqa: F401
    except ImportError:  # PFLlib writes its result file with h5py; the timing never touches it
        class _File:
            def __init__(self, *a, **k): ...
            def __enter__(self): return self
            def __exit__(self, *a): return False
            def create_dataset(self, *a, **k): ...
        sys.modules["h5py"] = types.SimpleNamespace(File=_File)
    from flcore.servers.serverper import FedPer
    from flcore.trainmodel.models import BaseHeadSplit

    from models import build_model
    from server.federation import model_spec

    cfg = config(sites, rounds, work / "cfg")
    model = build_model(model_spec(cfg), cfg.method)
    args = types.SimpleNamespace(
        goal="bench", device="cpu", device_id="0", dataset=DATASET, num_classes=10,
        model=BaseHeadSplit(model.encoder, model.head), batch_size=cfg.train.batch_size,
        local_learning_rate=cfg.train.lr, learning_rate_decay=False, learning_rate_decay_gamma=0.99,
        global_rounds=rounds - 1, top_cnt=100, local_epochs=cfg.train.local_epochs, algorithm="FedPer",
        join_ratio=cfg.server.fraction_train, random_join_ratio=False, num_clients=sites, prev=0, times=1,
        eval_gap=1, save_folder_name="items", auto_break=False, dlg_eval=False, dlg_gap=100,
        batch_num_per_client=2, num_new_clients=0, fine_tuning_epoch_new=0, feature_dim=128, few_shot=0,
        client_drop_rate=0.0, train_slow_rate=0.0, send_slow_rate=0.0, time_select=False, time_threthold=10000)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    t0, c0 = time.perf_counter(), time.process_time()
    server = FedPer(args, 0)
    per_round = []
    aggregate = server.aggregate_parameters

    def logged():  # the last step of each of PFLlib's rounds
        aggregate()
        cpu = time.process_time()
        per_round.append({"round": len(per_round) + 1, "cpu_s": cpu - (per_round[-1]["cpu"] if per_round else c0),
                          "cpu": cpu, "rss": rss()})
        print(json.dumps({"pfllib_round": per_round[-1]}), flush=True)

    server.aggregate_parameters = logged
    if evaluation == "test":
        server.train_metrics = lambda: ([0], [1], [0])  # what PFLlib itself returns when it skips this pass
    server.train()
    for r, s in zip(per_round, server.Budget):
        r["round_s"] = s
    return {"status": "ok", "rounds": per_round, "wall_s": time.perf_counter() - t0,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "personalized": server.rs_test_acc[-1] if server.rs_test_acc else None}


# ----------------------------------------------------------------------------- driver
def _child(which: str, sites: int, rounds: int, out: Path, pfllib: Path | None, evaluation: str = "shipped") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", which, "--sites", str(sites),
           "--rounds", str(rounds), "--out", str(out)]
    if pfllib:
        cmd += ["--pfllib", str(pfllib), "--evaluation", evaluation]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=6 * 3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"status": f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-3:]}"}
    return json.loads(lines[-1])


def summarize(res: dict) -> dict:
    rounds = res.get("rounds", [])
    later = [r["round_s"] for r in rounds[1:] if "round_s" in r] or [r["round_s"] for r in rounds if "round_s" in r]
    slope = None
    if len(rounds) > 2:  # least-squares slope of RSS over rounds 2..R (round 1 loads every site's data once)
        xs, ys = [r["round"] for r in rounds[1:]], [r["rss"] / 2**20 for r in rounds[1:]]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    cpu = [r["cpu_s"] for r in rounds[1:] if "cpu_s" in r]
    return {"per_round_s": statistics.mean(later) if later else None, "peak_gb": res.get("peak_rss", 0) / 2**30,
            "cpu_per_round_s": statistics.mean(cpu) if cpu else None,
            "growth_per_round_mb": slope, "rss_mb": [round(r["rss"] / 2**20) for r in rounds]}


def _x(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def markdown(mode: str, sites: int, rounds: int, runs: list[dict], loads: list[dict], pfllib: Path | None,
             commit: str | None) -> str:
    from bench.results import machine, stamp

    lines = [f"{stamp(f'bench/scale.py --mode {mode}' + (' --pfllib PATH' if pfllib else ''))} {machine()}; "
             f"{sites} sites (10 % sampled per round), {rounds} rounds, FedPer, CNN-S (hidden 128, no norm), "
             f"Fashion-MNIST IID ({60000 // sites} examples a site), batch 16, one torch thread per process; Kumiki, "
             f"PFLlib{f' (commit {commit})' if commit else ''} as shipped and PFLlib evaluating what Kumiki "
             "evaluates, one after the other (the order alternates between runs). Per round, rounds 2 and later: "
             "wall seconds round end to round end, and the CPU seconds the process used (on a machine five "
             "engineers share, wall time also measures their load: the load average each process met is given).",
             "", "| run | framework | wall s / round | Kumiki ÷ this | CPU s / round | Kumiki ÷ this | peak RSS GiB | "
             "Kumiki ÷ this | RSS after each round, MiB | growth, MiB / round (slope, rounds 2+) | load average "
             "start → end |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"kumiki": "Kumiki", "pfllib": "PFLlib as shipped (evaluates every client's test and train split, "
             "with AUC)", "pfllib-test": "PFLlib, test split only (its train-loss pass skipped)"}
    ratios: dict[str, list[tuple]] = {"pfllib": [], "pfllib-test": []}
    growths = []
    for i, (run, load) in enumerate(zip(runs, loads), 1):
        ks = summarize(run["kumiki"])
        growths.append(ks["growth_per_round_mb"])
        for key in ("kumiki", "pfllib", "pfllib-test"):
            res = run.get(key)
            if res is None:
                continue
            if "rounds" not in res:
                lines.append(f"| {i} | {names[key]} | {res.get('status')} | | | | | | | | |")
                continue
            st = summarize(res)
            if key != "kumiki":
                ratios[key].append((ks["per_round_s"] / st["per_round_s"],
                                    ks["cpu_per_round_s"] / st["cpu_per_round_s"]
                                    if ks["cpu_per_round_s"] and st["cpu_per_round_s"] else None,
                                    ks["peak_gb"] / st["peak_gb"]))
            cpu = f"{st['cpu_per_round_s']:.2f}" if st["cpu_per_round_s"] else "–"
            lines.append(f"| {i} | {names[key]} | {st['per_round_s']:.2f} | {_x(ks['per_round_s'], st['per_round_s'])} | "
                         f"{cpu} | {_x(ks['cpu_per_round_s'], st['cpu_per_round_s'])} | {st['peak_gb']:.2f} | "
                         f"{_x(ks['peak_gb'], st['peak_gb'])} | {', '.join(map(str, st['rss_mb']))} | "
                         f"{st['growth_per_round_mb']:+.1f} | {load.get(key, ('', ''))[0]} → {load.get(key, ('', ''))[1]} |")
    k = runs[-1]["kumiki"]
    lines += ["",
              f"Site state on disk after the run: {k['sites_with_state']} of {k['site_dirs']} sites hold a state file "
              f"(the sites sampled at least once; every site's folder also holds its one-line OWNER claim), "
              f"{k['state_files']} files, {k['state_bytes'] / 2**20:.1f} MiB of data ({k['state_disk'] / 2**20:.1f} MiB "
              f"of disk blocks). A state file holds the site's head (FedPer's personal tensors), its last round and "
              f"the run's fingerprint, written atomically (temp, fsync, rename) after every round the site trains. "
              f"PFLlib keeps every client's model in memory and writes nothing per client.", ""]
    for key, label in (("pfllib", "as shipped"), ("pfllib-test", "evaluating the same as Kumiki")):
        if not ratios[key]:
            continue
        wall = [r[0] for r in ratios[key]]
        cpu = [r[1] for r in ratios[key] if r[1] is not None]
        mem = [r[2] for r in ratios[key]]
        decisive = cpu or wall
        lines.append(f"- **Goal: per-round time within 1.1× of PFLlib ({label}): "
                     f"{'met' if max(decisive) <= 1.1 else 'not met'}** (CPU seconds per round: "
                     f"{', '.join(f'{r:.2f}×' for r in cpu) or 'not recorded'}; wall seconds: "
                     f"{', '.join(f'{r:.2f}×' for r in wall)}); **peak memory within 2×: "
                     f"{'met' if max(mem) <= 2 else 'not met'}** ({', '.join(f'{r:.2f}×' for r in mem)}).")
    if not any(ratios.values()):
        lines.append("- **Goals against PFLlib: not measured** (no PFLlib checkout given).")
    flat = all(g is not None and g < GROWTH_MB for g in growths)
    lines.append(f"- **Memory does not grow with rounds: {'met' if flat else 'not met'}** (Kumiki's RSS slope from the "
                 f"second round on: {', '.join(f'{g:+.1f}' for g in growths if g is not None)} MiB per round, bar "
                 f"{GROWTH_MB} MiB; before this issue's fix the in-process grid kept every message, each evaluation "
                 "message with its own copy of the model: at this scale gigabytes a round).")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=tuple(MODES), default="quick")
    ap.add_argument("--pfllib", type=Path, default=os.environ.get("PFLLIB_DIR") or None)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md and the docs (docs/gen.py)")
    ap.add_argument("--from-results", type=Path, nargs="+", help="rebuild the section from saved "
                    "scale-results.json files (written into --out by every run)")
    ap.add_argument("--child", choices=("kumiki", "pfllib"), help=argparse.SUPPRESS)
    ap.add_argument("--sites", type=int, help="override the mode's number of sites")
    ap.add_argument("--rounds", type=int, help="override the mode's number of rounds")
    ap.add_argument("--evaluation", default="shipped", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "kumiki":
        print(json.dumps(run_kumiki(args.sites, args.rounds, args.out)))
        return 0
    if args.child == "pfllib":
        print(json.dumps(run_pfllib(args.sites, args.rounds, args.pfllib, args.out, args.evaluation)))
        return 0

    from bench.results import load, publish

    if args.from_results:  # rebuild the section from saved runs (several files: their runs side by side)
        saved = [json.loads(p.read_text()) for p in args.from_results]
        first = saved[0]
        text = markdown(first["mode"], first["sites"], first["rounds"], [r for s in saved for r in s["runs"]],
                        [x for s in saved for x in s["loads"]], Path("pfllib") if first["pfllib"] else None,
                        first["commit"])
        print(text)
        if args.write:
            publish("scale", text)
        return 0
    sites, rounds = args.sites or MODES[args.mode]["sites"], args.rounds or MODES[args.mode]["rounds"]
    out = args.out or Path(tempfile.mkdtemp(prefix="kumiki-scale-"))
    pfllib = args.pfllib.resolve() if args.pfllib else None
    if pfllib and not (pfllib / "system" / "flcore" / "servers" / "serverper.py").is_file():
        print(f"{pfllib} is not a PFLlib checkout (no system/flcore/servers/serverper.py); Kumiki only", flush=True)
        pfllib = None
    commit = os.environ.get("PFLLIB_COMMIT")
    if pfllib and not commit and (pfllib / ".git").exists():
        commit = subprocess.run(["git", "-C", str(pfllib), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
    work = export_partition(sites, rounds, out) if pfllib else None
    runs, loads = [], []
    for i in range(args.runs):
        run, loaded = {}, {}
        order = ["kumiki", "pfllib", "pfllib-test"] if pfllib else ["kumiki"]
        for key in order if i % 2 == 0 else order[::-1]:
            before = load()
            if key == "kumiki":
                shutil.rmtree(out / "kumiki", ignore_errors=True)
                run[key] = _child("kumiki", sites, rounds, out / "kumiki", None)
            else:
                run[key] = _child("pfllib", sites, rounds, work, pfllib, "shipped" if key == "pfllib" else "test")
            loaded[key] = (before, load())
            print(json.dumps({key: summarize(run[key]) if "rounds" in run[key] else run[key], "load": loaded[key]}),
                  flush=True)
        runs.append(run)
        loads.append(loaded)
        (out / "scale-results.json").write_text(json.dumps(
            {"mode": args.mode, "sites": sites, "rounds": rounds, "commit": commit, "pfllib": bool(pfllib),
             "runs": runs, "loads": loads}))
    if "rounds" not in runs[-1]["kumiki"]:
        print(runs[-1]["kumiki"])
        return 1
    text = markdown(args.mode, sites, rounds, runs, loads, pfllib, commit)
    print(text)
    if args.write:
        publish("scale", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
