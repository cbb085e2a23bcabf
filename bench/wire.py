"""Bytes on the wire (issue 13 part 6): per round, per method, against the full model; float16 transport and its
accuracy cost on the pilot.

    PYTHONPATH=. .venv/bin/python bench/wire.py [--mode quick|full] [--write]

Bytes: every registered method (``kumiki methods``) runs one round in-process with its defaults, once with
``server.transport_dtype = "float32"`` and once with ``"float16"``; the bytes are the real ``ArrayRecord`` sizes of
the messages the grid carried (tensor data, .npy headers and names; FedHB's precision travels in ``extra`` and is
counted in its messages). The full model is every tensor of the method's model (shared, personal and BN buffers)
in float32: what a site would send if nothing stayed home. ``full`` runs on the pilot config
(deploy/pilot.toml: Fashion-MNIST, CNN-S); ``quick`` on digits with the MLP.

Accuracy: the pilot (``full``: deploy/pilot.toml with FedAvg-FT, ``bench.common.PILOT_MEASURED``, 10 rounds,
seeds 0-2) with float32 and float16 transport, the same seeds side by side; ``quick``: digits, 3 sites, 5 rounds, seed 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kumiki import contract as C  # noqa: E402
from kumiki.config import KumikiConfig, load_config, validate  # noqa: E402
from kumiki.registry import METHODS  # noqa: E402


def config(mode: str, out: Path, name: str, method: str | None, transport: str, rounds: int, seed: int = 0,
           extra: list[str] | None = None) -> KumikiConfig:
    if mode == "full":
        sets = [f'run.name="{name}"', f'run.output_dir="{out}"', f"run.rounds={rounds}", f"run.seed={seed}",
                f'server.transport_dtype="{transport}"', *(extra or [])]
        if method:
            sets.append(f'method.name="{method}"')
            return load_config(str(ROOT / "deploy" / "pilot.toml"), sets)
        from bench.common import pilot_config  # the accuracy runs: FedAvg-FT, as when the table was measured

        return pilot_config(sets)
    raw = {"run": {"name": name, "rounds": rounds, "seed": seed, "output_dir": str(out)},
           "method": {"name": method or "fedavg_ft"},
           "data": {"dataset": "digits", "sites": 3, "unseen_sites": 1, "partition": {"kind": "dirichlet", "alpha": 0.3}},
           "model": {"arch": "mlp", "hidden": 64}, "server": {"transport_dtype": transport}}
    if extra:
        raw["eval"] = {"unseen_adapt_epochs": 0}
    return validate(raw)


def full_model_bytes(cfg: KumikiConfig) -> int:
    """Every tensor of the method's model in float32, serialized as a message carries it (data, .npy headers
    and names counted as in the messages)."""
    from models import build_model
    from server.federation import model_spec

    state = build_model(model_spec(cfg), cfg.method).state_dict()
    return C.to_record({k: v.float() if v.is_floating_point() else v for k, v in state.items()}).count_bytes()


def message_bytes(msg) -> int:
    content = msg.content
    return sum(content[k].count_bytes() for k in (C.ARRAYS, C.EXTRA) if k in content.array_records)


def one_round(mode: str, out: Path, method: str, transport: str) -> dict:
    from launch.engines.inprocess import run_inprocess

    grids = []
    cfg = config(mode, out, f"{method}-{transport}", method, transport, 1, extra=["eval.unseen_adapt_epochs=0"])
    summary = run_inprocess(cfg, quiet=True, grid_hook=grids.append)
    grid = grids[0]
    kinds = {"train": [], "evaluate": []}
    for m in grid.sent:
        if m.metadata.message_type in kinds:
            kinds[m.metadata.message_type].append(message_bytes(m))
    ups = [message_bytes(r) for r in grid.replies if not r.has_error() and r.metadata.message_type == "train"]
    return {"method": method, "transport": transport, "full": full_model_bytes(cfg), "status": summary["status"],
            "down_train": statistics.mean(kinds["train"] or [0]), "down_eval": statistics.mean(kinds["evaluate"] or [0]),
            "up": statistics.mean(ups or [0]), "replies": len(ups), "train_messages": len(kinds["train"])}


def accuracy(mode: str, out: Path, seeds: list[int], rounds: int) -> list[dict]:
    from launch.engines.inprocess import run_inprocess

    rows = []
    for seed in seeds:
        for transport in ("float32", "float16"):
            cfg = config(mode, out, f"acc-{transport}-s{seed}", None, transport, rounds, seed)
            t0 = time.perf_counter()
            s = run_inprocess(cfg, quiet=True)
            rows.append({"seed": seed, "transport": transport, "personalized": s["personalized"]["mean"],
                         "global": s["global"]["mean"], "unseen": (s["unseen"] or {}).get("mean"),
                         "unseen_adapted": (s["unseen_adapted"] or {}).get("mean"),
                         "up": s["bytes"]["up_per_round"], "down": s["bytes"]["down_per_round"],
                         "seconds": time.perf_counter() - t0, "status": s["status"]})
            print(rows[-1], flush=True)
    return rows


def _kib(b: float) -> str:
    return f"{b / 1024:,.1f}"


def markdown(mode: str, bytes_rows: list[dict], acc_rows: list[dict], loads: tuple[str, str], seconds: float) -> str:
    from bench.results import machine, stamp

    data = ("the pilot config (deploy/pilot.toml: Fashion-MNIST, CNN-S, 4 + 1 sites)" if mode == "full"
            else "digits, MLP (hidden 64), 3 + 1 sites")
    lines = [f"{stamp(f'bench/wire.py --mode {mode}')} {machine()}; {data}, in-process engine, one thread; "
             f"{seconds / 60:.0f} min, load average {loads[0]} at the start, {loads[1]} at the end.", "",
             "Per site per round, from the messages each method's one-round run actually carried (train message "
             "down, its reply up, evaluation message down), against the method's full model (every tensor, shared, "
             "personal and buffers, in float32, serialized the same way):", "",
             "| method | full model KiB | train down KiB (× full) | up KiB (× full) | evaluate down KiB | "
             "float16: train down KiB | float16: up KiB | float16 ÷ float32 (down, up) |",
             "|---|---|---|---|---|---|---|---|"]
    by = {(r["method"], r["transport"]): r for r in bytes_rows}
    for method in METHODS:
        a, h = by.get((method, "float32")), by.get((method, "float16"))
        if a is None or h is None:
            continue
        f = a["full"]

        def x(v):
            return f"{v / f:.2f}" if f else "-"

        def q(v, w):
            return f"{v / w:.2f}" if w else "–"

        lines.append(f"| {method} | {_kib(f)} | {_kib(a['down_train'])} ({x(a['down_train'])}) | {_kib(a['up'])} "
                     f"({x(a['up'])}) | {_kib(a['down_eval'])} | {_kib(h['down_train'])} | {_kib(h['up'])} | "
                     f"{q(h['down_train'], a['down_train'])}, {q(h['up'], a['up'])} |")
    bad = [r for r in bytes_rows if r["status"] != "ok"]
    pct = "{:.1f}".format
    lines += ["", f"Accuracy cost of float16 transport ({'the pilot with FedAvg-FT, 10 rounds' if mode == 'full' else 'digits, 5 rounds'}; "
              "last-round means over sites, %):", "",
              "| seed | transport | personalized | global | unseen | unseen adapted | up KiB / round | down KiB / round |",
              "|---|---|---|---|---|---|---|---|"]
    for r in acc_rows:
        lines.append(f"| {r['seed']} | {r['transport']} | {pct(100 * r['personalized'])} | {pct(100 * r['global'])} | "
                     f"{pct(100 * (r['unseen'] or 0))} | {pct(100 * (r['unseen_adapted'] or 0))} | {_kib(r['up'])} | "
                     f"{_kib(r['down'])} |")
    diffs = {}
    for key in ("personalized", "global", "unseen"):
        pairs = [(a[key], b[key]) for a in acc_rows for b in acc_rows if a["seed"] == b["seed"]
                 and a["transport"] == "float32" and b["transport"] == "float16" and a[key] is not None]
        if pairs:
            diffs[key] = statistics.mean(100 * (b - a) for a, b in pairs)
    ratio = [by[(m, "float16")]["down_train"] / by[(m, "float32")]["down_train"] for m in METHODS
             if (m, "float16") in by and by[(m, "float32")]["down_train"]]
    lines += ["",
              f"- **Bytes per round against the full model: measured for all {len({r['method'] for r in bytes_rows})} "
              f"methods** (table above): `local` sends nothing; FedPer, FedRep, DualFed and the local adaptors keep "
              f"their personal parts home (on CNN-S the heads are small: 0.91–1.00× the full model); FedHB sends "
              f"its precision beside the model (2× down); everything else sends the whole model but the router "
              f"or BN state it keeps.{' Runs not ok: ' + ', '.join(r['method'] for r in bad) if bad else ''}",
              f"- **float16 transport: {min(ratio):.2f}–{max(ratio):.2f}× the float32 bytes down** (tensor data "
              "halves; .npy headers, names, integer buffers and FedHB's float32 precision do not), up likewise; "
              "accuracy change float16 − float32, mean over seeds: "
              + ", ".join(f"{k} {v:+.1f} points" for k, v in diffs.items()) + "."]
    return "\n".join(lines)


def from_log(path: Path) -> tuple[list[dict], list[dict]]:
    """The rows a run printed (one Python dict per line), to rewrite its section without running it again."""
    import ast

    rows = [ast.literal_eval(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return [r for r in rows if "method" in r], [r for r in rows if "seed" in r]


def main(argv=None) -> int:
    import torch

    from bench.results import load, publish

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md and the docs (docs/gen.py)")
    ap.add_argument("--from-log", type=Path, help="rewrite the section from an earlier run's printed rows (no run; load and duration unknown)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.from_log:
        bytes_rows, acc_rows = from_log(args.from_log)
        text = markdown(args.mode, bytes_rows, acc_rows, ("?", "?"), 0)
        print(text)
        if args.write:
            publish("wire", text)
        return 0
    out = args.out or Path(tempfile.mkdtemp(prefix="kumiki-wire-"))
    before, t0 = load(), time.perf_counter()
    bytes_rows = []
    for method in args.methods:
        for transport in ("float32", "float16"):
            bytes_rows.append(one_round(args.mode, out / "bytes", method, transport))
            print(bytes_rows[-1], flush=True)
    acc_rows = accuracy(args.mode, out / "accuracy", [0, 1, 2] if args.mode == "full" else [0],
                        10 if args.mode == "full" else 5)
    text = markdown(args.mode, bytes_rows, acc_rows, (before, load()), time.perf_counter() - t0)
    print(text)
    if args.write:
        publish("wire", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
