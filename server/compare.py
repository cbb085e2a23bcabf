"""The manager's question: what does joining gain each factory over training alone, and what does a new
factory get on day one?

``compare(a_runs, b_runs)`` reads finished run dirs (``summary.json``, ``config.json``): side A is the
federation (one run per seed), side B the baseline (e.g. ``method.name = local``, each factory alone) on the
same factories. Runs are paired by ``run.seed`` (by order when the seeds do not match). Per training factory
it gives A's and B's personalized metric and the gain A - B over the pairs (mean, sample std, min, max);
per unseen (new) factory its zero-shot and adapted metric under A against B's own new-site value (for
``local``: a model trained alone on that factory's data). Nothing here assumes accuracy: the metric is the
runs' ``summary["metric"]``, and for a lower-is-better metric (perplexity, a loss) the gain is B - A, so a
positive gain always means joining helped.

The result is written into the run dir as ``comparison.json`` (the numbers, not just links: moving or
replacing the other runs later cannot change a report) and ``server.report`` renders it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kumiki.atomic import atomic_json
from kumiki.tasks import BY_METRIC
from server.report_parts import read_json as _read  # one reader of a run dir's JSON files (missing or bad: {})

COMPARISON_FILE = "comparison.json"


def higher_is_better(summary: dict[str, Any]) -> bool:
    """The direction of the runs' metric (``kumiki/tasks.py``: perplexity is lower-is-better)."""
    flag = summary.get("higher_is_better")
    if isinstance(flag, bool):
        return flag
    info = BY_METRIC.get(str(summary.get("metric") or "accuracy"))
    return info.higher_is_better if info else True


def is_fraction(metric: str) -> bool:
    """A metric in [0, 1] (accuracy, mIoU, F-score): shown as percentages, gains in points."""
    info = BY_METRIC.get(str(metric))
    return info is not None and (info.low, info.high) == (0.0, 1.0)


def _per_site(summary: dict[str, Any], key: str) -> dict[str, float]:
    block = summary.get(key)
    if not isinstance(block, dict) or not isinstance(block.get("per_site"), dict):
        return {}
    return {str(s): float(v) for s, v in block["per_site"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _served(summary: dict[str, Any]) -> dict[str, float]:
    """The safeguard's served model per training site (``summary["safeguard"]["served"]``), else {}."""
    guard = summary.get("safeguard")
    return _per_site(guard, "served") if isinstance(guard, dict) else {}


def _serves(summary: dict[str, Any]) -> dict[str, str]:
    guard = summary.get("safeguard")
    serves = guard.get("serves") if isinstance(guard, dict) else None
    return {str(k): str(v) for k, v in serves.items()} if isinstance(serves, dict) else {}


def stats(values: list[float]) -> dict[str, Any] | None:
    """mean, sample std (None for one value), min, max and the values themselves."""
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n, "values": list(values)}


class _Run:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir).resolve()
        self.summary = _read(self.dir / "summary.json")
        if not self.summary:
            raise ValueError(f"{self.dir} has no readable summary.json: not a finished Kumiki run")
        self.config = _read(self.dir / "config.json")
        run = self.config.get("run") if isinstance(self.config.get("run"), dict) else {}
        self.seed = run.get("seed")
        self.engine = self.config.get("engine")
        self.method = self.summary.get("method") or "?"
        part = self.summary.get("participation") if isinstance(self.summary.get("participation"), dict) else {}
        self.profiles = part.get("profiles") if isinstance(part.get("profiles"), dict) else {}

    def info(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "seed": self.seed, "engine": self.engine, "status": self.summary.get("status"),
                "rounds": self.summary.get("rounds")}


def _pairs(a: list[_Run], b: list[_Run]) -> tuple[list[tuple[_Run, _Run]], str]:
    by_seed = {r.seed: r for r in b}
    if all(r.seed is not None for r in a + b) and len(by_seed) == len(b) and len({r.seed for r in a}) == len(a):
        pairs = [(r, by_seed[r.seed]) for r in a if r.seed in by_seed]
        if pairs:
            return pairs, "seed"
    return list(zip(a, b)), "order"


def compare(a_runs: list[str | Path], b_runs: list[str | Path], a_label: str | None = None,
            b_label: str | None = None, notes: list[str] | None = None) -> dict[str, Any]:
    """The comparison of A (the federation) against B (the baseline); see the module docstring."""
    a, b = [_Run(d) for d in a_runs], [_Run(d) for d in b_runs]
    if not a or not b:
        raise ValueError("compare needs at least one run on each side")
    metric = str(a[0].summary.get("metric") or "accuracy")
    other = {str(r.summary.get("metric") or "accuracy") for r in a + b}
    if other != {metric}:
        raise ValueError(f"the runs report different metrics ({', '.join(sorted(other))}); nothing to compare")
    sign = 1.0 if higher_is_better(a[0].summary) else -1.0
    pairs, paired_by = _pairs(a, b)
    notes = list(notes or [])
    if paired_by == "order" and len(a) > 1:
        notes.append("the two sides' seeds differ, so runs were paired in the order given")
    if len(pairs) < max(len(a), len(b)):
        notes.append(f"{max(len(a), len(b)) - len(pairs)} run(s) had no partner on the other side and were left out")

    profiles: dict[str, dict] = {}
    for r in reversed(a):
        profiles.update(r.profiles)
    for r in b:
        for site, p in r.profiles.items():
            mine = profiles.get(site)
            if mine and (mine.get("num_train"), mine.get("num_test")) != (p.get("num_train"), p.get("num_test")):
                notes.append(f"{site} has other data sizes in {r.dir.name} ({p.get('num_train')}/{p.get('num_test')}"
                             f" vs {mine.get('num_train')}/{mine.get('num_test')}): not the same factory data")
    train_sites = sorted({s for r, _ in pairs for s in _per_site(r.summary, "personalized")})
    unseen_sites = sorted({s for r, _ in pairs for k in ("unseen", "unseen_adapted") for s in _per_site(r.summary, k)})

    def facts(site: str) -> dict[str, Any]:
        p = profiles.get(site) or {}
        return {"site": site, "domain": p.get("domain"), "num_train": p.get("num_train"), "num_test": p.get("num_test")}

    def side(runs: list[_Run], key: str, site: str) -> list[float]:
        return [v for r in runs if (v := _per_site(r.summary, key).get(site)) is not None]

    def gain(key_a: str, key_b: str, site: str) -> dict[str, Any] | None:
        vals = []
        for ra, rb in pairs:
            va, vb = _per_site(ra.summary, key_a).get(site), _per_site(rb.summary, key_b).get(site)
            if va is not None and vb is not None:
                vals.append(sign * (va - vb))
        return stats(vals)

    paired_a, paired_b = [p[0] for p in pairs], [p[1] for p in pairs]
    train = []
    for site in train_sites:
        row = {**facts(site), "a": stats(side(paired_a, "personalized", site)),
               "b": stats(side(paired_b, "personalized", site)), "gain": gain("personalized", "personalized", site)}
        if row["b"] is None:
            notes.append(f"{site} has no personalized value in the baseline runs")
        # the safeguard (client/safeguard.py): what the factory serves and what that is worth against alone
        served = [v for r in paired_a if (v := _served(r.summary).get(site)) is not None]
        if served:
            vals = [sign * (va - vb) for ra, rb in pairs
                    if (va := _served(ra.summary).get(site)) is not None
                    and (vb := _per_site(rb.summary, "personalized").get(site)) is not None]
            picks = [_serves(r.summary).get(site) for r in paired_a]
            row.update({"served": stats(served), "gain_served": stats(vals),
                        "serves": {k: picks.count(k) for k in ("joined", "own") if picks.count(k)}})
        train.append(row)
    unseen = []
    for site in unseen_sites:
        alone_key = "unseen_adapted" if any(_per_site(r.summary, "unseen_adapted").get(site) is not None
                                            for r in paired_b) else "unseen"
        unseen.append({**facts(site), "zero_shot": stats(side(paired_a, "unseen", site)),
                       "adapted": stats(side(paired_a, "unseen_adapted", site)),
                       "alone": stats(side(paired_b, alone_key, site)),
                       "gain_zero_shot": gain("unseen", alone_key, site),
                       "gain_adapted": gain("unseen_adapted", alone_key, site)})
    gains = [row["gain"]["mean"] for row in train if row["gain"]]
    served_gains = [row["gain_served"]["mean"] for row in train if row.get("gain_served")]
    return {
        "metric": metric, "higher_is_better": sign > 0, "fraction": is_fraction(metric),
        "a": {"label": a_label or f"{a[0].method} (joined)", "method": a[0].method, "runs": [r.info() for r in a]},
        "b": {"label": b_label or (f"{b[0].method} (each factory alone)" if b[0].method == "local" else b[0].method),
              "method": b[0].method, "runs": [r.info() for r in b]},
        "paired_by": paired_by, "pairs": len(pairs),
        "seeds": [ra.seed for ra, _ in pairs],
        "train": train, "unseen": unseen,
        "overall": {"gain_mean": sum(gains) / len(gains) if gains else None,
                    "sites_gaining": sum(g > 0 for g in gains), "sites": len(gains),
                    # with the safeguard: the model each factory serves against alone (None: not reported)
                    "served_gain_mean": sum(served_gains) / len(served_gains) if served_gains else None,
                    "sites_losing_served": [row["site"] for row in train
                                            if row.get("gain_served") and row["gain_served"]["mean"] < 0]},
        "notes": notes,
    }


def write_comparison(run_dir: str | Path, comparison: dict[str, Any]) -> Path:
    path = Path(run_dir) / COMPARISON_FILE
    atomic_json(path, comparison, indent=2)
    return path


def read_comparison(run_dir: str | Path) -> dict[str, Any] | None:
    obj = _read(Path(run_dir) / COMPARISON_FILE)
    return obj or None
