"""A sub-federation's side of deployment shape (b): its ServerApp, serving the root's jobs on its SuperLink.

The regional aggregator (``client/bridge.py``) turns each message of the root into a job folder under
``<region-dir>/jobs/`` and makes sure this sub-federation's ServerApp runs: one long-lived Flower run on the
region's own SuperLink (``flwr run`` with ``region-dir`` in the run config), whose main is ``serve_region``.
It holds ``<region-dir>/server.lock`` while it lives (a second one exits at once), loads the sub-federation's
server state, discovers its sites, then serves every pending job in order: the one round the root asked for
(train or evaluate, ``strategies.worldlm_bridge.RegionServer``), its state saved atomically, then the
answer. It ends after ``idle`` seconds without a job::

    <job>/job.json     {"kind": "train" | "evaluate" | "profile", "round": r, "group": g,
                        "region_dir": "...", "config": {<the root's job config entries>}}
    <job>/job.npz      the root's arrays (arrays/<name>) and extra arrays (extra/<name>)
    <job>/result.json  {"metrics": {...}, "error": null | {"code": c, "reason": "..."}}
    <job>/result.npz   the answer's arrays (train)

Its sites see an ordinary Kumiki server: the same messages, checks and state contract as in shape (a).
Per-site records of every job are appended to ``<region-dir>/metrics.jsonl``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from kumiki import contract as C
from kumiki.atomic import atomic_json, atomic_npz
from kumiki.config import KumikiConfig
from kumiki.locks import held
from kumiki.tasks import metric_key

log = logging.getLogger("kumiki.server")
LOCK = "server.lock"
#: the state after each trained round, ``state-r<round>.npz``; the last ``KEEP`` are kept, so a root resumed from
#: an earlier checkpoint can ask for a round again and the region trains it from the state it had before
KEEP = 3


def build_region(cfg: KumikiConfig, group: str):
    """This sub-federation's strategy, fresh (``strategies.worldlm_bridge.RegionServer``)."""
    from server.federation import starting_point
    from strategies.worldlm_bridge import RegionServer

    job, split, initial = starting_point(cfg)
    return RegionServer(cfg, job, split, initial, group)


def saved_rounds(region_dir: Path) -> list[int]:
    return sorted(int(p.stem[len("state-r"):]) for p in region_dir.glob("state-r*.npz"))


def _load_state(strategy, region_dir: Path, rnd: int) -> None:
    with np.load(region_dir / f"state-r{rnd:06d}.npz") as z:
        meta = json.loads(str(z["__meta__"].item()))
        arrays = {k: z[k].copy() for k in z.files if k != "__meta__"}
    strategy.load_state_dict(arrays, meta)


def _save_state(strategy, region_dir: Path, rnd: int) -> None:
    arrays, meta = strategy.state_dict()
    atomic_npz(region_dir / f"state-r{rnd:06d}.npz", __meta__=np.array(json.dumps(meta)), **arrays)
    for old in saved_rounds(region_dir)[:-KEEP]:
        (region_dir / f"state-r{old:06d}.npz").unlink(missing_ok=True)


def _write_result(job_dir: Path, metrics: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
                  error: dict | None = None) -> None:
    if arrays is not None:
        atomic_npz(job_dir / "result.npz", **arrays)
    atomic_json(job_dir / "result.json", {"metrics": metrics, "error": error})


def read_job(job_dir: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    job = json.loads((job_dir / "job.json").read_text())
    arrays, extra = {}, {}
    if (job_dir / "job.npz").is_file():
        with np.load(job_dir / "job.npz") as z:
            for k in z.files:
                (arrays if k.startswith("arrays/") else extra)[k.split("/", 1)[1]] = z[k].copy()
    return job, arrays, extra


def pending(region_dir: Path) -> list[Path]:
    """Job folders still waiting for an answer, oldest first."""
    jobs = region_dir / "jobs"
    if not jobs.is_dir():
        return []
    return sorted((d for d in jobs.iterdir() if (d / "job.json").is_file() and not (d / "result.json").is_file()),
                  key=lambda d: (d / "job.json").stat().st_mtime)


class RegionService:
    """One sub-federation's server: its strategy (state from disk), its grid, the jobs of the root."""

    def __init__(self, grid: Grid, cfg: KumikiConfig, region_dir: str | Path):
        self.grid, self.cfg, self.dir = grid, cfg, Path(region_dir)
        self.strategy = None
        #: the round whose state the strategy holds (0: fresh)
        self.at = 0

    def _at(self, group: str, rnd: int, before: bool):
        """The strategy holding the state of the newest round before ``rnd`` (training it) or up to ``rnd``
        (evaluating it), loaded from disk when another state is in memory; sites are discovered once."""
        rounds = [r for r in saved_rounds(self.dir) if (r < rnd if before else r <= rnd)]
        want = rounds[-1] if rounds else 0
        if self.strategy is not None and self.at == want:
            return self.strategy
        if self.strategy is not None and want < self.at:
            log.warning("sub-federation %s: round %d again (the root resumed from an earlier checkpoint); from the "
                        "state of round %d", group, rnd, want)
        s = build_region(self.cfg, group)
        if want:
            _load_state(s, self.dir, want)
        if self.strategy is None:
            s.discover(self.grid, s.expected_nodes(), self.cfg.server.discovery_timeout_s)
        else:
            s.profiles, s._refused = dict(self.strategy.profiles), set(self.strategy._refused)
        self.strategy, self.at = s, want
        return s

    def serve_pending(self) -> int:
        """Answer every pending job; the number answered."""
        done = 0
        for job_dir in pending(self.dir):
            self.serve(job_dir)
            done += 1
        return done

    def serve(self, job_dir: Path) -> None:
        from strategies.worldlm_bridge import check_same_run, profile_of

        try:
            job, arrays, extra = read_job(job_dir)
            group, kind, rnd = job["group"], job["kind"], int(job["round"])
        except (OSError, ValueError, KeyError, TypeError) as exc:  # answer the job with the error; serve the next
            log.error("%s: unreadable job: %s", job_dir, exc)
            _write_result(job_dir, {}, error={"code": 4100, "reason": f"unreadable job: {type(exc).__name__}: {exc}"})
            return
        try:
            s = self._at(group, rnd, before=kind == "train")
            if group != s.group:
                raise ValueError(f"a job for sub-federation {group!r} reached {s.group!r}'s server")
            check_same_run(job.get("config", {}), s.job)
            if kind == "profile":
                _write_result(job_dir, profile_of(s.profiles))
                return
            s.refresh(self.grid, rnd)
            s.receive(arrays, extra)
            if kind == "train":
                self._train(s, job_dir, rnd)
            else:
                msgs = list(s.configure_evaluate(rnd, None, ConfigRecord(), self.grid))
                s.aggregate_evaluate(rnd, self.grid.send_and_receive(msgs, timeout=self.cfg.server.round_timeout_s))
                ev = s.rounds[rnd].eval_metrics
                _write_result(job_dir, region_metrics(s, ev))
                _record(self.dir, rnd, kind, ev)
        except Exception as exc:  # noqa: BLE001 - the aggregator answers the root with an error, never a hang
            log.exception("sub-federation %s: job %s of round %d failed", group, kind, rnd)
            _write_result(job_dir, {}, error={"code": 4100, "reason": f"{type(exc).__name__}: {exc}"})

    def _train(self, s, job_dir: Path, rnd: int) -> None:
        msgs = list(s.configure_train(rnd, None, ConfigRecord(), self.grid))
        if not msgs:
            spent = bool(s.group_budget_spent)
            _save_state(s, self.dir, rnd)
            self.at = rnd
            _write_result(job_dir, {}, error={"code": C.ERR_BUDGET if spent else 4100, "reason":
                                              f"sub-federation {s.group}: its privacy budget is spent" if spent
                                              else f"sub-federation {s.group} has no site to train in round {rnd}"})
            return
        _, metrics = s.aggregate_train(rnd, self.grid.send_and_receive(msgs, timeout=self.cfg.server.round_timeout_s))
        stats = s.rounds[rnd]
        if not stats.aggregated:
            _write_result(job_dir, {}, error={"code": 4200, "reason": f"sub-federation {s.group}: too few valid "
                                                                       f"replies ({stats.rejected})"})
            return
        out = {C.NUM_EXAMPLES: int(metrics[C.NUM_EXAMPLES]), "train-tokens": float(s.result["tokens"]),
               "train-loss": float(metrics.get("train-loss", 0.0)), "train-sites": float(stats.accepted)}
        eps = s.group_epsilon_now()
        if eps is not None:
            out["train-group-epsilon"] = eps
        _save_state(s, self.dir, rnd)
        self.at = rnd
        _write_result(job_dir, out, s.result["arrays"])
        _record(self.dir, rnd, "train", stats.train_metrics)


def serve_region(grid: Grid, cfg: KumikiConfig, region_dir: str | Path, idle_s: float | None = None) -> None:
    """The region's ServerApp main: serve the root's jobs until ``idle_s`` pass without one (default: twice
    ``server.round_timeout_s``). Exits at once when another server of this region holds its lock."""
    region_dir = Path(region_dir)
    region_dir.mkdir(parents=True, exist_ok=True)
    idle_s = 2 * cfg.server.round_timeout_s if idle_s is None else idle_s
    with open(region_dir / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another server of this sub-federation is running; this one exits", region_dir)
            return
        service, last = RegionService(grid, cfg, region_dir), time.monotonic()
        log.info("sub-federation server up in %s", region_dir)
        while time.monotonic() - last < idle_s:
            if service.serve_pending():
                last = time.monotonic()
            else:
                time.sleep(0.05)
        log.info("%s: no job for %.0f s; the sub-federation's server stops", region_dir, idle_s)


def server_alive(region_dir: str | Path) -> bool:
    """Whether a server of this region holds its lock (the lock dies with its process)."""
    return held(Path(region_dir) / LOCK)


def region_metrics(strategy, ev: dict[str, dict[str, float]]) -> dict[str, float]:
    """What the root records of a sub-federation's evaluation: the means over its training sites (and its
    unseen sites' zero-shot and adapted values under ``unseen-`` / ``adapted-``)."""
    roles = {p.site: p.role for p in strategy.profiles.values()}
    out: dict[str, float] = {C.NUM_EXAMPLES: int(sum(m.get(C.NUM_EXAMPLES, 0) for m in ev.values())) or 1}
    for path, role, name in (("personalized", "train", "personalized"), ("global", "train", "global"),
                             ("global", "unseen", "unseen"), ("adapted", "unseen", "adapted")):
        key = metric_key(path, "language")
        vals = [m[key] for s, m in ev.items() if roles.get(s) == role and key in m]
        if vals:
            out[f"{name}-perplexity"] = float(np.mean(vals))
    return out


def _record(region_dir: Path, rnd: int, kind: str, per_site: dict[str, dict[str, float]]) -> None:
    with open(region_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": rnd, "kind": kind, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "sites": per_site}) + "\n")
