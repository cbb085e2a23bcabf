"""Which method pays: the joined-vs-alone comparison of several methods side by side, and over data sizes.

``server.compare.compare`` answers "what does joining gain each factory" for one method against each factory
alone. A plant manager choosing a method asks it of every method at once, and asks where (with how much data
of his own) joining pays at all. This module turns several such comparisons into

* ``board``: one row per method (each factory's gain with its spread over seeds, the mean gain, the worst
  factory, whether the issue-24 goal holds, bytes moved), ranked best first;
* ``sweep_point``: one point of the "gain over alone vs images per factory" curve.

It is arithmetic on ``compare``'s output and the runs' ``summary.json`` only (no training, no torch), so the
bench (``bench/pilot_methods.py``), ``kumiki pilot --methods`` and the report all rank the same way.

Definitions (the report and ``bench/RESULTS.md`` state them too):

* a factory's **gain** is joined minus alone (its personalized metric), per seed pair; its spread is the
  sample standard deviation over the pairs;
* the **mean gain** of a method is the mean over the training factories of their mean gains; its spread is
  the standard deviation over seeds of the per-seed mean over factories (how much the headline itself moves
  with the training randomness);
* a factory is **worse off** when its gain plus its spread is still below zero (the seeds agree it loses);
* with the safeguard (``client/safeguard.py``: each factory serves the better, on its validation split, of
  its personalized model and a model of its own), the gain is that of the **served** model; the personalized
  model's numbers stay in the row (``joined``);
* the **goal** (issue 24) holds when no factory's mean gain is below minus its spread and the mean gain is at
  least ``GOAL_POINTS`` (in the metric's units: 0.03 = 3 points of accuracy);
* methods are ranked by mean gain, then by fewer factories worse off, then by fewer bytes.
"""

from __future__ import annotations

import math
from typing import Any

from server.compare import stats

#: the issue-24 goal on the mean gain (a fraction: 3 points of accuracy)
GOAL_POINTS = 0.03


def worse_off(gain: dict[str, Any]) -> bool:
    """A factory's gain (``stats`` of its per-seed gains) is below zero by more than its spread: the seeds agree
    it loses. One seed pair has no spread, so any loss counts."""
    return gain["mean"] + (gain.get("std") or 0.0) < 0


def _per_seed_means(train: list[dict], key: str = "gain") -> list[float]:
    """The mean over factories of each seed pair's gain (pairs where every factory has a value)."""
    cols = [r[key]["values"] for r in train if r.get(key) and r[key].get("values")]
    if not cols:
        return []
    n = min(len(c) for c in cols)
    return [sum(c[i] for c in cols) / len(cols) for i in range(n)]


def _side(train: list[dict], key: str) -> dict[str, Any]:
    """Per-factory gains under ``key`` (``gain``: the personalized model; ``gain_served``: what the safeguard
    serves), their mean, its spread over seeds, the factories worse off and the goal."""
    sites = {r["site"]: {"mean": r[key]["mean"], "std": r[key].get("std"), "n": r[key].get("n")}
             for r in train if r.get(key)}
    means = [v["mean"] for v in sites.values()]
    per_seed = _per_seed_means(train, key)
    spread = stats(per_seed) if per_seed else None
    mean_gain = sum(means) / len(means) if means else None
    below = [s for s, v in sites.items() if v["mean"] < -(v["std"] or 0.0)]
    return {"sites": sites, "mean_gain": mean_gain, "mean_gain_std": spread["std"] if spread else None,
            "worst": min(means) if means else None, "gaining": sum(m > 0 for m in means),
            "worse_off": [s for s, v in sites.items() if worse_off(v)],
            "goal": mean_gain is not None and not below and mean_gain >= GOAL_POINTS}


def summarize(method: str, comp: dict[str, Any], bytes_moved: float | None = None,
              rounds: int | None = None) -> dict[str, Any]:
    """One leaderboard row from one method's comparison (``compare``'s output) against each factory alone.

    The row's headline is what each factory would deploy: with the safeguard (runs that report it,
    ``client/safeguard.py``) the model it serves, else its personalized model; ``joined`` keeps the
    personalized model's numbers either way."""
    train = comp.get("train") or []
    joined = _side(train, "gain")
    for r in train:
        if r["site"] in joined["sites"]:
            joined["sites"][r["site"]].update({"a": (r.get("a") or {}).get("mean"), "b": (r.get("b") or {}).get("mean"),
                                               "num_train": r.get("num_train")})
    served = _side(train, "gain_served") if any(r.get("gain_served") for r in train) else None
    head = served or joined
    serves: dict[str, dict[str, int]] = {r["site"]: r["serves"] for r in train if r.get("serves")}
    return {
        "method": method, "rounds": rounds, "pairs": comp.get("pairs"), "seeds": comp.get("seeds"),
        "metric": comp.get("metric"), "fraction": comp.get("fraction"), "safeguard": served is not None,
        **head, "joined": joined, "serves": serves, "bytes": bytes_moved,
    }


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first: highest mean gain, then fewest factories worse off, then fewest bytes; rank 1, 2, ..."""
    def key(r):
        g = r.get("mean_gain")
        return (-(g if g is not None and math.isfinite(g) else -math.inf), len(r.get("worse_off") or []),
                r.get("bytes") if r.get("bytes") is not None else math.inf, r["method"])

    out = sorted(rows, key=key)
    for i, r in enumerate(out, start=1):
        r["rank"] = i
    return out


def board(entries: list[tuple[str, dict[str, Any], float | None]], rounds: int | None = None) -> list[dict[str, Any]]:
    """``entries``: (method, its comparison against local, bytes moved per run); the ranked leaderboard."""
    return rank([summarize(m, c, b, rounds) for m, c, b in entries])


def bytes_moved(summaries: list[dict[str, Any]]) -> float | None:
    """Mean over runs of the bytes a run moved (up + down, every round): ``summary.json``'s ``bytes``."""
    vals = []
    for s in summaries:
        b = s.get("bytes") if isinstance(s.get("bytes"), dict) else {}
        up, down = b.get("up_total"), b.get("down_total")
        if isinstance(up, (int, float)) and isinstance(down, (int, float)):
            vals.append(float(up) + float(down))
    return sum(vals) / len(vals) if vals else None


def sweep_point(label: str, sizes: list[int], comp: dict[str, Any]) -> dict[str, Any]:
    """One regime of the data-size sweep: its images per training factory (``sizes``, training factories in
    order) and the gain of each factory and of their mean (with the spread over seeds)."""
    row = summarize(str((comp.get("a") or {}).get("method") or "?"), comp)
    names = [r["site"] for r in comp.get("train") or []]
    per_site = []
    for i, site in enumerate(names):
        g = row["sites"].get(site)
        if g is None:
            continue
        j = row["joined"]["sites"].get(site) or {}
        per_site.append({"site": site, "images": sizes[i] if i < len(sizes) else None, "num_train": j.get("num_train"),
                         "gain": g["mean"], "std": g["std"], "gain_joined": j.get("mean")})
    return {"label": label, "sizes": list(sizes), "equal": len(set(sizes)) == 1, "method": row["method"],
            "pairs": row["pairs"], "mean_gain": row["mean_gain"], "mean_gain_std": row["mean_gain_std"],
            "mean_gain_joined": row["joined"]["mean_gain"], "safeguard": row["safeguard"], "goal": row["goal"],
            "sites": per_site}
