"""Run outputs (ARCHITECTURE section 8): config.json, metrics.jsonl, summary.json.

``metrics.jsonl`` holds one ``{"kind": "round"}`` object per round, one
``{"kind": "site"}`` object per site per round and a closing ``{"kind": "final"}``
object (last-round and mean-of-last-5 values). ``summary.json`` has exactly the
contract's keys, with last-round values.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from kumiki.contract import NUM_EXAMPLES as C_NUM_EXAMPLES
from kumiki.contract import WITHHELD
from kumiki.tasks import TASKS, metric_key
from server.eval_plan import eval_every
from strategies.base import KumikiStrategy, RoundStats
from kumiki.atomic import atomic_json, atomic_text

console = Console(stderr=True, highlight=False, soft_wrap=True)


def describe(per_site: dict[str, float], higher_is_better: bool = True) -> dict[str, Any] | None:
    """mean, population std, bottom10 (mean of the worst ceil(10%) sites: the lowest accuracies, the
    highest perplexities) and per-site values."""
    if not per_site:
        return None
    vals = np.array(sorted(per_site.values(), reverse=not higher_is_better))
    k = max(1, math.ceil(0.1 * len(vals)))
    return {
        "mean": float(vals.mean()),
        "std": float(vals.std()),
        "bottom10": float(vals[:k].mean()),
        "per_site": {s: float(v) for s, v in sorted(per_site.items())},
    }


#: the sections of a round row, and the metric path each one reads from a site's evaluation
SECTIONS = {"personalized": ("personalized", "train"), "global": ("global", "train"),
            "unseen": ("global", "unseen"), "unseen_adapted": ("adapted", "unseen")}


def task_sections(ev: dict[str, dict[str, float]], roles: dict[str, str], tasks: dict[str, str]) -> dict[str, Any]:
    """Per task: its metric and the four sections, each described over that task's sites only."""
    out: dict[str, Any] = {}
    for task in sorted({tasks.get(s, "classification") for s in ev}):
        info, sites = TASKS[task], [s for s in ev if tasks.get(s, "classification") == task]
        entry: dict[str, Any] = {"metric": info.metric, "higher_is_better": info.higher_is_better}
        for section, (path, role) in SECTIONS.items():
            key = metric_key(path, task)
            entry[section] = describe({s: ev[s][key] for s in sites if roles.get(s) == role and key in ev[s]},
                                      info.higher_is_better)
        out[task] = entry
    return out


def safeguard_section(ev: dict[str, dict[str, float]], roles: dict[str, str], tasks: dict[str, str],
                      train: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    """The safeguard's round (client/safeguard.py): which model each training site serves, the served and own
    models on test, both on validation, and the seconds its own model's training took (None: nothing reported,
    as when it is off or under DP, where its numbers stay at the sites)."""
    serves, val, served, own, refit = {}, {}, {}, {}, {}
    for site, m in ev.items():
        task = tasks.get(site, "classification")
        if roles.get(site) != "train" or "safeguard-own" not in m:
            continue
        serves[site] = "own" if m["safeguard-own"] else "joined"
        val[site] = {"joined": m.get(metric_key("val_joined", task)), "own": m.get(metric_key("val_own", task))}
        if metric_key("served", task) in m:
            served[site] = m[metric_key("served", task)]
        if metric_key("own", task) in m:
            own[site] = m[metric_key("own", task)]
        if metric_key("refit", task) in m:  # safeguard.measure_refit: the chosen side refit, not served
            refit[site] = m[metric_key("refit", task)]
    # its extra compute per site: the own model's training round plus the choice's evaluation
    secs = {s: float(m["safeguard-time-s"]) for s, m in train.items() if "safeguard-time-s" in m}
    for s, m in ev.items():
        if "safeguard-eval-time-s" in m:
            secs[s] = secs.get(s, 0.0) + float(m["safeguard-eval-time-s"])
    if not serves and not secs:
        return None
    higher = all(TASKS[tasks.get(s, "classification")].higher_is_better for s in serves)
    return {"serves": dict(sorted(serves.items())), "validation": dict(sorted(val.items())),
            "served": describe(served, higher), "own": describe(own, higher),
            **({"refit": describe(refit, higher)} if refit else {}),
            "time_s": {"max": max(secs.values()), "mean": float(np.mean(list(secs.values()))),
                       "per_site": dict(sorted(secs.items()))} if secs else None}


def mixed(per_task: dict[str, Any], section: str) -> dict[str, Any] | None:
    """A section over sites of different tasks: per-site values in each site's own metric, no mean
    (an accuracy and a PSNR do not average); ``tasks`` has each task's statistics."""
    per_site = {s: v for t in per_task.values() if t[section] for s, v in t[section]["per_site"].items()}
    if not per_site:
        return None
    return {"mean": None, "std": None, "bottom10": None, "per_site": dict(sorted(per_site.items()))}


def move_aside(run_dir: Path) -> Path | None:
    """Move a run dir that holds a run to ``<name>.replaced-<time>`` (nothing is deleted); returns where."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():  # two replacements in one second
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.rename(run_dir, aside)
    print(f"kumiki: the previous run in {run_dir} was moved to {aside}", file=sys.stderr)
    return aside


def read_final(run_dir: str | Path) -> dict[str, Any]:
    """The closing ``{"kind": "final"}`` record of a finished run's metrics.jsonl."""
    last = json.loads((Path(run_dir) / "metrics.jsonl").read_text().splitlines()[-1])
    if last.get("kind") != "final":
        raise ValueError(f"{run_dir}: metrics.jsonl has no final record (the run did not finish)")
    return last


def write_json(path: Path, obj: Any) -> None:
    atomic_json(path, obj, indent=2)


#: what summary.json's ``privacy`` section says epsilon covers (docs/privacy.md)
COVERS_LOCAL = ("the training records of each site, in every tensor it sends (all it trains is DP-SGD, data-free "
                "terms added after the noise) and every metric it sends: no training-split value leaves a DP site "
                "except num-examples (the split's size), epsilon and the step count, and no metric of a model "
                "trained outside DP-SGD (FedAvg-FT's fine-tuned copy, FedHB's personalization, an unseen site's "
                "adaptation) leaves at all: those stay in the site's own log (withheld_metrics). Not covered: the "
                "test split (its metrics are reported as computed)")
#: what ``withheld_metrics`` lists
WITHHELD_NOTE = ("evaluation paths whose model a site trained on its training split outside DP-SGD: their metrics "
                 "stayed at the site (its state dir's evaluation-local.jsonl); the server has none of them")
COVERS_SHARED = ("the tensors that travel (privacy.scope = shared: personal tensors train in the clear and the "
                 "site's personalized test metrics depend on them); no training-split metric leaves the site")
COVERS_CENTRAL = ("the aggregate the server publishes each round (one joint clip per site over all the parts it "
                  "sends, one Gaussian release); not the individual updates, which the server itself sees in the clear")
NOISE_SECRET = "secret: the OS CSPRNG at each site and at the server (nobody else can regenerate it)"
NOISE_REPRODUCIBLE = ("REPRODUCIBLE (privacy.reproducible_noise = true): seeded from run.seed, site and round; the "
                      "server can regenerate and subtract it, so epsilon does NOT hold against the server")


class Recorder:
    def __init__(self, run_dir: Path, cfg, engine: str, quiet: bool = False, resume_from: int | None = None):
        """``resume_from = k``: continue the run dir's records after round k (rows of later rounds, written
        after the last checkpoint, and the closing record are dropped; the rest is kept and appended to)."""
        self.dir = Path(run_dir)
        earlier = [n for n in ("metrics.jsonl", "summary.json") if (self.dir / n).exists()]
        if earlier and resume_from is None:  # the engines claim a fresh run dir; a Flower-native rerun ends up here
            raise FileExistsError(f"{self.dir} already holds a run ({', '.join(earlier)}); choose another run.name, "
                                  "move that folder away (`kumiki run --overwrite` does it for you), or resume it "
                                  "(`kumiki run --resume`, or resume=true in the Flower run_config)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.engine = engine
        self.quiet = quiet
        resolved = json.loads(cfg.model_dump_json())
        resolved["engine"] = engine
        write_json(self.dir / "config.json", resolved)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.t0 = time.perf_counter()
        #: running totals of the rounds so far (their rows are in metrics.jsonl; none is kept in memory but
        #: the last, so a run's memory does not grow with its rounds)
        self.totals = _Totals()
        #: wall time of the earlier segments of a resumed run, and the rounds after which it was resumed
        self.wall_offset = 0.0
        self.resumed: list[int] = []
        #: evaluation paths whose metrics some DP site kept home (a model trained outside DP-SGD): privacy summary
        self.withheld: set[str] = set()
        if resume_from is not None:
            self._continue(resume_from)
        else:
            self.metrics_path.write_text("")
        #: why a privacy budget ended the run (set by the round driver), else None
        self.ended: str | None = None

    def _continue(self, k: int) -> None:
        kept = []
        for line in self.metrics_path.read_text().splitlines() if self.metrics_path.is_file() else []:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            kind = obj.get("kind") if isinstance(obj, dict) else None
            if (kind in ("round", "site") and int(obj.get("round", 0)) > k) or kind in ("final", None):
                continue
            kept.append(obj)
            if kind == "site":
                self.withheld.update(obj.get("withheld") or [])
            if kind == "round":
                self.totals.add(obj)
            elif kind == "resume":
                self.resumed.append(int(obj["after_round"]))
        if self.totals.last:
            self.wall_offset = float(self.totals.last["time"]["wall_s"])
        self.resumed.append(k)
        kept.append({"kind": "resume", "after_round": k, "engine": self.engine,
                     "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        atomic_text(self.metrics_path, "".join(json.dumps(o) + "\n" for o in kept))

    def _append(self, obj: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(obj) + "\n")

    def round(self, rnd: int, strategy: KumikiStrategy, round_s: float) -> dict[str, Any]:
        st: RoundStats = strategy.rounds.get(rnd, RoundStats())
        roles = {p.site: p.role for p in strategy.profiles.values()}
        tasks = {p.site: p.task for p in strategy.profiles.values()}
        ev = st.eval_metrics
        per_task = task_sections(ev, roles, tasks)
        one = next(iter(per_task.values())) if len(per_task) == 1 else None
        sections = {sec: (one[sec] if one else mixed(per_task, sec)) for sec in SECTIONS} if per_task else \
            dict.fromkeys(SECTIONS)
        losses = [m["train-loss"] for m in st.train_metrics.values() if "train-loss" in m]
        row = {
            "kind": "round", "round": rnd, **sections, "tasks": per_task,
            "bytes": {"up": st.bytes_up, "down": st.bytes_down},
            "time": {"round_s": round_s, "wall_s": self.wall_offset + time.perf_counter() - self.t0,
                     # the slowest site's reported compute per exchange, summed: round_s minus it is the framework's
                     "site_compute_s": st.compute_s,
                     # each site's seconds training and evaluating this round (summary.json's eval_share)
                     "sites": site_seconds(st.train_metrics, ev)},
            "sites": {"sampled": len(st.sent), "accepted": st.accepted, "aggregated": st.aggregated,
                      "took_part": sorted(st.train_metrics), "evaluated": sorted(ev), "rejected": st.rejected,
                      "declined": st.declined},
            "train_loss": float(np.mean(losses)) if losses else None,
        }
        eps = {s: m["epsilon"] for s, m in ev.items() if "epsilon" in m}
        if eps:  # privacy: what each site has spent so far (its ledger; never decreases)
            row["epsilon"] = dict(sorted(eps.items()))
        if self.cfg.privacy.central:
            row["central_epsilon"] = strategy.central_epsilon(st.central_releases)
        guard = safeguard_section(ev, roles, tasks, st.train_metrics)
        if guard is not None:  # which model each factory serves, and what its own model costs (docs/safeguard.md)
            row["safeguard"] = guard
        if st.method_record:  # method-specific facts of the round (WorldLM: its phase, attention, group epsilons)
            row["method"] = st.method_record
        self._append(row)
        for site, m in sorted(ev.items()):
            task = tasks.get(site, "classification")
            withheld = sorted(k[len(WITHHELD):] for k in m if k.startswith(WITHHELD))
            self.withheld.update(withheld)
            self._append({"kind": "site", "round": rnd, "site": site, "role": roles.get(site), "task": task,
                          "metric": TASKS[task].metric, "personalized": m.get(metric_key("personalized", task)),
                          "global": m.get(metric_key("global", task)), "adapted": m.get(metric_key("adapted", task)),
                          "epsilon": m.get("epsilon"),
                          "train_loss": st.train_metrics.get(site, {}).get("train-loss"),
                          "num_examples": st.train_metrics.get(site, {}).get("num-examples"),
                          # seconds the site computed for this round: training it, and evaluating its model
                          "fit_time_s": st.train_metrics.get(site, {}).get("fit-time-s"),
                          "eval_time_s": m.get("eval-time-s"),
                          # the safeguard (client/safeguard.py): the model it serves, the served and own models on
                          # test, and both on validation (absent when it is off or under DP)
                          **({"serves": "own" if m["safeguard-own"] else "joined",
                              "served": m.get(metric_key("served", task)), "own": m.get(metric_key("own", task)),
                              "val_joined": m.get(metric_key("val_joined", task)),
                              "val_own": m.get(metric_key("val_own", task)),
                              **({"refit": m[metric_key("refit", task)]} if metric_key("refit", task) in m else {})}
                             if "safeguard-own" in m else {}),
                          "safeguard_time_s": st.train_metrics.get(site, {}).get("safeguard-time-s"),
                          "safeguard_eval_time_s": m.get("safeguard-eval-time-s"),
                          # paths whose metrics the site kept home under DP (their model trained outside DP-SGD)
                          **({"withheld": withheld} if withheld else {}),
                          # test examples scored: the site's fixed sample, or its whole split (the last round)
                          "eval_examples": m.get(C_NUM_EXAMPLES)})
        self.totals.add(row)
        if not self.quiet:
            def fmt(d):
                return f"{d['mean']:.3f}" if d and d["mean"] is not None else "  -  "
            scores = (f" | personalized {fmt(row['personalized'])} | global {fmt(row['global'])}"
                      f" | unseen {fmt(row['unseen'])}"
                      + (f" (adapted {fmt(row['unseen_adapted'])})" if row["unseen_adapted"] else ""))
            if len(per_task) > 1:  # sites of different tasks: each task's personalized / global metric
                scores = "".join(f" | {t} {e['metric']} {fmt(e['personalized'])}/{fmt(e['global'])}"
                                 for t, e in per_task.items())
            console.print(
                f"[bold]round {rnd:>3}/{self.cfg.run.rounds}[/] sites {st.accepted}/{len(st.sent)}"
                f"{' [red](' + str(len(st.rejected)) + ' rejected)[/]' if st.rejected else ''}"
                + scores + f" | loss {row['train_loss'] or 0:.3f} | {round_s:.1f}s"
            )
        return row

    def privacy(self, strategy: KumikiStrategy) -> dict[str, Any] | None:
        """``privacy.epsilon_per_site`` (last reported), the budget, and when each site stopped."""
        p = self.cfg.privacy
        groups = strategy.privacy_record()
        if groups:  # privacy a method applies per sub-federation (WorldLM): per group, and each site's ledger
            eps = self.totals.epsilon
            return {"accountant": p.accountant, "groups": groups, "epsilon_per_site": dict(sorted(eps.items())),
                    "stopped_at_round": dict(sorted(strategy.budget_spent.items())),
                    "withheld_metrics": sorted(self.withheld), "withheld": WITHHELD_NOTE,
                    "noise": NOISE_REPRODUCIBLE if p.reproducible_noise else NOISE_SECRET}
        if not (p.enabled or p.central):
            return None
        out: dict[str, Any] = {"target_epsilon": p.target_epsilon, "delta": p.delta, "accountant": p.accountant,
                               "noise": NOISE_REPRODUCIBLE if p.reproducible_noise else NOISE_SECRET}
        if p.enabled:
            eps = self.totals.epsilon
            out.update({"epsilon_per_site": dict(sorted(eps.items())), "max_grad_norm": p.max_grad_norm,
                        "scope": p.scope, "stopped_at_round": dict(sorted(strategy.budget_spent.items())),
                        "epsilon_per_round": {s: dict(sorted(v.items())) for s, v in sorted(strategy.site_epsilon.items())},
                        "unit": "one training record of a site (its ledger spans every run and every change of its data)",
                        "covers": COVERS_LOCAL if p.scope == "all" else COVERS_SHARED,
                        "withheld_metrics": sorted(self.withheld), "withheld": WITHHELD_NOTE})
        if p.central:
            out["central"] = {"epsilon": strategy.central_epsilon(), "releases": strategy.central_releases,
                              "clip": p.central_clip, "noise_multiplier": p.central_noise_multiplier,
                              "unit": "one site (all its records)", "covers": COVERS_CENTRAL}
        return out

    def safeguard(self, last: dict[str, Any]) -> dict[str, Any] | None:
        """summary.json's ``safeguard``: the knobs, the last round's choice per factory and its worth on test, and
        the extra compute per round (None when it is off)."""
        g = self.cfg.safeguard
        if not g.enabled:
            return None
        tot = self.totals
        out: dict[str, Any] = {"enabled": True, "val_fraction": g.val_fraction}
        if not self.cfg.method.federated:
            out["applies"] = "no: local-only sites serve their own model already and train on all their data"
            return out
        row = last.get("safeguard") or {}
        if self.cfg.privacy.enabled:
            out["withheld"] = ("privacy.enabled: the choice and the own model's numbers are training-split values "
                               "outside epsilon, so they stay at each site (<state-dir>/safeguard.json)")
        out.update({"serves": row.get("serves") or {}, "validation": row.get("validation") or {},
                    "served": row.get("served"), "own": row.get("own"),
                    # safeguard.measure_refit (bench only): the chosen side refit on the whole split, not served
                    **({"measure_refit": True, "refit": row.get("refit")} if g.measure_refit else {}),
                    # the safeguard's compute per round (its own model's training and the choice's evaluation): the
                    # slowest site's seconds and the mean over sites, averaged over the rounds that reported it
                    "extra_time_per_round_s": {"max": tot.guard_max / tot.guard_rounds,
                                               "mean": tot.guard_mean / tot.guard_rounds} if tot.guard_rounds else None})
        return out

    def participation(self, strategy: KumikiStrategy) -> dict[str, Any]:
        """Who took part: configured vs discovered sites, nodes dropped at discovery, accepted rounds per site,
        and each site's profile (role, group, camera/domain, train and test examples)."""
        trained: dict[str, int] = {p.site: 0 for p in strategy.profiles.values() if p.role == "train"}
        for site, n in self.totals.trained.items():
            trained[site] = trained.get(site, 0) + n
        incomplete = list(self.totals.incomplete)
        return {"configured": strategy.expected_nodes(), "discovered": sorted(p.site for p in strategy.profiles.values()),
                "dropped": list(strategy.discovery_rejected), "trained_rounds": dict(sorted(trained.items())),
                "incomplete_rounds": incomplete,
                # what each site said of itself (query.profile): the report's factory table
                "profiles": {p.site: {"role": p.role, "group": p.group, "domain": p.domain or None,
                                      "inputs": p.inputs or None,
                                      "num_train": p.num_train, "num_test": p.num_test}
                             for p in sorted(strategy.profiles.values(), key=lambda p: p.site)}}

    def finish(self, strategy: KumikiStrategy, error: str | None = None) -> dict[str, Any]:
        """Write the final record and summary.json; ``status`` is ok only when every configured site took
        part in every round and the server did not fail (``error``)."""
        wall = self.wall_offset + time.perf_counter() - self.t0
        tot = self.totals
        last = tot.last
        n = max(tot.rounds, 1)

        def last5(key):
            vals = [m[key] for m in tot.last5 if m.get(key) is not None]
            return float(np.mean(vals)) if vals else None

        pers = last.get("personalized")
        glob = last.get("global")
        uns = last.get("unseen")
        ada = last.get("unseen_adapted")
        run_tasks = sorted({p.task for p in strategy.profiles.values()}) or ["classification"]
        summary = {
            "method": self.cfg.method.name,
            "dataset": self.cfg.data.dataset,
            "metric": TASKS[run_tasks[0]].metric if len(run_tasks) == 1 else "multi-task",
            "rounds": tot.rounds,
            "sites": self.cfg.data.sites,
            "personalized": pers or {"mean": None, "std": None, "bottom10": None, "per_site": {}},
            "global": {"mean": glob["mean"], "per_site": glob["per_site"]} if glob else {"mean": None, "per_site": {}},
            "unseen": uns or None,
            "unseen_adapted": ada or None,
            "bytes": {"up_per_round": int(tot.up / n), "down_per_round": int(tot.down / n),
                      "up_total": int(tot.up), "down_total": int(tot.down)},
            "time": {"wall_s": wall, "per_round_s": tot.round_s / n},
            "eval_share": {**tot.eval_share(), "every": eval_every(self.cfg)},  # the rounds evaluated: every k-th
            "privacy": self.privacy(strategy),
            "tasks": last.get("tasks") or {t: {"metric": TASKS[t].metric, "higher_is_better": TASKS[t].higher_is_better,
                                               **dict.fromkeys(SECTIONS)} for t in run_tasks},
        }
        part = self.participation(strategy)
        complete = (len(part["discovered"]) == strategy.expected_nodes() and not part["incomplete_rounds"]
                    and (tot.rounds == self.cfg.run.rounds or self.ended is not None))
        if self.ended is not None:
            summary["ended"] = self.ended
        if self.resumed:
            summary["resumed_after"] = list(self.resumed)
        summary["status"] = "failed" if error else ("ok" if complete else "incomplete")
        summary["participation"] = part
        summary["safeguard"] = self.safeguard(last)
        if error:
            summary["error"] = error
        self._append({"kind": "final", "last_round": {"personalized": pers and pers["mean"],
                                                        "global": glob and glob["mean"], "unseen": uns and uns["mean"],
                                                        "unseen_adapted": ada and ada["mean"]},
                      "last5_mean": {"personalized": last5("personalized"), "global": last5("global"),
                                     "unseen": last5("unseen"), "unseen_adapted": last5("unseen_adapted")},
                      "rejections": tot.rejections,
                      "status": summary["status"]})
        write_json(self.dir / "summary.json", summary)
        return summary


class _Totals:
    """What the summary needs from every round so far, folded in as each round ends (constant memory in the
    number of rounds, apart from the list of incomplete rounds)."""

    def __init__(self):
        self.rounds = 0
        self.up = self.down = 0
        self.round_s = 0.0
        self.rejections = 0
        self.epsilon: dict[str, float] = {}  # last reported per site
        self.trained: Counter = Counter()  # site -> rounds it took part in
        self.incomplete: list[int] = []
        self.last5: deque = deque(maxlen=5)  # section -> mean, for the last five rounds
        self.last: dict[str, Any] = {}  # the last round's full row
        self.guard_rounds, self.guard_max, self.guard_mean = 0, 0.0, 0.0  # the safeguard's seconds (its rounds)
        #: site -> [seconds training, seconds evaluating], over all rounds and over the rounds before the last
        self.site_s: dict[str, list[float]] = {}
        self.site_s_before: dict[str, list[float]] = {}

    def add(self, row: dict[str, Any]) -> None:
        sites = row["sites"]
        self.rounds += 1
        self.up += row["bytes"]["up"]
        self.down += row["bytes"]["down"]
        self.round_s += row["time"]["round_s"]
        self.rejections += len(sites["rejected"])
        self.epsilon.update(row.get("epsilon", {}))
        self.trained.update(sites["took_part"])
        everyone_declined = sites["sampled"] and len(sites.get("declined", [])) == sites["sampled"]
        if sites["rejected"] or not (sites["aggregated"] or everyone_declined):
            self.incomplete.append(row["round"])
        self.last5.append({sec: row[sec]["mean"] for sec in SECTIONS if row.get(sec)})
        secs = (row.get("safeguard") or {}).get("time_s")
        if secs:
            self.guard_rounds += 1
            self.guard_max += secs["max"]
            self.guard_mean += secs["mean"]
        if self.last:  # the previous row is now a round before the last
            _fold(self.site_s_before, self.last["time"].get("sites") or {})
        _fold(self.site_s, row["time"].get("sites") or {})
        self.last = row

    def eval_share(self) -> dict[str, Any]:
        """Evaluation's share of the sites' rounds: per site, a site's evaluating seconds over its training plus
        evaluating seconds (what its round costs it; in-process engines run sites in turn, so this is also the
        share of the round's wall time); overall, the same summed over sites; ``before_last``: the rounds that
        score the fixed sample (the last round scores the whole test split)."""
        def share(d: dict[str, list[float]]) -> dict[str, Any]:
            fit, ev = sum(v[0] for v in d.values()), sum(v[1] for v in d.values())
            return {"overall": ev / (fit + ev) if fit + ev > 0 else None, "eval_s": ev, "fit_s": fit,
                    "per_site": {s: (v[1] / (v[0] + v[1]) if v[0] + v[1] > 0 else None) for s, v in sorted(d.items())}}
        return {**share(self.site_s), "before_last": share(self.site_s_before)}


def _fold(into: dict[str, list[float]], sites: dict[str, dict]) -> None:
    for site, t in sites.items():
        acc = into.setdefault(site, [0.0, 0.0])
        acc[0] += t.get("fit_s") or 0.0
        acc[1] += t.get("eval_s") or 0.0


def site_seconds(train_metrics: dict[str, dict], evaluation: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """Each site's reported seconds for a round: training (its train reply) and evaluating (its evaluation).
    The server range-checked both (``strategies.replies``); a figure outside [0, a week] is dropped."""
    out = {}
    for site in sorted(set(train_metrics) | set(evaluation)):
        fit = _seconds(train_metrics.get(site, {}).get("fit-time-s"))
        ev = _seconds(evaluation.get(site, {}).get("eval-time-s"))
        out[site] = {"fit_s": fit, "eval_s": ev}
    return out


def _seconds(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and 0.0 <= f <= 7 * 24 * 3600.0 else None
