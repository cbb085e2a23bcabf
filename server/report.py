"""One run's report: ``<run_dir>/report.html``, a single self-contained file.

``render_report(run_dir)`` reads the run dir contract (``summary.json``,
``metrics.jsonl``, ``config.json``; ARCHITECTURE section 8) and writes an HTML
page with no external assets and no JavaScript: plots are PNGs drawn with
matplotlib's Agg canvas and embedded as ``data:image/png;base64`` URIs.

Sections: header (method, dataset, rounds, sites, engine, wall time, bytes per
round), what the run is in plain words, what joining gained each factory (when the
run dir holds a ``comparison.json``: ``kumiki pilot``, ``kumiki report --compare``),
the factories (camera/domain, data sizes), accuracy per round, per-site accuracy at the last round, global vs
personalized scatter, bytes and time per round, a table of last-round and
mean-of-last-5 values, and the list of rejected updates.

Every piece is optional: a missing file, a null ``global`` (local-only
methods), a null ``unseen``, a single round or an empty metrics file gives a
shorter report, never an exception. All text goes through ``html.escape``.

Figures are ``matplotlib.figure.Figure`` objects on a ``FigureCanvasAgg``:
they never enter pyplot's figure registry, so nothing is left open, the global
backend is untouched and rendering is safe from any thread.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kumiki.atomic import atomic_text
from server import report_factories as rf
from server import report_methods as rm
from server.compare import read_comparison
from server.report_parts import (esc, fmt_acc, fmt_bytes, fmt_seconds, img as _img, mean_of, num, per_site,
                                 png as _png, read_json as _read_json, read_metrics as _read_metrics, site_key)

# the page's layers: report_parts (helpers) <- compare, report_factories <- this module; nothing imports upward
__all__ = ["fmt_acc", "render_report", "build_html", "REPORT_NAME", "site_key"]

REPORT_NAME = "report.html"
C_PERS, C_GLOB, C_UNSEEN = "#1f77b4", "#ff7f0e", "#2ca02c"
C_UP, C_DOWN, C_TIME = "#9467bd", "#8c564b", "#7f7f7f"
DPI = 100


# ---------------------------------------------------------------------- plots


def _round_axis(ax, rounds: list[int]) -> None:
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    if len(rounds) == 1:
        ax.set_xlim(rounds[0] - 1, rounds[0] + 1)
        ax.set_xticks(rounds)
    ax.grid(True, alpha=0.3)


def plot_accuracy(rows: list[dict], metric: str) -> str | None:
    rounds = [int(r["round"]) for r in rows]

    def series(key: str, field: str = "mean") -> list[float]:
        out = []
        for r in rows:
            b = r.get(key)
            out.append(num(b.get(field)) if isinstance(b, dict) else None)
        return [math.nan if v is None else v for v in out]

    pm, ps, pb = series("personalized"), series("personalized", "std"), series("personalized", "bottom10")
    gm, um, am = series("global"), series("unseen"), series("unseen_adapted")
    if all(math.isnan(v) for v in pm + gm + um + am):
        return None
    fig = Figure(figsize=(8, 4.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    if not all(math.isnan(v) for v in pm):
        ax.plot(rounds, pm, "-o", ms=6, lw=3, color=C_PERS, label="personalized mean", zorder=3)
        lo = [m - s if not (math.isnan(m) or math.isnan(s)) else math.nan for m, s in zip(pm, ps)]
        hi = [m + s if not (math.isnan(m) or math.isnan(s)) else math.nan for m, s in zip(pm, ps)]
        if len(rounds) == 1:  # a band needs width: show one round's +- std as an error bar
            if not math.isnan(lo[0]):
                ax.errorbar(rounds, pm, yerr=[[pm[0] - lo[0]], [hi[0] - pm[0]]], color=C_PERS, capsize=6,
                            alpha=0.5, label="personalized ± std")
        elif not all(math.isnan(v) for v in lo):
            ax.fill_between(rounds, lo, hi, color=C_PERS, alpha=0.18, linewidth=0, label="personalized ± std")
        if not all(math.isnan(v) for v in pb):
            ax.plot(rounds, pb, "--", marker=".", color=C_PERS, alpha=0.8, label="personalized bottom 10%")
    if not all(math.isnan(v) for v in gm):
        ax.plot(rounds, gm, "-s", ms=4, lw=1.5, color=C_GLOB, label="global mean (training sites)", zorder=4)
    if not all(math.isnan(v) for v in um):
        ax.plot(rounds, um, "-^", ms=4, color=C_UNSEEN, label="unseen sites mean (zero-shot)")
    if not all(math.isnan(v) for v in am):
        ax.plot(rounds, am, "--v", ms=4, color=C_UNSEEN, label="unseen sites mean (adapted)")
    _round_axis(ax, rounds)
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]), top=max(1.02, ax.get_ylim()[1]))
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per round")
    ax.legend(loc="best", fontsize=8, framealpha=0.85)
    return _png(fig)


def plot_sites(pers: dict[str, float], glob: dict[str, float], unseen: dict[str, float], metric: str) -> str | None:
    train = sorted(set(pers) | set(glob), key=site_key)
    uns = sorted(unseen, key=site_key)
    if not train and not uns:
        return None
    n = len(train) + len(uns)
    fig = Figure(figsize=(min(max(6.0, 0.55 * n + 2.5), 18.0), 4.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    both = bool(pers) and bool(glob)
    w = 0.4 if both else 0.6
    xs_train = list(range(len(train)))
    xs_uns = [len(train) + (0.8 if train else 0) + i for i in range(len(uns))]
    if pers:
        ax.bar([x - w / 2 if both else x for x in xs_train], [pers.get(s, math.nan) for s in train], w,
               color=C_PERS, label="personalized")
    if glob:
        ax.bar([x + w / 2 if both else x for x in xs_train], [glob.get(s, math.nan) for s in train], w,
               color=C_GLOB, label="global")
    if uns:
        ax.bar(xs_uns, [unseen[s] for s in uns], 0.6, color=C_UNSEEN, label="unseen site (global model)")
        if train:
            ax.axvline(len(train) - 0.5 + 0.4, color="0.6", lw=0.8, ls=":")
    ax.set_xticks(xs_train + xs_uns, train + uns, rotation=45 if n > 8 else 0, ha="right" if n > 8 else "center",
                  fontsize=8 if n > 20 else 9)
    ax.set_ylabel(metric)
    ax.set_title(f"per-site {metric} at the last round")
    ax.grid(True, axis="y", alpha=0.3)
    top = max([*pers.values(), *glob.values(), *unseen.values(), 1.0])
    ax.set_ylim(0, top * 1.12)
    ax.legend(loc="upper left", fontsize=8, ncols=3, framealpha=0.85)
    return _png(fig)


def plot_scatter(pers: dict[str, float], glob: dict[str, float], metric: str) -> str | None:
    sites = sorted(set(pers) & set(glob), key=site_key)
    if not sites:
        return None
    gx, py = [glob[s] for s in sites], [pers[s] for s in sites]
    fig = Figure(figsize=(5.2, 5.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    lo, hi = min(0.0, *gx, *py), max(1.0, *gx, *py)
    pad = 0.03 * (hi - lo)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "--", color="0.5", lw=1, label="y = x")
    ax.scatter(gx, py, color=C_PERS, edgecolor="white", s=45, zorder=3, label="training site")
    if len(sites) <= 25:
        for s, x, y in zip(sites, gx, py):
            ax.annotate(s, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7, color="0.25")
    above = sum(y > x for x, y in zip(gx, py))
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel(f"global model {metric}")
    ax.set_ylabel(f"personalized {metric}")
    ax.set_title(f"global vs personalized ({above}/{len(sites)} sites above y = x)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def plot_traffic(rows: list[dict]) -> str | None:
    if not rows:
        return None
    rounds = [int(r["round"]) for r in rows]

    def get(r: dict, sec: str, key: str) -> float:
        b = r.get(sec)
        v = num(b.get(key)) if isinstance(b, dict) else None
        return math.nan if v is None else v

    up = [get(r, "bytes", "up") for r in rows]
    down = [get(r, "bytes", "down") for r in rows]
    rt = [get(r, "time", "round_s") for r in rows]
    has_bytes = not all(math.isnan(v) for v in up + down)
    has_time = not all(math.isnan(v) for v in rt)
    if not has_bytes and not has_time:
        return None
    fig = Figure(figsize=(10, 3.8), dpi=DPI, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    if has_bytes:
        top = max((v for v in up + down if not math.isnan(v)), default=0.0)
        unit, scale = "B", 1.0
        for u in ("KiB", "MiB", "GiB", "TiB"):
            if top >= 1024 * scale:
                unit, scale = u, scale * 1024
        ax1.plot(rounds, [v / scale for v in up], "-o", ms=4, color=C_UP, label="up (sites → server)")
        ax1.plot(rounds, [v / scale for v in down], "-s", ms=4, color=C_DOWN, label="down (server → sites)")
        ax1.set_ylim(bottom=0, top=max(1.0, top / scale) * 1.15)
        ax1.set_ylabel(unit)
        ax1.legend(fontsize=8, loc="lower right")
        if top == 0:
            ax1.text(0.5, 0.5, "no tensors exchanged", transform=ax1.transAxes, ha="center", color="0.4")
    else:
        ax1.text(0.5, 0.5, "no byte counts recorded", transform=ax1.transAxes, ha="center", color="0.4")
    ax1.set_title("bytes per round")
    _round_axis(ax1, rounds)
    if has_time:
        ax2.bar(rounds, rt, 0.6, color=C_TIME)
        ax2.set_ylabel("seconds")
    else:
        ax2.text(0.5, 0.5, "no round times recorded", transform=ax2.transAxes, ha="center", color="0.4")
    ax2.set_title("round time")
    _round_axis(ax2, rounds)
    return _png(fig)


def plot_privacy(rows: list[dict], target: float | None) -> str | None:
    """Epsilon spent per site (its ledger) and by the server's central releases, per round."""
    per_site: dict[str, list[tuple[int, float]]] = {}
    central = [(int(r["round"]), num(r.get("central_epsilon"))) for r in rows if num(r.get("central_epsilon")) is not None]
    for r in rows:
        for site, e in (r.get("epsilon") or {}).items():
            if num(e) is not None:
                per_site.setdefault(site, []).append((int(r["round"]), float(e)))
    if not per_site and not central:
        return None
    fig = Figure(figsize=(10, 3.8), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for site in sorted(per_site, key=site_key):
        xs, ys = zip(*per_site[site])
        ax.plot(xs, ys, "-o", ms=3, label=site)
    if central:
        xs, ys = zip(*central)
        ax.plot(xs, ys, "--s", ms=4, color="black", label="central (server)")
    if target is not None:
        ax.axhline(target, color="red", lw=1, label="target epsilon")
    ax.set_ylabel("epsilon spent")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    _round_axis(ax, sorted({int(r["round"]) for r in rows}))
    return _png(fig)


# --------------------------------------------------------------------- report


def _last5(rows: list[dict], key: str, field: str = "mean") -> float | None:
    vals = [num(r[key].get(field)) for r in rows[-5:] if isinstance(r.get(key), dict)]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def _last_block(rows: list[dict], summary: dict, key: str) -> Any:
    if rows:
        return rows[-1].get(key)
    return summary.get(key)


def _section(title: str, body: str) -> str:
    return f"<section><h2>{esc(title)}</h2>\n{body}\n</section>"


def _missing(what: str) -> str:
    return f'<p class="note">{esc(what)}</p>'


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
     color:#222;padding:0 1em;line-height:1.4}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#666;margin-top:0}
dl.hdr{display:grid;grid-template-columns:max-content auto;gap:.25em 1.2em;background:#f7f7f9;padding:1em;
       border-radius:6px}
dl.hdr dt{font-weight:600;color:#444} dl.hdr dd{margin:0;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
table{border-collapse:collapse;margin:.5em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:.3em .8em;text-align:left} td.n{text-align:right;white-space:nowrap}
td:first-child{white-space:nowrap}
th{background:#f2f2f4} .note{color:#777;font-style:italic} .bad{color:#b00020}
.intro{font-size:1.05em} ul.answer{background:#eef5fc;border-left:4px solid #1f77b4;padding:.8em 1em .8em 2em;
       border-radius:4px;font-size:1.05em} ul.answer li{margin:.25em 0} ul.how{color:#555;font-size:.92em}
dl.gloss{display:grid;grid-template-columns:max-content auto;gap:.2em 1em} dl.gloss dt{font-weight:600}
dl.gloss dd{margin:0} details summary{cursor:pointer;color:#1f5f99}
"""


def _factory_sections(run_dir: Path, summary: dict, config: dict) -> list[str]:
    """What the run is (plain words), what joining gained each factory (``comparison.json``), the factories."""
    out = []
    intro = rf.intro(summary, config, site_key)
    if intro:
        out.append(intro)
    comp = read_comparison(run_dir)
    if comp:
        b64 = rf.plot_comparison(comp)
        out.append(_section("What joining gains each factory",
                            rf.comparison(comp, _img(b64, "each factory alone vs joined") if b64 else "")))
    out += _method_sections(run_dir, comp, config)
    table = rf.factories(summary, site_key)
    if table:
        out.append(_section("The factories", table))
    guard = rf.safeguard(summary, site_key)
    if guard:
        out.append(_section("No factory worse off: the model each factory serves", guard))
    return out


def _method_sections(run_dir: Path, comp: dict | None, config: dict) -> list[str]:
    """Which method pays (``methods.json``: ``kumiki pilot --methods``) and where joining pays (``sweep.json``)."""
    out = []
    methods = rm.read(run_dir, rm.METHODS_FILE)
    if methods:
        body = rm.methods_html(methods)
        if body:
            out.append(_section("Which method pays: every method against each factory alone", body))
    sweep = rm.read(run_dir, rm.SWEEP_FILE)
    if sweep and sweep.get("points"):
        here = None
        cap = (config.get("data") or {}).get("samples_per_site") if isinstance(config.get("data"), dict) else None
        overall = (comp or {}).get("overall") or {}
        gain = overall.get("served_gain_mean")  # with the safeguard: what the factories serve, as the sweep shows
        gain = overall.get("gain_mean") if gain is None else gain
        if isinstance(cap, int) and isinstance(gain, (int, float)):
            here = (cap, float(gain))
        b64 = rm.plot_sweep(sweep, here)
        out.append(_section("Where joining pays: gain over alone vs images per factory",
                            rm.sweep_html(sweep, _img(b64, "gain over alone vs images per factory") if b64 else "")))
    return out


def _task_sections(rows: list[dict], tasks: dict) -> list[str]:
    """One section per task for a run whose sites learn different tasks (M-Fed): an accuracy and an mIoU are never
    drawn on one axis. Each task's curves and last-round sites come from the rows' ``tasks`` blocks."""
    out = []
    for task, entry in sorted(tasks.items()):
        metric = str(entry.get("metric") or task)
        trows = [{"round": r.get("round"), **((r.get("tasks") or {}).get(task) or {})} for r in rows]
        b64 = plot_accuracy(trows, metric)
        body = _img(b64, f"{task}: {metric} per round") if b64 else _missing("no per-round evaluation recorded")
        last = trows[-1] if trows else entry
        pers, glob, uns = (per_site(last.get(k)) for k in ("personalized", "global", "unseen"))
        b64 = plot_sites(pers, glob, uns, metric)
        body += _img(b64, f"{task}: per-site {metric}") if b64 else _missing("no per-site values recorded")
        cells = "".join(f'<tr><td>{esc(k)}</td><td class="n">{fmt_acc(mean_of(last.get(k)))}</td></tr>'
                        for k in ("personalized", "global", "unseen", "unseen_adapted"))
        body += f"<table><thead><tr><th>{esc(metric)} (last round)</th><th>mean</th></tr></thead><tbody>{cells}</tbody></table>"
        out.append(_section(f"{task}: {metric} ({'higher' if entry.get('higher_is_better', True) else 'lower'} is "
                            "better)", body))
    return out


def build_html(run_dir: Path) -> str:
    summary = _read_json(run_dir / "summary.json")
    config = _read_json(run_dir / "config.json")
    rows, site_rows, final = _read_metrics(run_dir / "metrics.jsonl")

    run_cfg = config.get("run") if isinstance(config.get("run"), dict) else {}
    data_cfg = config.get("data") if isinstance(config.get("data"), dict) else {}
    method_cfg = config.get("method") if isinstance(config.get("method"), dict) else {}
    method = summary.get("method") or method_cfg.get("name") or "unknown method"
    dataset = summary.get("dataset") or data_cfg.get("dataset") or "unknown dataset"
    metric = str(summary.get("metric") or "accuracy")
    n_rounds = summary.get("rounds", len(rows) if rows else None)
    planned = run_cfg.get("rounds")
    sites = summary.get("sites", data_cfg.get("sites"))
    unseen_sites = data_cfg.get("unseen_sites")
    engine = config.get("engine")
    time_sec = summary.get("time") if isinstance(summary.get("time"), dict) else {}
    bytes_sec = summary.get("bytes") if isinstance(summary.get("bytes"), dict) else {}
    wall = time_sec.get("wall_s")
    if num(wall) is None and rows and isinstance(rows[-1].get("time"), dict):
        wall = rows[-1]["time"].get("wall_s")
    per_round_s = time_sec.get("per_round_s")
    up_pr, down_pr = bytes_sec.get("up_per_round"), bytes_sec.get("down_per_round")
    if rows and num(up_pr) is None:
        ups = [num((r.get("bytes") or {}).get("up")) for r in rows]
        downs = [num((r.get("bytes") or {}).get("down")) for r in rows]
        up_pr = sum(v for v in ups if v is not None) / len(rows) if any(v is not None for v in ups) else None
        down_pr = sum(v for v in downs if v is not None) / len(rows) if any(v is not None for v in downs) else None

    # header
    rounds_txt = esc(n_rounds if n_rounds is not None else "–")
    if num(planned) is not None and num(n_rounds) is not None and int(planned) != int(n_rounds):
        rounds_txt += f' <span class="bad">(of {esc(planned)} planned)</span>'
    sites_txt = esc(sites if sites is not None else "–") + " training"
    if num(unseen_sites):
        sites_txt += f" + {esc(unseen_sites)} unseen"
    hdr = [
        ("method", esc(method)),
        ("dataset", esc(dataset)),
        ("rounds", rounds_txt),
        ("sites", sites_txt),
        ("engine", esc(engine or "–")),
        ("wall time", fmt_seconds(wall) + (f" ({fmt_seconds(per_round_s)} per round)"
                                           if num(per_round_s) is not None else "")),
        ("bytes up per round", fmt_bytes(up_pr) + (f" (total {fmt_bytes(bytes_sec.get('up_total'))})"
                                                   if num(bytes_sec.get("up_total")) is not None else "")),
        ("bytes down per round", fmt_bytes(down_pr) + (f" (total {fmt_bytes(bytes_sec.get('down_total'))})"
                                                       if num(bytes_sec.get("down_total")) is not None else "")),
    ]
    privacy = summary.get("privacy")
    if isinstance(privacy, dict) and privacy:
        hdr.append(("privacy", ", ".join(f"{esc(k)} = {esc(v)}" for k, v in privacy.items())))
    elif privacy not in (None, {}):
        hdr.append(("privacy", esc(privacy)))
    header = '<dl class="hdr">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in hdr) + "</dl>"
    title = f"Kumiki run report: {run_cfg.get('name') or run_dir.name}"

    parts = [f"<h1>{esc(title)}</h1>", f'<p class="sub">{esc(method)} on {esc(dataset)} &middot; {esc(run_dir)}</p>',
             header]
    parts += _factory_sections(run_dir, summary, config)
    if rows and not final:
        parts.insert(1, '<p class="bad"><strong>Partial run:</strong> metrics.jsonl has no final record; the run '
                        f"stopped after round {esc(rows[-1].get('round'))}. Figures below are what it recorded.</p>")
    status = summary.get("status") if isinstance(summary, dict) else None
    if status not in (None, "ok"):
        parts.insert(1, f'<p class="bad"><strong>Status: {esc(status)}</strong> &middot; '
                        f"{esc(summary.get('error') or 'not every configured site took part in every round')}</p>")

    # 2.-4. the metric per round, per site, and global vs personalized: per task where sites learn different tasks
    tasks = summary.get("tasks") if isinstance(summary.get("tasks"), dict) else {}
    if len(tasks) > 1:
        parts += _task_sections(rows, tasks)
        p_last = _last_block(rows, summary, "personalized")
    else:
        b64 = plot_accuracy(rows, metric)
        parts.append(_section(f"{metric} per round", _img(b64, f"{metric} per round") if b64 else
                              _missing("no per-round evaluation recorded")))

        # 3./4. last-round per-site values: the last round row, else summary.json
        p_last = _last_block(rows, summary, "personalized")
        g_last = _last_block(rows, summary, "global")
        u_last = _last_block(rows, summary, "unseen")
        pers_ps, glob_ps, uns_ps = per_site(p_last), per_site(g_last), per_site(u_last)
        if rows and not (pers_ps or glob_ps or uns_ps) and site_rows:  # fall back to the site rows
            last_r = rows[-1].get("round")
            for s in site_rows:
                if s.get("round") != last_r or not s.get("site"):
                    continue
                if s.get("role") == "unseen":
                    if num(s.get("global")) is not None:
                        uns_ps[str(s["site"])] = s["global"]
                else:
                    if num(s.get("personalized")) is not None:
                        pers_ps[str(s["site"])] = s["personalized"]
                    if num(s.get("global")) is not None:
                        glob_ps[str(s["site"])] = s["global"]
        b64 = plot_sites(pers_ps, glob_ps, uns_ps, metric)
        notes = []
        if not glob_ps:
            notes.append("no global-model evaluation in this run (e.g. a local-only method)")
        if not uns_ps:
            notes.append("no unseen sites evaluated")
        body = (_img(b64, f"per-site {metric}") if b64 else _missing("no per-site values recorded"))
        body += "".join(_missing(n) for n in notes)
        parts.append(_section(f"per-site {metric} at the last round", body))

        b64 = plot_scatter(pers_ps, glob_ps, metric)
        parts.append(_section("global vs personalized", _img(b64, "global vs personalized") if b64 else
                              _missing("needs both personalized and global values for the same sites")))

    # 5. bytes and time
    privacy = summary.get("privacy") if isinstance(summary.get("privacy"), dict) else None
    b64 = plot_privacy(rows, num(privacy.get("target_epsilon")) if privacy else None)
    if b64:
        parts.append(_section("privacy spent per round", _img(b64, "epsilon per round")))
    if privacy and str(privacy.get("noise", "")).startswith("REPRODUCIBLE"):  # research switch: say it loudly
        parts.append(_section("privacy: NOT private against the server", _missing(str(privacy["noise"]))))
    b64 = plot_traffic(rows)
    parts.append(_section("bytes and time per round", _img(b64, "bytes and time per round") if b64 else
                          _missing("no per-round traffic recorded")))

    # 6. table + rejections
    last_round = final.get("last_round") if isinstance(final.get("last_round"), dict) else {}
    last5 = final.get("last5_mean") if isinstance(final.get("last5_mean"), dict) else {}

    def lr(key: str) -> float | None:
        return num(last_round[key]) if key in last_round else mean_of(_last_block(rows, summary, key))

    def l5(key: str) -> float | None:
        return num(last5[key]) if key in last5 else _last5(rows, key)

    n5 = min(5, len(rows)) if rows else None
    trs = [
        ("personalized mean", lr("personalized"), l5("personalized")),
        ("personalized std", num((p_last or {}).get("std")) if isinstance(p_last, dict) else None,
         _last5(rows, "personalized", "std")),
        ("personalized bottom 10%", num((p_last or {}).get("bottom10")) if isinstance(p_last, dict) else None,
         _last5(rows, "personalized", "bottom10")),
        ("global mean", lr("global"), l5("global")),
        ("unseen mean (zero-shot)", lr("unseen"), l5("unseen")),
        ("unseen mean (adapted)", lr("unseen_adapted"), l5("unseen_adapted")),
    ]
    rejections = [(r.get("round"), j) for r in rows
                  for j in ((r.get("sites") or {}).get("rejected") or []) if isinstance(r.get("sites"), dict)]
    n_rej = final.get("rejections")
    if num(n_rej) is None:
        n_rej = len(rejections)
    l5_head = f"mean of last {n5}" if n5 and n5 < 5 else "mean of last 5"
    table = (f"<table><thead><tr><th>{esc(metric)}</th><th>last round</th><th>{esc(l5_head)}</th></tr></thead><tbody>"
             + "".join(f'<tr><td>{esc(k)}</td><td class="n">{fmt_acc(a)}</td><td class="n">{fmt_acc(b)}</td></tr>'
                       for k, a, b in trs)
             + f'<tr><td>rejected updates</td><td class="n" colspan="2">{esc(int(n_rej))}</td></tr>'
             + "</tbody></table>")
    if rejections:
        rej = ("<table><thead><tr><th>round</th><th>site</th><th>reason</th></tr></thead><tbody>"
               + "".join(f'<tr><td class="n">{esc(rnd)}</td><td>{esc(j.get("site") if isinstance(j, dict) else "")}'
                         f'</td><td>{esc(j.get("reason") if isinstance(j, dict) else j)}</td></tr>'
                         for rnd, j in rejections)
               + "</tbody></table>")
        table += "<h3>rejected updates</h3>" + rej
    elif n_rej:
        table += _missing("rejections were counted but not itemised in metrics.jsonl")
    else:
        table += _missing("no updates were rejected")
    parts.append(_section("summary", table))

    if not (summary or rows):
        parts.insert(3, _missing("summary.json and metrics.jsonl are missing or empty: nothing to plot"))

    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def render_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.html`` (self-contained) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir not found: {run_dir}")
    text = build_html(run_dir)
    out = run_dir / REPORT_NAME
    atomic_text(out, text)
    return out


if __name__ == "__main__":  # python -m server.report RUN_DIR [RUN_DIR ...]
    for d in sys.argv[1:] or ["."]:
        print(render_report(d))
