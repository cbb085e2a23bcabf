"""Shared helpers for benchmarks: run a config grid in-process and tabulate summaries."""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kumiki.config import KumikiConfig, load_config
from launch.engines import run
from server.recorder import read_final


ROOT = Path(__file__).resolve().parents[1]
#: The method the systems benchmarks (framework overhead, round CPU, idle CPU, SQL per poll, paths, evaluation's
#: share, bytes per hop) run the pilot with: FedAvg-FT with 1 fine-tuning epoch, the pilot's default when their
#: figures in bench/RESULTS.md were measured. The pilot's default moved to FedHB (issue 24: first on the leaderboard
#: at 10 rounds); pinning it here keeps those figures reproducible and comparable with each other. They measure the
#: transport and the engines, and FedHB's 2 local epochs and 5 personalization epochs would change every ratio.
PILOT_MEASURED = ('method.name="fedavg_ft"', "method.ft_epochs=1")


def pilot_config(sets: list[str] | tuple[str, ...] = ()) -> KumikiConfig:
    """``deploy/pilot.toml`` with the systems benchmarks' method (``PILOT_MEASURED``) and then ``sets``."""
    return load_config(str(ROOT / "deploy" / "pilot.toml"), [*PILOT_MEASURED, *sets])


@contextmanager
def omp_threads(value: str | None) -> Iterator[None]:
    """``OMP_NUM_THREADS`` set to ``value`` (None: unset) for a block, then put back as it was. A bench's ``main``
    also runs inside other processes (the tests call it): a setting left behind changed how many threads every later
    in-process run in that pytest worker computed with, and the engines' bit-identity test failed after it
    whenever xdist gave both to one worker (three loaded `make test` runs, 2026-12-06)."""
    before = os.environ.get("OMP_NUM_THREADS")
    if value is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


def knob_value(v: str):
    """A ``key=value`` knob's value as typed on a bench's command line: int, float, true/false, else the text."""
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v, v)


def run_grid(config: str | Path, methods: list[str], seeds: list[int], out: Path, overrides: list[str] | None = None,
             engine: str = "inprocess", knobs: dict[str, list[str]] | None = None) -> dict[str, list[dict]]:
    """Run every (method, seed); return method -> list of (summary + last-5 means)."""
    results: dict[str, list[dict]] = {}
    for method in methods:
        for seed in seeds:
            sets = [f'method.name="{method}"', f"run.seed={seed}", f'run.name="{method}-s{seed}"',
                    f'run.output_dir="{out}"', *(overrides or []), *((knobs or {}).get(method, []))]
            cfg: KumikiConfig = load_config(str(config), sets)
            summary = run(cfg, engine, quiet=True)
            summary["last5_mean"] = read_final(cfg.run_dir())["last5_mean"]
            results.setdefault(method, []).append(summary)
            p = summary["personalized"]["mean"]
            print(f"{method:>10} seed {seed}: personalized {p:.4f} ({summary['time']['wall_s']:.0f}s)", flush=True)
    return results


def mean(vals):
    vals = [v for v in vals if v is not None]
    return statistics.mean(vals) if vals else None


def fmt(v, pct=True):
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:,.0f}"


def table(results: dict[str, list[dict]]) -> str:
    head = ("| method | personalized (last) | bottom10 | personalized (last-5 mean) | global | unseen | "
            "up KiB/round | down KiB/round |\n|---|---|---|---|---|---|---|---|\n")
    rows = []
    for method, runs in results.items():
        def m(get):
            return mean([get(r) for r in runs])

        rows.append(
            f"| {method} | {fmt(m(lambda r: r['personalized']['mean']))} | {fmt(m(lambda r: r['personalized']['bottom10']))} "
            f"| {fmt(m(lambda r: r['last5_mean']['personalized']))} | {fmt(m(lambda r: r['global']['mean']))} "
            f"| {fmt(m(lambda r: (r['unseen'] or {}).get('mean')))} "
            f"| {fmt(m(lambda r: r['bytes']['up_per_round'] / 1024), False)} | {fmt(m(lambda r: r['bytes']['down_per_round'] / 1024), False)} |"
        )
    return head + "\n".join(rows) + "\n"
