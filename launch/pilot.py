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

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from kumiki.atomic import atomic_json
from kumiki.config import KumikiConfig


@dataclass(frozen=True)
class PilotRun:
    side: str  # "joined" (the method) or "alone" (the local-only baseline)
    seed: int
    cfg: KumikiConfig
    engine: str
    main: bool = False


def parse_methods(text: str | None, known: Iterable[str]) -> list[str]:
    """``--methods a,b,c``: the methods to compare, in order, each once. Raises ``ValueError`` naming the
    problem: an unknown name (with the known ones), ``local`` (it is the baseline every method is compared
    against, always run), or nothing listed."""
    if text is None:
        return []
    known = list(known)
    out: list[str] = []
    for raw in text.split(","):
        m = raw.strip()
        if not m or m in out:
            continue
        if m == "local":
            raise ValueError("--methods: local is the baseline every method is compared against (each factory "
                             "alone); it always runs, so leave it out")
        if m not in known:
            raise ValueError(f"--methods: unknown method {m!r}; known: {', '.join(sorted(k for k in known if k != 'local'))}")
        out.append(m)
    if not out:
        raise ValueError("--methods: name at least one method, e.g. --methods fedavg_ft,fedper,ditto")
    return out


def plan(load: Callable[[list[str]], KumikiConfig], overrides: list[str], seeds: int, baseline: bool,
         engine: str, extra_engine: str, methods: list[str] | None = None) -> list[PilotRun]:
    """The pilot's runs, the main one first (``load(overrides)`` validates a config).

    ``methods`` (``kumiki pilot --methods a,b,c``): the first is the main run's method (``method.name``), each
    other runs at every seed as ``<name>-<method>`` / ``<name>-<method>-seed<s>`` on the extra engine; all are
    compared with the same local-only runs."""
    methods = list(methods or [])
    first = [f'method.name="{methods[0]}"'] if methods else []
    main = load([*overrides, *first])
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
            runs.append(extra("joined", s, f"{name}-seed{s}", first))
        if alone:
            runs.append(extra("alone", s, f"{name}-local" + (f"-seed{s}" if i else ""), ["method.name=local"]))
    for m in methods[1:]:
        for i in range(seeds):
            s = s0 + i
            runs.append(extra("joined", s, f"{name}-{m}" + (f"-seed{s}" if i else ""), [f'method.name="{m}"']))
    return runs


def by_method(runs: list[PilotRun], finished: set[int]) -> dict[str, list[Path]]:
    """The finished joined runs' dirs per method, in plan order (the main method first)."""
    out: dict[str, list[Path]] = {}
    for i, r in enumerate(runs):
        if r.side == "joined" and i in finished:
            out.setdefault(r.cfg.method.name, []).append(r.cfg.run_dir())
    return out


def write_methods(run_dir: Path, joined: dict[str, list[Path]], alone: list[Path], rounds: int) -> list[dict]:
    """Each method's comparison against the same local-only runs, and their leaderboard, into
    ``run_dir/methods.json`` (numbers, not links); returns the ranked rows."""
    from server.compare import compare
    from server.leaderboard import board, bytes_moved
    from server.report_parts import read_json

    entries, comps = [], {}
    for m, dirs in joined.items():
        comp = compare(dirs, alone, a_label=f"{m}, the factories together",
                       b_label="local: each factory alone on its own images")
        comps[m] = comp
        entries.append((m, comp, bytes_moved([read_json(Path(d) / "summary.json") for d in dirs])))
    rows = board(entries, rounds=rounds)
    path = Path(run_dir) / "methods.json"
    atomic_json(path, {"rounds": rounds, "board": rows, "comparisons": comps}, indent=1)
    return rows


def board_lines(rows: list[dict]) -> list[str]:
    """The leaderboard (``server.leaderboard.board``) in a few plain lines for the terminal."""
    def p(x, sd=None):
        return "-" if x is None else f"{100 * x:+.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")

    out = ["which method pays (gain over each factory alone, accuracy points):"]
    for r in rows:
        worse = ", ".join(r.get("worse_off") or []) or "none"
        out.append(f"  {r['rank']}. {r['method']:<16} mean gain {p(r.get('mean_gain'), r.get('mean_gain_std')):<14}"
                   f" worse off: {worse}; goal {'met' if r.get('goal') else 'not met'}")
    return out


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
        losing = [r for r in guarded if r["gain_served"]["mean"] < 0]
        from server.leaderboard import worse_off  # any mean loss is named first, then the leaderboard's worse off

        clear = [r["site"] for r in losing if worse_off(r["gain_served"])]
        spread = (f" (beyond the spread over seeds: {', '.join(clear) if clear else 'none'})"
                  if losing and comp.get("pairs", 1) > 1 else "")
        mean = (comp.get("overall") or {}).get("served_gain_mean")
        out.append("  with the safeguard: " + (f"{len(losing)} factory(ies) still worse off than alone: "
                                                 f"{', '.join(r['site'] for r in losing)}{spread}" if losing
                                                 else "no factory worse off than alone")
                   + f"; mean gain {g({'mean': mean}) if mean is not None else '-'}")
    for r in comp.get("unseen") or []:
        out.append(f"  {r['site']:<14} new factory: zero-shot {v(r.get('zero_shot'))}, adapted {v(r.get('adapted'))}"
                   f", alone {v(r.get('alone'))}")
    return out
