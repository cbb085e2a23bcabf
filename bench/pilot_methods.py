"""The pilot's leaderboard (issue 24): which method makes each factory better than training alone, and where
(with how many images per factory) joining pays at all.

    .venv/bin/python bench/pilot_methods.py                               # quick: a few minutes on 2 cores
    .venv/bin/python bench/pilot_methods.py --mode full --jobs 2 --write   # the table in bench/RESULTS.md + docs
    .venv/bin/python bench/pilot_methods.py --mode full --part sweep --write   # the data-size sweep only

**Leaderboard** (``--part board``): every registered method whose config validates for the pilot
(``deploy/pilot.toml``: Fashion-MNIST, 4 training factories + 1 new one, 600 images each) runs at each seed
on the same factory data as the local-only baseline (``method.name = local``: each factory alone) at that
seed: ``data.partition_seed`` is fixed, so a seed pair differs only in the training randomness. Every run
uses the in-process engine (the same ServerApp and ClientApp code as the pilot, without sockets) and
evaluates only at the reported rounds (``eval.every``), which changes no training. A run first goes to the
pilot's 10 rounds; its ``summary.json`` is kept, then it is resumed (``--resume``: as if it had never
stopped) to 30 rounds. Per method and round count: each factory's gain over alone (mean ± std over the seeds),
the mean gain (± its spread over seeds), the factories worse off, whether the issue-24 goal holds, and the
bytes a run moved. Ranking and definitions: ``server/leaderboard.py``. Methods run with their own defaults
(knobs and paper optimizer): no knob is tuned here, so nothing is chosen on test.

**Sweep** (``--part sweep``): the same comparison for one method (``--sweep-method``, default the pilot's)
at other amounts of data per factory: ``data.samples_per_site`` (images per factory, train + test, 80/20)
60, 150, 600 and 2,400 each, and the unequal mix 60/300/1,200/2,400 (the new factory keeps 600), at the
pilot's 10 rounds. ``--write`` also draws ``docs/img/pilot_sweep.svg`` and keeps its numbers in
``docs/img/pilot_sweep.json``, which ``kumiki pilot`` copies into its report.

**Refit** (``--part refit``): runs made with ``--measure-refit METHODS`` (``safeguard.measure_refit``: each site
also scores on test the safeguard's chosen side refit on its whole training split, without serving it, so
nothing else in the tables changes) give, per group of runs, the refit against what is served, both on test
(docs/safeguard.md, "The refit").

Modes: ``quick`` (a smoke test of the whole path, numbers not for reading: 3 methods, 1 seed, 2 and 4
rounds, sweep 60 and 150 images, 2 rounds) and ``full`` (every method, 3 seeds, 10 and 30 rounds; the sweep at
3 seeds, 10 rounds). ``--seeds`` / ``--methods`` / ``--rounds`` narrow a mode; the table says exactly what
produced it. Finished runs are cached under ``--workdir`` (a rerun computes only what is missing; ``--fresh``
starts over), and the table is written from whatever finished, each row with its number of seed pairs.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PILOT = ROOT / "deploy" / "pilot.toml"
TAG = "pilot-methods"
SWEEP_TAG = "pilot-sweep"
SWEEP_JSON = ROOT / "docs" / "img" / "pilot_sweep.json"
SWEEP_SVG = ROOT / "docs" / "img" / "pilot_sweep.svg"
#: regimes of the sweep: label -> images per factory (training factories in order; the new factory keeps 600)
SWEEP = {"60 each": [60] * 4, "150 each": [150] * 4, "600 each (the pilot)": [600] * 4,
         "2,400 each": [2400] * 4, "unequal 60/300/1,200/2,400": [60, 300, 1200, 2400]}
UNSEEN_IMAGES = 600
#: methods refused on image data (language only) are left out by their config error; these need a setting
#: to be an image-classification method at all (not a tuned knob: the task itself)
AS_CLASSIFIER = {"mfed": ['method.tasks=["classification"]']}
MODES = {
    "quick": {"methods": ["fedavg_ft", "fedper", "ditto"], "seeds": 1, "rounds": [2, 4],
              "sweep": ["60 each", "150 each"], "sweep_rounds": 2, "sweep_seeds": 1},
    "full": {"methods": None, "seeds": 3, "rounds": [10, 30], "sweep": list(SWEEP), "sweep_rounds": 10,
             "sweep_seeds": 3},
}


def image_methods() -> tuple[list[str], dict[str, str]]:
    """The registered methods whose config validates for the pilot (``local`` is the baseline), and why the
    others are left out."""
    from kumiki.config import ConfigError, load_config
    from kumiki.registry import METHODS

    ok, refused = [], {}
    for name in METHODS:
        if name == "local":
            continue
        try:
            load_config(PILOT, [f'method.name="{name}"', *AS_CLASSIFIER.get(name, [])])
            ok.append(name)
        except ConfigError as exc:
            refused[name] = " ".join(str(exc).split())[:200]
    return ok, refused


def overrides(method: str, seed: int, rounds: int, sizes: list[int] | None, out: Path, name: str,
              every: int, extra: list[str] | None = None) -> list[str]:
    """The pilot's config for one run; ``every`` (eval.every) is the same at every stage of a resumed run;
    ``extra``: a tuned knob, or the validation folders (``validation_overrides``)."""
    sets = [f'method.name="{method}"', *AS_CLASSIFIER.get(method, []), f'run.name="{name}"',
            f'run.output_dir="{out}"', f"run.seed={seed}", "data.partition_seed=0", f"run.rounds={rounds}",
            f"eval.every={every}", *(extra or [])]
    if sizes is not None:
        per = [*sizes, UNSEEN_IMAGES]
        sets.append(f"data.samples_per_site={per[0] if len(set(per)) == 1 else per}")
    return sets


def regime_key(label: str | None) -> str | None:
    """The run-name tail of a sweep regime; None for the pilot's own sizes (those runs are the leaderboard's)."""
    if label is None or SWEEP[label] == [600] * 4:
        return None
    return "".join(c for c in label if c.isalnum() or c == "/").replace("/", "-")


def run_name(method: str, seed: int, regime: str | None, tail: str | None = None) -> str:
    key = regime_key(regime)
    return f"{method}-s{seed}" + (f"-{key}" if key else "") + (f"-{tail}" if tail else "")


def snap_dir(work: Path, name: str, rounds: int, root: str = "snap") -> Path:
    return work / root / f"{name}-r{rounds}"


def done(work: Path, name: str, rounds: int, root: str = "snap") -> bool:
    s = snap_dir(work, name, rounds, root) / "summary.json"
    try:
        return json.loads(s.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------- tuning without peeking
VAL_FRACTION = 0.2
#: ``--measure-refit``: the key that makes a run also score the safeguard's refit (docs/safeguard.md, "The refit")
MEASURE = ["safeguard.measure_refit=true"]


def validation_sites(cfg, root: Path, fraction: float = VAL_FRACTION, seed: int = 0) -> Path:
    """``cfg``'s factories without their test split: each factory's training split is cut (seeded) into a
    training part and a validation part (``fraction`` of it), written as the folder's train.npz and test.npz.
    A run on these folders (``validation_overrides``) is scored on validation images only: a knob or a method
    chosen on it never saw a test image, and the test images are not even on disk beside it."""
    import numpy as np

    from kumiki.data.prepare import materialize
    from kumiki.data.sites import write_site

    full = materialize(cfg, root / "with-test")
    out = root / "validation"
    for d in full:
        meta = json.loads((d / "site.json").read_text())
        with np.load(d / "train.npz") as tr:
            x, y = tr["x"], tr["y"]
        idx = np.random.default_rng([seed, 24]).permutation(len(y))
        n_val = max(1, int(round(len(y) * fraction)))
        write_site(out / d.name, {**meta, "split": f"validation: {n_val} of the {len(y)} training images"},
                   x[idx[n_val:]], y[idx[n_val:]], x[idx[:n_val]], y[idx[:n_val]])
    shutil.rmtree(root / "with-test")
    return out


def validation_overrides(cfg, folders: Path) -> list[str]:
    """The config keys that point a pilot run at the validation folders (the same images, the same cameras)."""
    from server.federation import model_spec

    spec = model_spec(cfg)
    return ['data.dataset="site-folders"', f'data.path="{folders}"', f"data.input_shape={list(spec.input_shape)}",
            f"data.num_classes={spec.num_classes}", "data.site_names=[]", "data.domains=[]"]


def parse_tune(text: str) -> tuple[str, list[str]]:
    """``method.ft_lr=0.005,0.01,0.02`` -> (``method.ft_lr``, the candidate values as TOML)."""
    key, sep, values = text.partition("=")
    cands = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip().startswith("method.") or len(cands) < 2:
        raise ValueError(f"--tune {text!r}: give a method knob and at least two values, e.g. method.ft_lr=0.005,0.01")
    return key.strip(), cands


def tune_section(work: Path, method: str, key: str, cands: list[str], seeds: list[int], rounds: int,
                 command: str, loads: tuple[str, str]) -> tuple[str, dict]:
    """Each candidate's gain over alone on validation, and the one chosen (highest mean gain)."""
    from bench.results import machine, stamp
    from server.leaderboard import board

    entries = []
    for v in cands:
        found = collect(work, [method], seeds, rounds, None, tail=f"val-{knob_tag(key, v)}", alone_tail="val")
        if method in found:
            entries.append((f"{key} = {v}", found[method][0], found[method][1]))
    rows = board(entries, rounds=rounds)
    chosen = rows[0]["method"] if rows else None
    text = [f"{stamp(command)}{' ' + NOTE if NOTE else ''} {method}, {key} in {{{', '.join(cands)}}}, seeds {', '.join(map(str, seeds))}, "
            f"{rounds} rounds, scored on **validation** ({int(VAL_FRACTION * 100)}% of each factory's training "
            f"images; its test images were not on disk). Machine: {machine()}; load {loads[0]} before, {loads[1]} "
            "after.", "", *board_table(rows, sorted({s for r in rows for s in r["sites"]})), "",
            f"Chosen on validation: **{chosen}**." if chosen else "(no finished runs)"]
    return "\n".join(text), {"key": key, "chosen": chosen, "rows": rows}


def knob_tag(key: str, value: str) -> str:
    return key.split(".", 1)[1] + "-" + "".join(c if c.isalnum() or c in ".-" else "_" for c in value)


def set_aside_pre_safeguard(work: Path) -> list[str]:
    """Federated runs from before the safeguard existed (their config.json has no ``safeguard`` section) move to
    ``snap-pre-safeguard/`` and run again: a table never mixes runs with and without it. Local-only runs stay
    (the safeguard does not apply to them: the same computation either way)."""
    moved = []
    for d in sorted((work / "snap").glob("*")):
        try:
            cfg = json.loads((d / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if "safeguard" not in cfg and (cfg.get("method") or {}).get("name") != "local":
            dest = work / "snap-pre-safeguard" / d.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            d.rename(dest)
            moved.append(d.name)
    return moved


def run_task(task: dict) -> dict:
    """Run (or resume) one run to each of ``task['rounds']`` in turn; keep its summary at each."""
    import torch

    from kumiki.config import load_config
    from launch.engines.inprocess import run_inprocess

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    work, name = Path(task["work"]), task["name"]
    out = work / "runs"
    t0 = time.perf_counter()
    log = []
    lock = work / "locks" / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:  # another bench process (same --workdir) may be running this one: leave it to that one
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return {"name": name, "seconds": 0.0, "log": [f"{name}: running in another process ({lock})"]}
    try:
        for r in task["rounds"]:
            if done(work, name, r):
                continue
            cfg = load_config(PILOT, overrides(task["method"], task["seed"], r, task["sizes"], out, name,
                                               task["every"], task.get("extra")))
            rd = cfg.run_dir()
            resume = False
            if (rd / "summary.json").is_file():
                try:
                    prev = json.loads((rd / "summary.json").read_text())
                    resume = prev.get("status") == "ok" and int(prev.get("rounds") or 0) < r
                except (OSError, ValueError):
                    resume = False
            t1 = time.perf_counter()
            run_inprocess(cfg, quiet=True, overwrite=not resume, resume=resume)
            snap = snap_dir(work, name, r)
            snap.mkdir(parents=True, exist_ok=True)
            for f in ("summary.json", "config.json"):
                shutil.copy2(rd / f, snap / f)
            log.append(f"{name} r{r}: {time.perf_counter() - t1:.0f}s{' (resumed)' if resume else ''}")
    except Exception as exc:  # noqa: BLE001 - a failed run is a missing cell, reported, not a crashed bench
        return {"name": name, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:],
                "seconds": time.perf_counter() - t0, "log": log}
    finally:
        lock.unlink(missing_ok=True)
    return {"name": name, "seconds": time.perf_counter() - t0, "log": log}


def tasks_for(work: Path, methods: list[str], seeds: list[int], rounds: list[int], regime: str | None,
              sizes: list[int] | None, variants: list[tuple[str, list[str]]] | None = None,
              alone: tuple[str | None, list[str]] = (None, []), measure: tuple[str, ...] = ()) -> list[dict]:
    """local and every method at every seed (seed 0 of every method first: a table cut short still ranks every
    method); ``variants``: (name tail, extra keys) of each method run (a tuned knob's candidates), ``alone``:
    the local runs' (tail, extra keys); ``measure``: the methods whose runs also measure the safeguard's refit
    (``safeguard.measure_refit``: scored, not served, so the table's numbers are the same)."""
    out = []
    for seed in seeds:
        runs = [("local", *alone)] + [(m, t, [*e, *(MEASURE if m in measure else [])])
                                      for m in methods for t, e in (variants or [(None, [])])]
        for m, tail, extra in runs:
            out.append({"work": str(work), "name": run_name(m, seed, regime, tail), "method": m, "seed": seed,
                        "rounds": rounds, "sizes": sizes, "every": math.gcd(*rounds), "extra": extra})
    return out


def execute(tasks: list[dict], jobs: int) -> None:
    todo = [t for t in tasks if not all(done(Path(t["work"]), t["name"], r) for r in t["rounds"])]
    print(f"{len(todo)} run(s) to do ({len(tasks) - len(todo)} cached); load {os.getloadavg()[0]:.2f}", flush=True)
    if not todo:
        return
    if jobs > 1:
        with mp.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
            for res in pool.imap_unordered(run_task, todo):
                report(res)
    else:
        for t in todo:
            report(run_task(t))


def report(res: dict) -> None:
    if "error" in res:
        print(f"FAILED {res['name']}: {res['error']}\n{res.get('trace', '')}", flush=True)
    for line in res.get("log", []):
        print(f"  {line}  (load {os.getloadavg()[0]:.2f}, {time.strftime('%H:%M:%S')})", flush=True)


# ----------------------------------------------------------------------------- the tables

def collect(work: Path, methods: list[str], seeds: list[int], rounds: int, regime: str | None,
            tail: str | None = None, alone_tail: str | None = None, root: str = "snap") -> dict:
    """Per method: its comparison against local (the seed pairs that both finished) and its bytes."""
    from server.compare import compare
    from server.leaderboard import bytes_moved

    alone = {s: snap_dir(work, run_name("local", s, regime, alone_tail), rounds) for s in seeds}
    alone = {s: d for s, d in alone.items() if done(work, run_name("local", s, regime, alone_tail), rounds)}
    out = {}
    for m in methods:
        joined = {s: snap_dir(work, run_name(m, s, regime, tail), rounds, root) for s in seeds
                  if done(work, run_name(m, s, regime, tail), rounds, root)}
        pairs = sorted(set(joined) & set(alone))
        if not pairs:
            continue
        comp = compare([joined[s] for s in pairs], [alone[s] for s in pairs])
        sums = [json.loads((joined[s] / "summary.json").read_text()) for s in pairs]
        out[m] = (comp, bytes_moved(sums))
    return out


def pts(x: float | None, sd: float | None = None) -> str:
    if x is None:
        return "–"
    return f"{round(100 * x, 1) + 0.0:+.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")  # never "-0.0"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "–"
    return "0" if b == 0 else f"{b / 2**20:.0f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def board_table(rows: list[dict], sites: list[str]) -> list[str]:
    """Per factory the gain of what it deploys (with the safeguard: the served model; its choice over the seed
    pairs, own / joined), the mean gain, and the personalized model's own mean gain beside it."""
    head = ("| rank | method | seed pairs | " + " | ".join(sites)
            + " | mean gain | personalized model's mean gain | factories worse off | goal | bytes per run |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = []
        for s in sites:
            v = r["sites"].get(s)
            pick = (r.get("serves") or {}).get(s) or {}
            cells.append("–" if v is None else pts(v["mean"], v["std"])
                         + (f" (own {pick.get('own', 0)}/{sum(pick.values())})" if pick else ""))
        joined = r.get("joined") or {}
        lines.append(f"| {r['rank']} | {r['method']}{' + safeguard' if r.get('safeguard') else ''} | {r['pairs']} | "
                     + " | ".join(cells)
                     + f" | **{pts(r['mean_gain'], r['mean_gain_std'])}** | {pts(joined.get('mean_gain'), joined.get('mean_gain_std'))}"
                     + f" | {len(r['worse_off']) or 'none'}" + (f" ({', '.join(r['worse_off'])})" if r["worse_off"] else "")
                     + f" | {'met' if r['goal'] else 'not met'} | {fmt_bytes(r['bytes'])} |")
    return lines


#: ``--note``: said after the command that wrote a table (which commands made its cached runs)
NOTE = ""


def board_section(work: Path, methods: list[str], refused: dict[str, str], seeds: list[int], rounds: list[int],
                  mode: str, command: str, loads: tuple[str, str]) -> tuple[str, dict]:
    from bench.results import machine, stamp
    from server.leaderboard import board

    text = [f"{stamp(command)}{' ' + NOTE if NOTE else ''} Mode `{mode}`: methods {', '.join(methods)}; seeds {', '.join(map(str, seeds))} "
            f"(each paired with local-only at the same seed, same factory data: `data.partition_seed = 0`); "
            f"rounds {' and '.join(map(str, rounds))}{' (the longer run resumes the shorter one)' if len(rounds) > 1 else ''}; "
            f"in-process engine; "
            f"`deploy/pilot.toml` otherwise (Fashion-MNIST, 600 images per factory, 80/20 train/test). "
            f"Machine: {machine()}; load average {loads[0]} before, {loads[1]} after (shared with other jobs).", ""]
    boards = {}
    for r in rounds:
        found = collect(work, methods, seeds, r, None)
        rows = board([(m, c, b) for m, (c, b) in found.items()], rounds=r)
        boards[r] = rows
        sites = sorted({s for row in rows for s in row["sites"]})
        text += [f"**{r} rounds** (gain over alone in accuracy points, mean ± std over the seed pairs; "
                 f"{len(rows)} of {len(methods)} methods finished):", ""]
        text += board_table(rows, sites) if rows else ["(no finished runs)"]
        text.append("")
    snapshots = {  # earlier code's runs, each in its own table so that no table mixes versions
        "snap-pre-safeguard": "Without the safeguard, {r} rounds (runs made before it was merged: the personalized "
                              "model, trained on all training images; the same local-only runs):",
    }
    for root, caption in snapshots.items():
        for r in rounds:
            found = collect(work, methods, seeds, r, None, root=root)
            if not found:
                continue
            rows = board([(m, c, b) for m, (c, b) in found.items()], rounds=r)
            text += [caption.format(r=r), ""]
            text += board_table(rows, sorted({s for row in rows for s in row["sites"]}))
            text.append("")
    if refused:
        text.append("Left out (their configs refuse the pilot's image data): "
                    + "; ".join(f"{m} ({why})" for m, why in refused.items()) + ".")
    text.append("Gain = what the factory deploys minus alone, test accuracy in points: with the safeguard "
                "(`+ safeguard`, on by default) the served model: the better on the factory's validation split of "
                "its personalized model and its own (own k/n: the own side served in k of n seed pairs), served as "
                "trained (docs/safeguard.md); without it the personalized model. Alone = local-only at the same seed "
                "(it trains on all its training images; a safeguarded site holds 15% out as validation, and neither "
                "of its models trains on them). Mean gain = the mean over the 4 training "
                "factories (± its std over seeds). Worse off: gain + std < 0 (one seed pair has no spread: any loss). Goal (issue 24): every factory's "
                "gain ≥ −its std and mean gain ≥ +3 points. Ranked by mean gain. Bytes: up + down, whole run. "
                "No knob was tuned: every method runs with its own defaults, so nothing was chosen on test.")
    return "\n".join(text), boards


REFIT_TAG = "safeguard-refit"


def refit_rows(work: Path, groups: list[tuple[str, str, list[int], int, str | None]]) -> list[dict]:
    """Per group (label, method, seeds, rounds, regime) of runs made with ``--measure-refit``: over the
    factory-seed pairs, the served model (chosen on validation, served as trained) against the chosen side refit
    on the whole training split, both on test; the choice is the same, so the difference is the refit's alone."""
    out = []
    for label, method, seeds, rounds, regime in groups:
        diffs, served, refit, sides = [], [], [], {"own": [], "joined": []}
        for s in seeds:
            name = run_name(method, s, regime)
            if not done(work, name, rounds):
                continue
            g = json.loads((snap_dir(work, name, rounds) / "summary.json").read_text()).get("safeguard") or {}
            sv, rf = (g.get("served") or {}).get("per_site") or {}, (g.get("refit") or {}).get("per_site") or {}
            for site in sorted(set(sv) & set(rf)):
                served.append(sv[site])
                refit.append(rf[site])
                diffs.append(rf[site] - sv[site])
                sides[(g.get("serves") or {}).get(site, "joined")].append(rf[site] - sv[site])
        if not diffs:
            continue
        n = len(diffs)
        mean = sum(diffs) / n
        se = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5 / n ** 0.5 if n > 1 else None
        out.append({"label": label, "pairs": n, "served": sum(served) / n, "refit": sum(refit) / n, "diff": mean,
                    "se": se, "better": sum(d > 1e-12 for d in diffs), "worse": sum(d < -1e-12 for d in diffs),
                    "own": sides["own"], "joined": sides["joined"]})
    return out


def refit_section(rows: list[dict], command: str, loads: tuple[str, str]) -> str:
    from bench.results import machine, stamp

    def side(v):
        return f"{len(v)}: {pts(sum(v) / len(v))}" if v else "0"

    text = [f"{stamp(command)}{' ' + NOTE if NOTE else ''} The runs were made with `--measure-refit` "
            "(`safeguard.measure_refit = true`: each site also trains its own model on the whole training split and "
            "scores on test the chosen side refit on the whole split, without serving it; the choice and everything "
            f"served are the same as without it). Machine: {machine()}; load average {loads[0]} before, {loads[1]} "
            "after.", "",
            "| runs | factory-seed pairs | served (as trained) | chosen side refit | refit − served | refit better / worse "
            "| own side chosen: pairs, mean refit − served | joined side chosen: pairs, mean refit − served |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        text.append(f"| {r['label']} | {r['pairs']} | {100 * r['served']:.1f} | {100 * r['refit']:.1f} | "
                    f"**{pts(r['diff'], r['se'])}** | {r['better']} / {r['worse']} | {side(r['own'])} | "
                    f"{side(r['joined'])} |")
    text += ["", "Test accuracy in %, mean over the factory-seed pairs; refit − served in points, ± its standard error "
             "over the pairs. The own side's refit is its twin trained on all training images; the joined side's is "
             "the personalized model rebuilt from all of them where the method fine-tunes at evaluation "
             "(FedAvg-FT), else the same model."]
    return "\n".join(text)


def goal_cell(p: dict) -> str:
    """The sweep row's verdict on the issue-24 goal; ``(1 seed)`` where one seed pair cannot show a spread."""
    if p.get("goal") is None:
        return "–"
    return ("**met**" if p["goal"] else "not met") + (" (1 seed)" if p.get("pairs") == 1 else "")


def sweep_section(work: Path, method: str, seeds: list[int], rounds: int, regimes: list[str], mode: str,
                  command: str, loads: tuple[str, str]) -> tuple[str, dict]:
    from bench.results import machine, stamp
    from server.leaderboard import sweep_point

    points = []
    for label in regimes:
        found = collect(work, [method], seeds, rounds, label)
        if method not in found:  # a regime whose safeguarded runs had not finished: the runs from before it
            found = collect(work, [method], seeds, rounds, label, root="snap-pre-safeguard")
        if method in found:
            points.append(sweep_point(label, SWEEP[label], found[method][0]))
    numbers = {"method": method, "rounds": rounds, "seeds": seeds, "mode": mode, "command": command,
               "date": time.strftime("%Y-%m-%d"), "points": points}
    text = [f"{stamp(command)}{' ' + NOTE if NOTE else ''} Mode `{mode}`: {method} vs local-only, seeds {', '.join(map(str, seeds))}, "
            f"{rounds} rounds, in-process engine, `deploy/pilot.toml` with `data.samples_per_site` per regime "
            f"(images per factory, train + test; the new factory keeps {UNSEEN_IMAGES}). Machine: {machine()}; "
            f"load average {loads[0]} before, {loads[1]} after.", "",
            "| images per factory | seed pairs | safeguard | " + " | ".join(f"factory-{c}" for c in "abcd")
            + " | mean gain | personalized model's mean gain | goal |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        by = {s["site"]: s for s in p["sites"]}
        cells = [(f"{pts(by[s]['gain'], by[s]['std'])}" + ("" if p["equal"] else f" ({by[s]['images']})"))
                 if s in by else "–" for s in (f"factory-{c}" for c in "abcd")]
        text.append(f"| {p['label']} | {p['pairs']} | {'yes' if p['safeguard'] else 'no (a run from before it)'} | "
                    + " | ".join(cells) + f" | **{pts(p['mean_gain'], p['mean_gain_std'])}** | "
                    f"{pts(p.get('mean_gain_joined'))} | {goal_cell(p)} |")
    missing = [x for x in regimes if x not in {p["label"] for p in points}]
    if missing:
        text += ["", f"Not measured by this table's deadline: {', '.join(missing)}."]
    text += ["", "Gain over alone in accuracy points (mean ± std over the seed pairs): with the safeguard, of the model "
             "each factory serves (chosen on validation, served as trained); the personalized "
             "model's mean gain beside it. Goal (issue 24): every factory's gain ≥ −its std and mean gain ≥ +3 "
             "points (`server/leaderboard.py`); one seed pair has no spread. The figure: "
             "`docs/img/pilot_sweep.svg` (docs/pilot.md), also in every `kumiki pilot` report."]
    return "\n".join(text), numbers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=list(MODES), default="quick")
    ap.add_argument("--part", choices=["board", "sweep", "tune", "refit", "all"], default="all")
    ap.add_argument("--tune", help="--part tune: a method knob and its candidates, e.g. method.ft_lr=0.005,0.01,0.02;"
                                   " each is scored on validation (never on test) against local on the same")
    ap.add_argument("--tune-method", default=None, help="the tuned method (default: deploy/pilot.toml's)")
    ap.add_argument("--methods", help="comma-separated subset (default: the mode's)")
    ap.add_argument("--seeds", type=int, help="number of seeds (default: the mode's)")
    ap.add_argument("--rounds", help="comma-separated round counts of the leaderboard (default: the mode's)")
    ap.add_argument("--sweep-method", default=None, help="the sweep's method (default: deploy/pilot.toml's)")
    ap.add_argument("--regimes", help="the sweep's regimes to run, by their first number: e.g. 60,150,600,2400,unequal "
                                      "(default: the mode's); the table lists every regime that has runs")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kumiki-pilot-methods"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--write", action="store_true", help="write bench/RESULTS.md (and the sweep figure), run docs/gen.py")
    ap.add_argument("--table-only", action="store_true", help="write the tables from the cached runs, run nothing")
    ap.add_argument("--measure-refit", default="", help="comma-separated methods whose runs also score the "
                    "safeguard's refit (safeguard.measure_refit; not served, so no table number changes); the "
                    "'refit' table compares it with what is served")
    ap.add_argument("--note", default="", help="a sentence for the table: which commands made the cached runs")
    a = ap.parse_args(argv)
    mode = MODES[a.mode]
    work = a.workdir / a.mode
    if a.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    from bench.results import load, publish

    ok, refused = image_methods()
    moved = set_aside_pre_safeguard(work)
    if moved:
        print(f"set aside (from before the safeguard; they run again): {', '.join(moved)}", flush=True)
    methods = [m.strip() for m in a.methods.split(",")] if a.methods else (mode["methods"] or ok)
    unknown = [m for m in methods if m not in ok]
    if unknown:
        ap.error(f"not image-classification methods on the pilot: {', '.join(unknown)} (these are: {', '.join(ok)})")
    seeds = list(range(a.seeds or mode["seeds"]))
    measure = tuple(m.strip() for m in a.measure_refit.split(",") if m.strip())
    rounds = sorted(int(x) for x in a.rounds.split(",")) if a.rounds else mode["rounds"]
    args = list(argv if argv is not None else sys.argv[1:])
    if "--note" in args:  # the note is said in the table, not repeated inside the command
        i = args.index("--note")
        del args[i:i + 2]
    command = "python bench/pilot_methods.py " + " ".join(args)
    global NOTE
    NOTE = a.note
    before = load()
    if a.part in ("board", "all"):
        if not a.table_only:
            execute(tasks_for(work, methods, seeds, rounds, None, None, measure=measure), a.jobs)
        text, boards = board_section(work, methods, refused if not a.methods else {}, seeds, rounds, a.mode,
                                     command, (before, load()))
        print(text)
        (work / "board.json").write_text(json.dumps({str(k): v for k, v in boards.items()}, indent=1))
        if a.write:
            publish(TAG, text)
    if a.part in ("sweep", "all"):
        from kumiki.config import load_config

        method = a.sweep_method or load_config(PILOT).method.name
        s_seeds = list(range(a.seeds or mode["sweep_seeds"]))
        if not a.table_only:
            tasks = []
            wanted = [r.strip() for r in a.regimes.split(",")] if a.regimes else None
            for label in mode["sweep"]:
                if wanted is not None and label.split(" ")[0].replace(",", "") not in wanted:
                    continue
                if regime_key(label) is not None:  # the pilot's own sizes are the leaderboard's runs (--part board)
                    tasks += tasks_for(work, [method], s_seeds, [mode["sweep_rounds"]], label, SWEEP[label],
                                       measure=measure)
            tasks.sort(key=lambda t: (t["seed"], sum(t["sizes"])))  # seed 0 of every regime first, cheap first
            execute(tasks, a.jobs)
        text, numbers = sweep_section(work, method, s_seeds, mode["sweep_rounds"], mode["sweep"], a.mode, command,
                                      (before, load()))
        print(text)
        (work / "sweep.json").write_text(json.dumps(numbers, indent=1))
        if a.write:
            SWEEP_JSON.write_text(json.dumps(numbers, indent=1) + "\n")
            from server.report_methods import sweep_svg

            sweep_svg(numbers, SWEEP_SVG)
            publish(SWEEP_TAG, text)
    if a.part == "refit":  # the runs that measured the safeguard's refit (--measure-refit), board and sweep
        from kumiki.config import load_config

        sweep_m = a.sweep_method or load_config(PILOT).method.name
        groups = [(f"{m}, {r} rounds, 600 each (the pilot)", m, seeds, r, None) for m in methods for r in rounds]
        groups += [(f"{sweep_m}, {mode['sweep_rounds']} rounds, {label}", sweep_m, seeds, mode["sweep_rounds"], label)
                   for label in mode["sweep"] if regime_key(label) is not None]
        text = refit_section(refit_rows(work, groups), command, (before, load()))
        print(text)
        if a.write:
            publish(REFIT_TAG, text)
    if a.part == "tune":
        from kumiki.config import load_config

        try:
            key, cands = parse_tune(a.tune or "")
        except ValueError as e:
            ap.error(str(e))
        pilot = load_config(PILOT)
        method = a.tune_method or pilot.method.name
        t_rounds = rounds[0]
        val = validation_sites(pilot, work / "tune") if not (work / "tune" / "validation").is_dir() else \
            work / "tune" / "validation"
        extra = validation_overrides(pilot, val)
        if not a.table_only:
            variants = [(f"val-{knob_tag(key, v)}", [*extra, f"{key}={v}"]) for v in cands]
            execute(tasks_for(work, [method], seeds, [t_rounds], None, None, variants, ("val", extra)), a.jobs)
        text, chosen = tune_section(work, method, key, cands, seeds, t_rounds, command, (before, load()))
        print(text)
        if a.write:
            publish(f"pilot-tune-{method}-{key.split('.', 1)[1]}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
