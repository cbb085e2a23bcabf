"""``kumiki pilot``: the federation on the pilot factories, and what it gains each of them over training alone.

The plan (``plan``) for seeds s0 .. s0+N-1 (``run.seed`` = s0):

* ``<name>``: the method, seed s0, on the pilot engine (real SuperLink/SuperNode processes by default);
* ``<name>-seed<s>``: the method at the other seeds;
* ``<name>-local`` / ``<name>-local-seed<s>``: the local-only baseline (``method.name = local``: each factory
  trains alone, nothing is exchanged) at every seed.

Every run partitions the same factory data (``data.partition_seed`` = s0), so the seeds vary only the
training randomness, and a factory means the same images in every run. The extra runs use the in-process
engine by default (the same ServerApp and ClientApp code without sockets, minutes instead of tens of
minutes); the report says which engine ran what.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kumiki.config import KumikiConfig


@dataclass(frozen=True)
class PilotRun:
    side: str  # "joined" (the method) or "alone" (the local-only baseline)
    seed: int
    cfg: KumikiConfig
    engine: str
    main: bool = False


def plan(load: Callable[[list[str]], KumikiConfig], overrides: list[str], seeds: int, baseline: bool,
         engine: str, extra_engine: str) -> list[PilotRun]:
    """The pilot's runs, the main one first (``load(overrides)`` validates a config)."""
    main = load(overrides)
    s0, name = main.run.seed, main.run.name
    data_seed = main.data.partition_seed if main.data.partition_seed is not None else s0
    runs = [PilotRun("joined", s0, main, engine, main=True)]

    def extra(side: str, seed: int, run_name: str, more: list[str]) -> PilotRun:
        cfg = load([*overrides, *more, f'run.name="{run_name}"', f"run.seed={seed}",
                    f"data.partition_seed={data_seed}"])
        return PilotRun(side, seed, cfg, extra_engine)

    alone = baseline and main.method.name != "local"
    for i in range(seeds):
        s = s0 + i
        if i:
            runs.append(extra("joined", s, f"{name}-seed{s}", []))
        if alone:
            runs.append(extra("alone", s, f"{name}-local" + (f"-seed{s}" if i else ""), ["method.name=local"]))
    return runs


def busy_dirs(runs: list[PilotRun]) -> list[Path]:
    """Run dirs that already hold a run (refused unless --overwrite)."""
    return [r.cfg.run_dir() for r in runs if r.cfg.run_dir().is_dir() and any(r.cfg.run_dir().iterdir())]


def console_lines(comp: dict) -> list[str]:
    """The comparison in a few plain lines for the terminal."""
    frac = bool(comp.get("fraction"))

    def v(st):
        if not st:
            return "-"
        m = f"{100 * st['mean']:.1f}%" if frac else f"{st['mean']:.4g}"
        return m + (f" ± {100 * st['std']:.1f}" if frac and st.get("std") is not None else
                    f" ± {st['std']:.2g}" if st.get("std") is not None else "")

    def g(st):
        if not st:
            return "-"
        m = f"{100 * st['mean']:+.1f}" if frac else f"{st['mean']:+.3g}"
        sd = st.get("std")
        return m + (f" ± {100 * sd:.1f}" if frac and sd is not None else f" ± {sd:.2g}" if sd is not None else "") + (
            " points" if frac else "")

    out = [f"what joining gains each factory ({comp.get('metric')}, {comp.get('pairs')} seed(s)):"]
    for r in comp.get("train") or []:
        out.append(f"  {r['site']:<14} alone {v(r.get('b')):<16} joined {v(r.get('a')):<16} gain {g(r.get('gain'))}")
    guarded = [r for r in comp.get("train") or [] if r.get("gain_served")]
    for r in guarded:  # the safeguard: the model each factory serves, against alone
        picks = ", ".join(f"{k} {n}x" for k, n in (r.get("serves") or {}).items())
        out.append(f"  {r['site']:<14} serves {picks:<16} served {v(r.get('served')):<16} gain {g(r.get('gain_served'))}")
    if guarded:
        losing = [r["site"] for r in guarded if r["gain_served"]["mean"] < 0]
        mean = (comp.get("overall") or {}).get("served_gain_mean")
        out.append("  with the safeguard: " + (f"{len(losing)} factory(ies) still worse off than alone: "
                                                 f"{', '.join(losing)}" if losing else "no factory worse off than alone")
                   + f"; mean gain {g({'mean': mean}) if mean is not None else '-'}")
    for r in comp.get("unseen") or []:
        out.append(f"  {r['site']:<14} new factory: zero-shot {v(r.get('zero_shot'))}, adapted {v(r.get('adapted'))}"
                   f", alone {v(r.get('alone'))}")
    return out
