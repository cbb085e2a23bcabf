"""The round driver: discover sites, then train -> aggregate -> evaluate -> record, R times.

It drives a ``KumikiStrategy`` through Flower's Strategy API on any ``Grid``
(simulation, deployment, or the in-process grid tests use), and adds what
``Strategy.start`` lacks: site discovery, run outputs, checkpoints, resume, the report.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from kumiki.config import KumikiConfig
from kumiki.contract import Job
from kumiki.data.sources import SHAPES
from kumiki.registry import entry
from kumiki.split import ParamSplit
from models import ModelSpec, build_model
from server.recorder import Recorder
from server.resume import atomic_npz, read_resume_state, resume_point, write_resume_state

log = logging.getLogger("kumiki.server")


def model_spec(cfg: KumikiConfig) -> ModelSpec:
    if cfg.model.arch == "lm":  # language: bytes in, 256 next-byte logits out
        return ModelSpec("lm", (cfg.model.context,), 256, cfg.model.hidden, "none", cfg.run.seed,
                         dp_fix=False, blocks=cfg.model.blocks, heads=cfg.model.heads)
    if cfg.data.dataset == "site-folders":
        shape, classes = tuple(cfg.data.input_shape), cfg.data.num_classes
    else:
        shape, classes = SHAPES[cfg.data.dataset]
    return ModelSpec(cfg.model.arch, tuple(shape), classes, cfg.model.hidden, cfg.model.norm, cfg.run.seed,
                     dp_fix=cfg.privacy.enabled and cfg.privacy.fix_model)


def build_strategy(cfg: KumikiConfig, sim: dict | None = None):
    spec = model_spec(cfg)
    model = build_model(spec, cfg.method)
    split = ParamSplit.build(model, cfg.method.split_rules())
    initial = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    job = Job(0, cfg.method, cfg.train, spec, cfg.privacy, sim, cfg.eval, cfg.site, cfg.run.name, cfg.run.rounds)
    return entry(cfg.method.name).load_strategy().for_config(cfg)(cfg, job, split, initial)


def checkpoint(strategy, run_dir: Path, rnd: int) -> None:
    ck = run_dir / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    arrays = dict(strategy.shared)
    for g, arrs in strategy.group_arrays.items():
        arrays.update(arrs)
    arrays.update(strategy.server_state())
    write_resume_state(strategy, ck, rnd)  # what `--resume` continues from (server/resume.py)
    atomic_npz(ck / "global.npz", __round__=np.array(rnd), **arrays)


def write_report(run_dir: Path) -> None:
    """report.html at the end of every run, however it was started (CLI, ``flwr run``, compose)."""
    try:
        from server.report import render_report

        log.info("report: %s", render_report(run_dir))
    except Exception as exc:  # noqa: BLE001 - a report failure must not hide how the run ended
        log.warning("report.html not written: %s: %s", type(exc).__name__, exc)


def run_federation(grid: Grid, cfg: KumikiConfig, sim: dict | None = None, engine: str = "deployment",
                   quiet: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg``'s rounds on ``grid``; ``resume`` continues the run in its run dir after its last checkpoint
    (or starts it, if the run dir holds none)."""
    run_dir = cfg.run_dir()
    strategy = build_strategy(cfg, sim)
    start = resume_point(cfg) if resume else None  # None: a fresh run
    if start:
        rnd, arrays, meta = read_resume_state(run_dir)
        strategy.load_state_dict(arrays, meta)
        log.warning("resuming %s after round %d of %d", run_dir, rnd, cfg.run.rounds)
    else:  # a new run: sites archive any earlier run's state in their state dirs (client.state)
        strategy.job = replace(strategy.job, run_id=uuid.uuid4().hex[:12])
    strategy.summary()
    recorder = Recorder(run_dir, cfg, engine, quiet=quiet, resume_from=start)
    timeout = cfg.server.round_timeout_s
    try:
        strategy.discover(grid, cfg.total_sites, cfg.server.discovery_timeout_s)
        for rnd in range((start or 0) + 1, cfg.run.rounds + 1):
            if not strategy.central_budget_left():
                log.warning("central DP: another release would exceed privacy.target_epsilon %g; the run ends after "
                            "round %d", cfg.privacy.target_epsilon, rnd - 1)
                recorder.ended = f"central privacy budget spent (after round {rnd - 1})"
                break
            t0 = time.perf_counter()
            replies = grid.send_and_receive(strategy.configure_train(rnd, None, ConfigRecord(), grid), timeout=timeout)
            strategy.aggregate_train(rnd, replies)
            replies = grid.send_and_receive(strategy.configure_evaluate(rnd, None, ConfigRecord(), grid),
                                            timeout=timeout)
            strategy.aggregate_evaluate(rnd, replies)
            # metrics first: a checkpoint of round k always has round k's row (a resume drops rows after it)
            recorder.round(rnd, strategy, time.perf_counter() - t0)
            checkpoint(strategy, run_dir, rnd)
            if not strategy.train_nodes() and strategy.budget_spent:
                log.warning("every training site has spent its privacy budget; the run ends after round %d", rnd)
                recorder.ended = f"every training site spent its privacy budget (after round {rnd})"
                break
    except BaseException as exc:  # the run is over: record how it ended (status "failed"), then re-raise
        recorder.finish(strategy, error=f"{type(exc).__name__}: {exc}")
        write_report(run_dir)
        raise
    summary = recorder.finish(strategy)
    write_report(run_dir)
    return summary
