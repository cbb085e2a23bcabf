"""The report's method and data-size answers: which method pays (``methods.json``) and where joining pays
(``sweep.json``), as HTML and pictures.

``kumiki pilot --methods a,b,c`` writes ``methods.json`` into the pilot's run dir: each method's comparison
against each factory alone (``server.compare``) and their leaderboard (``server.leaderboard.board``).
``sweep.json`` holds the data-size sweep (``bench/pilot_methods.py --part sweep``: the gain over alone at 60,
150, 600, 2,400 images per factory and an unequal mix); ``kumiki pilot`` copies the measured one
(``docs/img/pilot_sweep.json``) into its run dir, with where and when it was measured, and the report marks
this run's own point on it. Both files are numbers, never links, so a report never changes afterwards.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from server.report_parts import png as _png

METHODS_FILE = "methods.json"
SWEEP_FILE = "sweep.json"
C_MEAN, C_SITE, C_MIX, C_HERE = "#1f77b4", "#9ecae1", "#ff7f0e", "#d62728"


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _pts(x: Any, sd: Any = None, frac: bool = True) -> str:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
        return "&ndash;"
    k = 100.0 if frac else 1.0
    s = f"{k * x:+.1f}" if frac else f"{x:+.3g}"
    if isinstance(sd, (int, float)) and not isinstance(sd, bool) and math.isfinite(sd):
        s += f" &plusmn; {k * sd:.1f}" if frac else f" &plusmn; {sd:.2g}"
    return s


def _bytes(b: Any) -> str:
    if not isinstance(b, (int, float)):
        return "&ndash;"
    return "0 (nothing travels)" if b == 0 else f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def read(run_dir: str | Path, name: str) -> dict[str, Any] | None:
    try:
        obj = json.loads((Path(run_dir) / name).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def methods_html(data: dict[str, Any]) -> str:
    """The leaderboard: one row per method, ranked; the answer first."""
    rows = data.get("board") or []
    if not rows:
        return ""
    frac = rows[0].get("fraction", True) is not False
    sites = sorted({s for r in rows for s in (r.get("sites") or {})})
    best = rows[0]
    goal = [r["method"] for r in rows if r.get("goal")]
    unit = " points" if frac else ""
    answer = [f"Of {len(rows)} method{'s' if len(rows) != 1 else ''}, <strong>{_esc(best['method'])}</strong> gains "
              f"the factories most: {_pts(best.get('mean_gain'), best.get('mean_gain_std'), frac)}{unit} on average "
              f"over training alone, {best.get('gaining', 0)} of {len(best.get('sites') or {})} factories gaining"
              + (f"; worse off (the seeds agree): {_esc(', '.join(best['worse_off']))}" if best.get("worse_off") else
                 "; no factory clearly worse off") + "."]
    answer.append("The goal (every factory at least its alone accuracy minus its spread, mean gain at least +3 "
                  "points) is met by " + (_esc(", ".join(goal)) if goal else "<strong>no method</strong>") + ".")
    head = ("<tr><th>rank</th><th>method</th><th>seed pairs</th>" + "".join(f"<th>{_esc(s)}</th>" for s in sites)
            + f"<th>mean gain{' (points)' if frac else ''}</th><th>personalized model's mean gain</th><th>worse off</th>"
            "<th>goal</th><th>bytes per run</th></tr>")
    body = []
    for r in rows:
        cells = ""
        for s in sites:
            v, pick = (r.get("sites") or {}).get(s), (r.get("serves") or {}).get(s) or {}
            own = f"<br><small>own model served {pick.get('own', 0)}/{sum(pick.values())}</small>" if pick else ""
            cells += (f"<td class=\"n\">{_pts(v['mean'], v.get('std'), frac)}{own}</td>" if v else "<td>&ndash;</td>")
        joined = r.get("joined") or {}
        body.append(f"<tr><td class=\"n\">{_esc(r.get('rank'))}</td><td><strong>{_esc(r['method'])}</strong>"
                    f"{' + safeguard' if r.get('safeguard') else ''}</td>"
                    f"<td class=\"n\">{_esc(r.get('pairs'))}</td>{cells}"
                    f"<td class=\"n\"><strong>{_pts(r.get('mean_gain'), r.get('mean_gain_std'), frac)}</strong></td>"
                    f"<td class=\"n\">{_pts(joined.get('mean_gain'), joined.get('mean_gain_std'), frac)}</td>"
                    f"<td>{_esc(', '.join(r.get('worse_off') or [])) or 'none'}</td>"
                    f"<td>{'met' if r.get('goal') else 'not met'}</td><td class=\"n\">{_bytes(r.get('bytes'))}</td></tr>")
    how = ("Each method ran at the same seeds as the local-only baseline on the same factory data "
           f"({_esc(data.get('rounds'))} rounds); gain = what the factory deploys minus alone (with the safeguard: "
           "the model it serves, the better on its validation split of its personalized model and its own; "
           "without: its personalized model), &plusmn; the standard deviation over the seed pairs. Mean gain: over the training factories (&plusmn; its spread over seeds). Worse off: gain + "
           "spread below zero. Ranked by mean gain, then fewer factories worse off, then fewer bytes.")
    return ("<ul class=\"answer\">" + "".join(f"<li>{x}</li>" for x in answer) + "</ul>"
            + f"<table>{head}{''.join(body)}</table><p class=\"note\">{how}</p>")


def _draw_sweep(ax, numbers: dict[str, Any], here: tuple[float, float] | None = None) -> None:
    points = numbers.get("points") or []
    eq = sorted([p for p in points if p.get("equal")], key=lambda p: p["sizes"][0])
    xs = [p["sizes"][0] for p in eq]
    ys = [100 * p["mean_gain"] for p in eq if p.get("mean_gain") is not None]
    errs = [100 * (p.get("mean_gain_std") or 0.0) for p in eq if p.get("mean_gain") is not None]
    if ys and len(ys) == len(xs):
        ax.errorbar(xs, ys, yerr=errs, color=C_MEAN, marker="o", capsize=4, lw=2,
                    label="mean over the 4 factories (± spread over seeds), equal data")
    site_label = "each factory, equal data"
    for p in eq:
        for s in p.get("sites") or []:
            ax.scatter([p["sizes"][0]], [100 * s["gain"]], color=C_SITE, s=18, zorder=3, label=site_label)
            site_label = None
    mix_label = "each factory in the unequal mix (at its own size)"
    for p in points:
        if p.get("equal"):
            continue
        for s in p.get("sites") or []:
            if s.get("images") is None:
                continue
            ax.errorbar([s["images"]], [100 * s["gain"]], yerr=[100 * (s.get("std") or 0.0)], color=C_MIX,
                        marker="D", ms=6, capsize=3, ls="none", label=mix_label)
            mix_label = None
    if here is not None:
        ax.scatter([here[0]], [100 * here[1]], marker="*", s=220, color=C_HERE, zorder=4, label="this pilot run (mean)")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xscale("log")
    ticks = sorted({x for p in points for x in p.get("sizes") or []} | ({here[0]} if here else set()))
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("images per factory (train + test)")
    ax.set_ylabel("gain over training alone (accuracy points)")
    pairs = sorted({p.get("pairs") for p in points if p.get("pairs")})
    npairs = "?" if not pairs else str(pairs[0]) if len(pairs) == 1 else f"{pairs[0]}–{pairs[-1]}"
    ax.set_title(f"Where joining pays: {numbers.get('method', '?')} vs each factory alone, "
                 f"{numbers.get('rounds', '?')} rounds, {npairs} seed pair(s) per point", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def plot_sweep(numbers: dict[str, Any], here: tuple[float, float] | None = None) -> str | None:
    """The sweep as a PNG (base64) for the report; ``here`` = (images per factory, mean gain) of this run."""
    if not numbers.get("points"):
        return None
    fig = Figure(figsize=(7.5, 4.4), dpi=100, layout="constrained")
    _draw_sweep(fig.add_subplot(), numbers, here)
    return _png(fig)


def sweep_svg(numbers: dict[str, Any], out: Path) -> None:
    """The sweep as a deterministic SVG for the docs (fonts as text, no date, fixed id salt)."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "kumiki", "font.size": 10}):
        fig = Figure(figsize=(7.5, 4.4), layout="constrained")
        _draw_sweep(fig.add_subplot(), numbers)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="svg", metadata={"Date": None})


def sweep_html(numbers: dict[str, Any], img: str) -> str:
    """The sweep's answer in words, the picture, and where it was measured."""
    points = numbers.get("points") or []
    eq = sorted([p for p in points if p.get("equal") and p.get("mean_gain") is not None], key=lambda p: p["sizes"][0])
    lines = []
    if eq:
        pays = [p for p in eq if p["mean_gain"] - (p.get("mean_gain_std") or 0.0) > 0]
        parts = ", ".join(f"{p['sizes'][0]:,} images each: {_pts(p['mean_gain'], p.get('mean_gain_std'))}" for p in eq)
        lines.append(f"Mean gain of joining over training alone by the images each factory has: {parts} points.")
        lines.append("Joining clearly pays (mean gain above its spread) at "
                     + (", ".join(f"{p['sizes'][0]:,}" for p in pays) + " images per factory" if pays else
                        "none of these sizes") + ".")
    for p in points:
        if not p.get("equal"):
            lines.append(f"Unequal mix ({_esc(p['label'])}): " + ", ".join(
                f"{_esc(s['site'])} ({s.get('images')}) {_pts(s['gain'], s.get('std'))}" for s in p.get("sites") or [])
                + " points.")
    prov = (f"Measured by <code>{_esc(numbers.get('command'))}</code> on {_esc(numbers.get('date'))} "
            f"(mode {_esc(numbers.get('mode'))}; {_esc(numbers.get('method'))}, seeds "
            f"{_esc(', '.join(map(str, numbers.get('seeds') or [])))}, {_esc(numbers.get('rounds'))} rounds): the same "
            "factories, cameras and product mixes as this pilot, with fewer or more images each. The star is this "
            "run's own mean gain.")
    return ("<ul class=\"answer\">" + "".join(f"<li>{x}</li>" for x in lines) + "</ul>" + (img or "")
            + f"<p class=\"note\">{prov}</p>")
