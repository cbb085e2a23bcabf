"""The report's plain-language parts: what the run is, each factory, and what joining gained it.

``server.report`` calls these; they read the run dir contract only (``summary.json``'s ``participation``
profiles, ``config.json``, ``comparison.json`` from ``server.compare``) and return HTML strings. Metric
names and directions come from the runs (``summary["metric"]``, ``higher_is_better``): accuracy-like
fractions are shown in % with gains in points, other metrics (PSNR, perplexity, ...) as they are.
"""

from __future__ import annotations

import math
from typing import Any

from matplotlib.figure import Figure

from server.compare import higher_is_better, is_fraction
from server.leaderboard import worse_off
from server.report_parts import png as _png, site_key  # the report's PNG helper and natural site order

C_ALONE, C_JOINED, C_ZERO, C_ADAPTED = "#9e9e9e", "#1f77b4", "#2ca02c", "#98df8a"

METRIC_MEANING = {
    "accuracy": "the share of a factory's test images the model labels correctly",
    "miou": "mean intersection over union of the predicted and true segments",
    "psnr": "peak signal-to-noise ratio of the reconstruction, in dB",
    "perplexity": "how surprised the model is by held-out text (lower is better)",
}


def _esc(x: Any) -> str:
    import html

    return html.escape("" if x is None else str(x), quote=True)


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def fmt_value(v: Any, fraction: bool) -> str:
    x = _num(v)
    if x is None:
        return "&ndash;"
    return f"{100 * x:.1f}%" if fraction else f"{x:.4g}"


def fmt_gain(st: dict | None, fraction: bool, spread: bool = True, unit: bool = True) -> str:
    """``+5.2 ± 1.3 points`` (fractions) or ``+0.52 ± 0.13``; the ± is the sample std over seeds."""
    if not st or _num(st.get("mean")) is None:
        return "&ndash;"
    scale, unit_text = (100.0, " points" if unit else "") if fraction else (1.0, "")
    text = (f"{scale * st['mean']:+.1f}" if fraction else f"{st['mean']:+.3g}").replace("-", "&minus;")
    if spread and _num(st.get("std")) is not None:
        text += f" &plusmn; {scale * st['std']:.1f}" if fraction else f" &plusmn; {st['std']:.2g}"
    return text + unit_text


def fmt_stat(st: dict | None, fraction: bool) -> str:
    if not st:
        return "&ndash;"
    text = fmt_value(st.get("mean"), fraction)
    if _num(st.get("std")) is not None:
        text += f" &plusmn; {100 * st['std']:.1f}" if fraction else f" &plusmn; {st['std']:.2g}"
    return text


def describe_domain(domain: Any) -> str:
    """A derived camera shift in words (pilots name their cameras by code, e.g. ``rotate:25``); any other
    description is shown as the factory gave it."""
    if not domain:
        return "not given"
    d = str(domain)
    kind, _, arg = d.partition(":")
    words = {"identity": "reference camera", "invert": "inverted images", "blur": "blurred camera",
             "rot90": "camera turned 90°", "rot180": "camera turned 180°", "rot270": "camera turned 270°"}
    if d in words:
        text = words[d]
    elif kind == "rotate" and arg:
        text = f"camera tilted {arg}°"
    elif kind == "contrast" and arg:
        text = f"low-contrast camera (×{arg})"
    elif kind == "noise" and arg:
        text = f"noisy sensor (σ {arg})"
    else:
        return _esc(d)
    return f"{_esc(text)} <span class=\"note\">({_esc(d)})</span>"


def _profiles(summary: dict) -> dict[str, dict]:
    part = summary.get("participation") if isinstance(summary.get("participation"), dict) else {}
    prof = part.get("profiles") if isinstance(part.get("profiles"), dict) else {}
    return {str(k): v for k, v in prof.items() if isinstance(v, dict)}


def _names(items: list[str]) -> str:
    """a, b and c"""
    items = [_esc(i) for i in items]
    if len(items) <= 1:
        return items[0] if items else "none"
    return ", ".join(items[:-1]) + " and " + items[-1]


def intro(summary: dict, config: dict, site_key) -> str:
    """Two sentences on what ran, and a glossary of the numbers, so the page reads without the README."""
    metric = str(summary.get("metric") or "accuracy")
    prof = _profiles(summary)
    train = sorted((s for s, p in prof.items() if p.get("role") == "train"), key=site_key)
    unseen = sorted((s for s, p in prof.items() if p.get("role") == "unseen"), key=site_key)
    method = summary.get("method") or "?"
    rounds = summary.get("rounds")
    eval_cfg = config.get("eval") if isinstance(config.get("eval"), dict) else {}
    adapt = eval_cfg.get("unseen_adapt_epochs")
    if not prof:
        return ""
    if method == "local":
        what = (f"<p>Each of the {len(train)} factories ({_names(train)}) trained a model <strong>alone</strong> on "
                f"its own images for {_esc(rounds)} rounds: nothing left any factory (method <code>local</code>, the "
                "baseline a federation must beat).")
    else:
        what = (f"<p>{len(train)} factories ({_names(train)}) trained one model <strong>together</strong> for "
                f"{_esc(rounds)} rounds with <code>{_esc(method)}</code>. Their images never left them: only the "
                "shared part of the model travelled, and each factory kept a private part of its own.")
    if unseen:
        what += (f" {_names(unseen)} took no part in training: {'it stands' if len(unseen) == 1 else 'they stand'} "
                 "for a factory that joins later (a new factory on day one).")
    what += "</p>"
    gloss = [
        (metric, METRIC_MEANING.get(metric.lower(), f"the task's metric ({'higher' if higher_is_better(summary) else 'lower'} is better)")
         + ", on test images the model never trained on"),
        ("personalized", "each training factory's own model (the shared part plus its private part) on its own test "
                         "images: what the factory would deploy"),
        ("global", "the shared model alone on a factory's test images"),
        ("unseen, zero-shot", "the shared model on a new factory's images before it trains at all"),
        ("unseen, adapted", "the new factory after the method's short adaptation on its own images"
                            + (f" ({_esc(adapt)} epochs)" if adapt else "")),
        ("bottom 10%", "the mean over the worst tenth of the factories (at least one)"),
    ]
    dl = "".join(f"<dt>{_esc(k)}</dt><dd>{v}</dd>" for k, v in gloss)
    return (f'<section class="intro">{what}<details><summary>How to read the numbers</summary>'
            f'<dl class="gloss">{dl}</dl></details></section>')


def factories(summary: dict, site_key) -> str:
    """One row per factory: role, camera/domain, train and test images, and its last-round values."""
    prof = _profiles(summary)
    if not prof:
        return ""
    metric = str(summary.get("metric") or "accuracy")
    frac = is_fraction(metric)

    def ps(key: str) -> dict:
        b = summary.get(key)
        return b.get("per_site", {}) if isinstance(b, dict) and isinstance(b.get("per_site"), dict) else {}

    pers, glob, uns, ada = ps("personalized"), ps("global"), ps("unseen"), ps("unseen_adapted")
    # the inputs' scale gets a column once any factory declared one (site.json ``inputs``; all [0, 1] otherwise)
    scales = any(p.get("inputs") not in (None, "", "[0, 1]") for p in prof.values())
    rows = []
    for site in sorted(prof, key=lambda s: (prof[s].get("role") != "train", site_key(s))):
        p = prof[site]
        role = "training" if p.get("role") == "train" else "new (unseen)"
        if p.get("role") == "train":
            vals = f"<td class=\"n\">{fmt_value(pers.get(site), frac)}</td><td class=\"n\">{fmt_value(glob.get(site), frac)}</td>"
        else:
            vals = (f"<td class=\"n\">{fmt_value(ada.get(site), frac)} <span class=\"note\">adapted</span></td>"
                    f"<td class=\"n\">{fmt_value(uns.get(site), frac)} <span class=\"note\">zero-shot</span></td>")
        scale = f"<td>{_esc(p.get('inputs') or '[0, 1]')}</td>" if scales else ""
        rows.append(f"<tr><td><strong>{_esc(site)}</strong></td><td>{role}</td><td>{describe_domain(p.get('domain'))}"
                    f"</td><td class=\"n\">{_esc(p.get('num_train'))}</td><td class=\"n\">{_esc(p.get('num_test'))}</td>"
                    f"{scale}{vals}</tr>")
    head = (f"<tr><th>factory</th><th>role</th><th>camera / domain</th><th>train images</th><th>test images</th>"
            + ("<th>inputs</th>" if scales else "")
            + f"<th>personalized {_esc(metric)}</th><th>global {_esc(metric)}</th></tr>")
    return (f"<table>{head}{''.join(rows)}</table><p class=\"note\">Values: this run, last round. Sizes and cameras are "
            "what each factory's site reported when it joined (its site.json); the images themselves never left it.</p>")


def plot_comparison(comp: dict) -> str | None:
    """Grouped bars: each training factory alone vs joined (± std over seeds), then each new factory alone,
    zero-shot and adapted."""
    frac = bool(comp.get("fraction"))
    scale = 100.0 if frac else 1.0
    train = sorted(comp.get("train") or [], key=lambda r: site_key(r["site"]))
    unseen = sorted(comp.get("unseen") or [], key=lambda r: site_key(r["site"]))
    if not train and not unseen:
        return None

    def mv(st):
        return (scale * st["mean"], scale * st["std"] if _num(st.get("std")) is not None else 0.0) if st else (math.nan, 0.0)

    n = len(train) + len(unseen)
    fig = Figure(figsize=(min(max(7.0, 1.25 * n + 2.5), 16.0), 4.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    labels, xs = [], []
    for i, row in enumerate(train):
        (b, be), (a, ae) = mv(row.get("b")), mv(row.get("a"))
        ax.bar(i - 0.2, b, 0.38, yerr=be, capsize=3, color=C_ALONE, label="alone" if i == 0 else None)
        ax.bar(i + 0.2, a, 0.38, yerr=ae, capsize=3, color=C_JOINED, label="joined (personalized)" if i == 0 else None)
        g = row.get("gain")
        if g and _num(g.get("mean")) is not None and not math.isnan(max(a, b)):
            ax.annotate(f"{scale * g['mean']:+.1f}" if frac else f"{g['mean']:+.3g}", (i, max(a + ae, b + be)),
                        xytext=(0, 3), textcoords="offset points", ha="center", fontsize=9, fontweight="bold")
        labels.append(row["site"])
        xs.append(i)
    off = len(train) + (0.6 if train else 0)
    for j, row in enumerate(unseen):
        x = off + j * 1.2
        for dx, key, color, lab in ((-0.3, "alone", C_ALONE, None), (0.0, "zero_shot", C_ZERO, "new factory, zero-shot"),
                                    (0.3, "adapted", C_ADAPTED, "new factory, adapted")):
            v, e = mv(row.get(key))
            ax.bar(x + dx, v, 0.28, yerr=e, capsize=3, color=color, label=lab if j == 0 else None)
            if not math.isnan(v):  # a zero-shot 0% is a bar of no height: say it
                ax.annotate(f"{v:.0f}" if frac else f"{v:.3g}", (x + dx, v + e), xytext=(0, 2),
                            textcoords="offset points", ha="center", fontsize=7)
        labels.append(f"{row['site']}\n(new)")
        xs.append(x)
    if train and unseen:
        ax.axvline(len(train) - 0.5 + 0.3, color="0.6", lw=0.8, ls=":")
    ax.set_xticks(xs, labels, fontsize=9)
    metric = comp.get("metric", "")
    ax.set_ylabel(f"{metric} (%)" if frac else metric)
    ax.set_title(f"each factory alone vs in the federation (numbers: gain{' in points' if frac else ''})", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if frac:
        ax.set_ylim(0, 112)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncols=4, frameon=False)
    return _png(fig)


def comparison(comp: dict, img) -> str:
    """The answer first (sentences), then the table, the plot and how it was measured."""
    frac = bool(comp.get("fraction"))
    metric = str(comp.get("metric") or "accuracy")
    a, b = comp.get("a") or {}, comp.get("b") or {}
    n = comp.get("pairs") or 0
    train = comp.get("train") or []
    unseen = comp.get("unseen") or []
    overall = comp.get("overall") or {}
    lines = []
    if train:
        gaining = [r for r in train if r.get("gain") and r["gain"]["mean"] > 0]
        mean = _num(overall.get("gain_mean"))
        against = "training alone" if b.get("method") == "local" else _esc(b.get("label"))
        clear = sum(1 for r in gaining if r["gain"].get("std") is not None and r["gain"]["mean"] > r["gain"]["std"])
        beyond = (f" ({'none' if not clear else clear} of them by more than the spread over seeds)"
                  if n > 1 and gaining else "")
        lines.append(f"Joining raised the {_esc(metric)} of <strong>{len(gaining)} of {len(train)}</strong> training "
                     f"factories over {against}{beyond}; averaged over the factories it changed it by "
                     f"<strong>{fmt_gain({'mean': mean}, frac, spread=False)}</strong>.")
        for r in train:
            g = r.get("gain")
            if not g:
                continue
            lo, hi = g["mean"] - (g.get("std") or 0.0), g["mean"] + (g.get("std") or 0.0)
            verdict = ("a clear gain" if lo > 0 else "a clear loss" if hi < 0
                       else "no clear difference: within the spread over seeds") if n > 1 else (
                "a gain" if g["mean"] > 0 else "a loss" if g["mean"] < 0 else "no change")
            lines.append(f"<strong>{_esc(r['site'])}</strong>: {fmt_stat(r.get('b'), frac)} alone &rarr; "
                         f"{fmt_stat(r.get('a'), frac)} joined: {fmt_gain(g, frac)} ({verdict}).")
    guarded = [r for r in train if r.get("gain_served")]
    if guarded:  # the safeguard: what each factory serves, against alone; an honest verdict first
        losing = [r for r in guarded if r["gain_served"]["mean"] < 0]
        clear = [r for r in losing if worse_off(r["gain_served"])]
        mean = _num(overall.get("served_gain_mean"))
        if not losing:
            verdict = (f"With the safeguard no training factory is worse off than alone: each serves the better of its "
                       f"joined and its own model on validation, and the served model gains "
                       f"<strong>{fmt_gain({'mean': mean}, frac, spread=False)}</strong> on average.")
        else:
            verdict = (f"With the safeguard <strong>{len(losing)} of {len(guarded)}</strong> training factories "
                       f"({_names([r['site'] for r in losing])}) still do worse than alone on test"
                       + (f", {len(clear)} of them beyond the spread over seeds" if n > 1 else "")
                       + f"; the served model changes the {_esc(metric)} by "
                         f"<strong>{fmt_gain({'mean': mean}, frac, spread=False)}</strong> on average.")
        lines.append(verdict)
        for r in guarded:
            picks = r.get("serves") or {}
            which = ", ".join(f"{k} model in {v} of {n}" for k, v in picks.items()) or "&ndash;"
            lines.append(f"<strong>{_esc(r['site'])}</strong> serves its {which} run(s): {fmt_stat(r.get('served'), frac)}"
                         f" against {fmt_stat(r.get('b'), frac)} alone, {fmt_gain(r['gain_served'], frac)}.")
    for r in unseen:
        parts = [f"zero-shot {fmt_stat(r.get('zero_shot'), frac)}"]
        if r.get("adapted"):
            parts.append(f"after adapting on its own images {fmt_stat(r.get('adapted'), frac)}")
        if r.get("alone"):
            parts.append(f"against {fmt_stat(r.get('alone'), frac)} training alone on the same images")
        lines.append(f"New factory <strong>{_esc(r['site'])}</strong> on day one: {', '.join(parts)}.")
    answer = "<ul class=\"answer\">" + "".join(f"<li>{x}</li>" for x in lines) + "</ul>"

    pts = " (points)" if frac else ""
    head = (f"<tr><th>factory</th><th>camera / domain</th><th>train / test images</th><th>alone</th>"
            f"<th>joined</th><th>gain{pts}</th><th>range over seeds{pts}</th></tr>")
    rows = []
    for r in train:
        g = r.get("gain") or {}
        rng = (f"{fmt_gain({'mean': g['min']}, frac, False, False)} to {fmt_gain({'mean': g['max']}, frac, False, False)}"
               if g and g.get("n", 0) > 1 else "&ndash;")
        rows.append(f"<tr><td><strong>{_esc(r['site'])}</strong></td><td>{describe_domain(r.get('domain'))}</td>"
                    f"<td class=\"n\">{_esc(r.get('num_train'))} / {_esc(r.get('num_test'))}</td>"
                    f"<td class=\"n\">{fmt_stat(r.get('b'), frac)}</td><td class=\"n\">{fmt_stat(r.get('a'), frac)}</td>"
                    f"<td class=\"n\"><strong>{fmt_gain(r.get('gain'), frac, unit=False)}</strong></td>"
                    f"<td class=\"n\">{rng}</td></tr>")
    for r in unseen:
        rows.append(f"<tr><td><strong>{_esc(r['site'])}</strong> (new)</td><td>{describe_domain(r.get('domain'))}</td>"
                    f"<td class=\"n\">{_esc(r.get('num_train'))} / {_esc(r.get('num_test'))}</td>"
                    f"<td class=\"n\">{fmt_stat(r.get('alone'), frac)}</td>"
                    f"<td class=\"n\">{fmt_stat(r.get('zero_shot'), frac)} zero-shot<br>"
                    f"{fmt_stat(r.get('adapted'), frac)} adapted</td>"
                    f"<td class=\"n\"><strong>{fmt_gain(r.get('gain_adapted'), frac, unit=False)}</strong> adapted<br>"
                    f"{fmt_gain(r.get('gain_zero_shot'), frac, unit=False)} zero-shot</td><td class=\"n\">&ndash;</td></tr>")
    table = f"<table>{head}{''.join(rows)}</table>"
    engines = sorted({str(x.get("engine")) for side in (a, b) for x in side.get("runs", []) if x.get("engine")})
    how = [f"<strong>Joined</strong>: {_esc(a.get('label'))}; <strong>alone</strong>: {_esc(b.get('label'))}; "
           f"{n} pair{'s' if n != 1 else ''} of runs (paired by {_esc(comp.get('paired_by'))}"
           + (f", seeds {', '.join(_esc(s) for s in comp.get('seeds') or [])}" if comp.get("seeds") else "") + ").",
           "&plusmn; is the standard deviation over those seeds: the same factory data, other training randomness "
           "(model initialization, batch order). A gain whose &plusmn; range stays above zero is one the seeds agree on."
           if n > 1 else "One seed: no spread is shown; `kumiki pilot --seeds 3` measures it.",
           "Gain = joined minus alone" + (" (for this metric lower is better, so: alone minus joined)"
                                           if not comp.get("higher_is_better", True) else "")
           + "; for a new factory, alone = a model trained only on its own images for the same number of epochs "
             "as its adaptation."]
    if engines:
        words = {"deployment": "deployment (real SuperLink and SuperNodes)", "inprocess": "inprocess",
                 "simulation": "simulation (Flower's simulation engine)"}
        how.append("Engines: " + ", ".join(_esc(words.get(e, e)) for e in engines) + " (see each run below). In-process runs call "
                   "the same ServerApp and ClientApp code without sockets; the local-only baseline exchanges nothing, "
                   "so where it ran does not matter beyond the last digits.")
    how += [_esc(x) for x in comp.get("notes") or []]
    runs = "".join(f"<li>{_esc(side.get('label'))}: <code>{_esc(x.get('dir'))}</code> (seed {_esc(x.get('seed'))}, "
                   f"{_esc(x.get('engine'))}, {_esc(x.get('status'))})</li>"
                   for side in (a, b) for x in side.get("runs", []))
    return (answer + (img or "") + table + "<ul class=\"how\">" + "".join(f"<li>{x}</li>" for x in how) + "</ul>"
            + f"<details><summary>runs compared</summary><ul>{runs}</ul></details>")


def safeguard(summary: dict, site_key) -> str:
    """The safeguard's table (client/safeguard.py): per training factory, the model it serves, both models on
    validation and on test, what the choice is worth, and the extra compute per round."""
    g = summary.get("safeguard")
    if not isinstance(g, dict):
        return ""
    if g.get("applies"):
        return f"<p>{_esc(g['applies'])}.</p>"
    frac = is_fraction(str(summary.get("metric") or "accuracy"))
    secs = g.get("extra_time_per_round_s") or {}
    cost = (f"The own models' training adds {secs['max']:.2f} s per round on the slowest factory "
            f"({secs['mean']:.2f} s on average per factory)." if _num(secs.get("max")) is not None else "")
    if g.get("withheld"):
        return f"<p>{_esc(g['withheld'])}. {cost}</p>"
    serves = g.get("serves") or {}
    if not serves:
        return f"<p>No factory reported a choice. {cost}</p>"
    pers = (summary.get("personalized") or {}).get("per_site") or {}
    own = (g.get("own") or {}).get("per_site") or {}
    served = (g.get("served") or {}).get("per_site") or {}
    val = g.get("validation") or {}
    rows = []
    for site in sorted(serves, key=site_key):
        v = val.get(site) or {}
        worth = (_num(served.get(site)) - _num(pers.get(site))
                 if _num(served.get(site)) is not None and _num(pers.get(site)) is not None else None)
        rows.append(f"<tr><td><strong>{_esc(site)}</strong></td><td>{_esc(serves[site])}</td>"
                    f"<td class=\"n\">{fmt_value(v.get('joined'), frac)}</td><td class=\"n\">{fmt_value(v.get('own'), frac)}</td>"
                    f"<td class=\"n\">{fmt_value(pers.get(site), frac)}</td><td class=\"n\">{fmt_value(own.get(site), frac)}</td>"
                    f"<td class=\"n\"><strong>{fmt_value(served.get(site), frac)}</strong></td>"
                    f"<td class=\"n\">{fmt_gain({'mean': worth}, frac, spread=False, unit=False)}</td></tr>")
    head = ("<tr><th>factory</th><th>serves</th><th>validation: joined</th><th>validation: own</th>"
            "<th>test: joined</th><th>test: own</th><th>test: served</th><th>choice worth (served &minus; joined)</th></tr>")
    n_own = sum(1 for x in serves.values() if x == "own")
    text = (f"<p>Each training factory held out {100 * float(g.get('val_fraction') or 0):.0f}% of its training images as "
            f"validation, trained a model of its own beside the federation (it never left the factory), and serves "
            f"whichever is better on validation: <strong>{n_own} of {len(serves)}</strong> serve their own model "
            f"this round. {cost}</p>")
    return text + f"<table>{head}{''.join(rows)}</table>"
