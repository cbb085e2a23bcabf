"""Aggregation throughput (issue 13 part 5): K replies of P parameters through the server's real path, against a
memory copy of the same bytes in the same process.

    PYTHONPATH=. .venv/bin/python bench/aggregation.py [--mode quick|full] [--write]

Each cell (K replies, a CNN-S of about P parameters with batch norm: 12 tensors, one integer buffer) runs in its
own process, so its peak memory is its own. In the cell, K train replies are built as Flower messages (what a
site sends: ``ArrayRecord`` of .npy bytes), then, interleaved, best of ``--repeat``:

* ``copy``: every reply's tensor bytes copied into one freshly allocated buffer of the same size (numpy's
  copy, the fastest a process touches every byte once): the yardstick;
* ``kumiki``: ``KumikiStrategy.aggregate_train`` on those messages: every reply check (names, dtypes, shapes,
  example counts, metrics, NaN/inf), the round's K x P matrix, FedAvg's weighted mean, the new model as the
  ``ArrayRecord`` Flower's API returns;
* ``per-tensor``: the path it replaced (``Array.numpy()`` per tensor, a finiteness check per tensor, a float64
  accumulation per tensor per reply), reproduced here for the comparison.

Goal: ``kumiki`` within 2x of ``copy``, in CPU seconds of the process (``time.process_time``: user + system,
page faults included), best of the repeats; wall seconds are printed too but, on a machine five engineers share,
they measure the neighbours as much as the code. One BLAS thread (``--threads``) for every path. ``quick``: K = 10 and 100 at P = 1M, and K = 10 at 25M; ``full`` adds K = 100 at 25M where the
machine has the memory (the replies alone hold 10 GB, the copy another 10; the per-tensor path, which would add
a third, is not run there; a cell that does not fit is reported, not run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CELLS = {"quick": [(10, 1_000_000), (100, 1_000_000), (10, 25_000_000)],
         "full": [(10, 1_000_000), (100, 1_000_000), (10, 25_000_000), (100, 25_000_000)]}
#: Largest K x P x 4 bytes for which the per-tensor path (which copies every reply) is also run
PER_TENSOR_MAX = 4 << 30
#: CNN-S on 28x28: conv layers + fc (3136 x hidden) + head (hidden x 10); hidden chosen for ~P parameters
FC_IN = 3136


def hidden_for(p: int) -> int:
    return max(8, round((p - 18_816) / (FC_IN + 11)))


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1]) * 1024
    return float("nan")


def reset_peak() -> float:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5) and return the RSS now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status("VmRSS")


def peak() -> float:
    return _status("VmHWM")


def cell(k: int, p: int, repeat: int) -> dict:
    import resource
    import time

    import numpy as np
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from kumiki import contract as C, packing
    from kumiki.config import validate
    from kumiki.split import ParamSplit
    from models import ModelSpec, build_model
    from server.federation import build_strategy
    from strategies.base import KumikiStrategy, SiteProfile

    cfg = validate({"run": {"name": "agg", "rounds": 1}, "method": {"name": "fedavg"},
                    "data": {"dataset": "digits", "sites": min(k, 89)}, "server": {"min_reply_fraction": 0.5}})
    spec = ModelSpec("cnn", (1, 28, 28), 10, hidden_for(p), "batch", 0)
    model = build_model(spec, cfg.method)
    initial = {name: v.detach().numpy().copy() for name, v in model.state_dict().items()}
    del model
    job = build_strategy(cfg).job
    strategy = KumikiStrategy(cfg, job, ParamSplit.build(list(initial), cfg.method.split_rules()), initial)
    for nid in range(1, k + 1):
        strategy.profiles[nid] = SiteProfile(nid, f"site-{nid:03d}", "train", "", 1000, 100)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    params = sum(v.size for v in initial.values() if v.dtype.kind == "f")

    def replies(rnd: int) -> list[Message]:
        msgs = strategy.configure_train(rnd, None, ConfigRecord(), None)
        out = []
        for i, m in enumerate(msgs):
            arrays = {n: (v + np.float32(0.001 * (i + 1))) if v.dtype.kind == "f" else v for n, v in initial.items()}
            content = RecordDict({C.METRICS: MetricRecord({C.NUM_EXAMPLES: 100 + i, "train-loss": 1.0})})
            packing.put(content, arrays)  # as a site replies (kumiki/packing.py)
            out.append(Message(content, reply_to=m))
        return out

    def copy(rs):
        datas = [a.data for r in rs for a in r.content[C.ARRAYS].values()]
        buf = np.empty(sum(len(d) for d in datas), np.uint8)
        at = 0
        for d in datas:
            np.copyto(buf[at:at + len(d)], np.frombuffer(d, np.uint8))
            at += len(d)
        return buf

    def per_tensor(rs):  # the replaced path (strategies/aggregate.py and replies.py before issue 13)
        ups, w = [], []
        for r in rs:
            arrays = {}
            for name, v in packing.take(r.content).items():
                if v.dtype.kind in "fc" and not np.isfinite(v).all():
                    raise ValueError(name)
                arrays[name] = v
            ups.append(arrays)
            w.append(float(r.content[C.METRICS][C.NUM_EXAMPLES]))
        w = np.asarray(w) / sum(w)
        out = {}
        for name, first in ups[0].items():
            if first.dtype.kind != "f":
                out[name] = first.copy()
                continue
            acc = np.zeros(first.shape, dtype=np.float64)
            for wk, u in zip(w, ups):
                acc += wk * u[name].astype(np.float64)
            out[name] = acc.astype(first.dtype)
        return C.to_record(out)

    cpu: dict[str, list[float]] = {"copy": [], "kumiki": [], "per-tensor": []}
    wall: dict[str, list[float]] = {n: [] for n in cpu}
    extra: dict[str, list[float]] = {n: [] for n in cpu}
    for rep in range(repeat):
        rs = replies(rep + 1)
        for name, fn in (("copy", copy), ("kumiki", lambda x, r=rep + 1: strategy.aggregate_train(r, x)),
                         ("per-tensor", per_tensor)):
            if name == "per-tensor" and (rep >= 3 or k * p * 4 > PER_TENSOR_MAX):
                continue  # slow and only for comparison: three tries, and only where its copy of every reply fits
            rss0 = reset_peak()
            c0, t0 = time.process_time(), time.perf_counter()
            res = fn(rs)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
            del res
            extra[name].append(peak() - rss0)
        assert strategy.rounds[rep + 1].accepted == k, strategy.rounds[rep + 1].rejected
        del rs
    return {"K": k, "P": int(params), "tensors": len(initial), "reply_mb": params * 4 / 1e6,
            **{n: min(v) for n, v in cpu.items() if v}, **{f"{n} wall": min(v) for n, v in wall.items() if v},
            **{f"{n} extra_mb": max(v) / 1e6 for n, v in extra.items() if v},
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_cells(cells, repeat: int, threads: int) -> list[dict]:
    from bench.results import mem_available

    out = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    for k, p in cells:
        need = (2 + (k * p * 4 <= PER_TENSOR_MAX)) * k * p * 4 * 1.15  # replies, the copy, the per-tensor path
        if mem_available() < need:
            out.append({"K": k, "P": p, "skipped": f"the replies and the yardstick copy need ~{need / 2**30:.0f} GiB, "
                                                    f"{mem_available() / 2**30:.0f} GiB available (Kumiki's path "
                                                    f"itself adds ~{3 * p * 4 / 2**30:.1f} GiB to the replies)"})
            print(out[-1], flush=True)
            continue
        proc = subprocess.run([sys.executable, __file__, "--cell", str(k), str(p), "--repeat", str(repeat)],
                              env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode:
            out.append({"K": k, "P": p, "skipped": f"failed: {proc.stderr.strip().splitlines()[-1:]}"})
        else:
            out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(out[-1], flush=True)
    return out


def markdown(rows: list[dict], mode: str, threads: int, loads: tuple[str, str]) -> str:
    from bench.results import machine, stamp

    lines = [f"{stamp(f'bench/aggregation.py --mode {mode}')} {machine()}; {threads} BLAS thread per path, "
             f"each cell in its own process, the three paths interleaved, best of the repeats, in CPU ms of the "
             f"process (wall ms in brackets). Load average {loads[0]} at the start, {loads[1]} at the end (the "
             "machine is shared by five engineers).", "",
             "| K replies | P parameters | MB per reply | memory copy ms | Kumiki `aggregate_train` ms | × copy | "
             "per-tensor path ms | per-tensor ÷ Kumiki | memory each path adds, MB: copy / Kumiki / per-tensor |",
             "|---|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['K']} | {r['P'] / 1e6:.0f}M | – | – | – | – | – | – | not run: {r['skipped']} |")
            continue
        ratio = r["kumiki"] / r["copy"]
        worst = max(worst, ratio)
        def ms(key):
            return f"{1000 * r[key]:.1f} ({1000 * r[key + ' wall']:.1f})" if key in r else "not run"

        old = f"{r['per-tensor'] / r['kumiki']:.1f}" if "per-tensor" in r else "–"
        lines.append(f"| {r['K']} | {r['P'] / 1e6:.2f}M | {r['reply_mb']:.1f} | {ms('copy')} | {ms('kumiki')} | "
                     f"{ratio:.2f} ({r['kumiki wall'] / r['copy wall']:.2f}) | {ms('per-tensor')} | {old} | "
                     f"{r['copy extra_mb']:.0f} / {r['kumiki extra_mb']:.0f} / {r.get('per-tensor extra_mb', 0):.0f} |")
    ran = [r for r in rows if "skipped" not in r]
    lines += ["", f"- **Goal: within 2× of a memory copy of the same bytes: {'met' if ran and worst <= 2 else 'not met'}"
                  f"** (worst cell {worst:.2f}×{'; cells not run are marked' if len(ran) < len(rows) else ''}). "
                  "No Python loop over tensors does arithmetic: one pass over the replies, in blocks of columns that "
                  "stay in cache, sums each reply (the NaN/inf check) and adds it, weighted, into the mean, reading "
                  "every reply straight from its bytes.",
              "- Memory: the peak RSS each call adds above what the process held before it (the replies are already "
              "in memory: K x MB per reply). FedAvg's round (a plain weighted mean) makes no K x P matrix: the "
              "sum is taken as the replies are checked; robust rules, FedHB and FLoRAL copy the replies into one "
              "(K x MB per reply), as the per-tensor path copied every reply."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md and the docs (docs/gen.py)")
    ap.add_argument("--from-rows", type=Path, help="rewrite the section from a JSON list of the cells' rows a run "
                    "printed, with --loads")
    ap.add_argument("--loads", nargs=2, default=("?", "?"), help=argparse.SUPPRESS)
    ap.add_argument("--cell", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:
        print(json.dumps(cell(*args.cell, args.repeat)))
        return 0
    from bench.results import load, publish

    if args.from_rows:
        rows, loads = json.loads(args.from_rows.read_text()), tuple(args.loads)
    else:
        before = load()
        rows = run_cells(CELLS[args.mode], args.repeat, args.threads)
        loads = (before, load())
    text = markdown(rows, args.mode, args.threads, loads)
    print(text)
    if args.write:
        publish("aggregation", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
