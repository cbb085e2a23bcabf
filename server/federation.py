"""The round driver: discover sites, then train -> aggregate -> evaluate -> record, R times.

It drives a ``KumikiStrategy`` through Flower's Strategy API on any ``Grid``
(simulation, deployment, or the in-process grid tests use), and adds what
``Strategy.start`` lacks: site discovery, run outputs, checkpoints, resume, the report.

One message per site per round (``eval.in_train_reply``, the default): round k's evaluation travels in round
k + 1's training messages (each site evaluates the model it receives, which is round k's aggregate, before it
trains), and the sites that do not train then (unseen sites, sites not sampled, sites out of privacy budget) get
an evaluate message in the same exchange. So round k's row in metrics.jsonl is written during round k + 1, with
the same numbers a separate evaluate message after round k would have given. The last round, and a round after
which the run stops, are evaluated by evaluate messages before their checkpoint; ``eval.every = n`` evaluates
every n-th round only.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from kumiki.config import KumikiConfig
from kumiki.contract import Job
from kumiki.data.sources import SHAPES
from kumiki.registry import entry
from kumiki.split import ParamSplit
from models import ModelSpec, build_model
from server.eval_plan import eval_every
from server.lifecycle import Stopped
from server.recorder import Recorder
from kumiki.atomic import atomic_npz
from server.resume import read_resume_state, resume_point, write_resume_state

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


def starting_point(cfg: KumikiConfig, sim: dict | None = None) -> tuple[Job, ParamSplit, dict[str, np.ndarray]]:
    """What every strategy starts from: the job each message carries, the split of the seeded model and its
    initial tensors. One place for the root (``build_strategy``) and a region's server (``server/region.py``),
    so a field added to the job reaches both."""
    spec = model_spec(cfg)
    model = build_model(spec, cfg.method)
    split = ParamSplit.build(model, cfg.method.split_rules())
    initial = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    job = Job(0, cfg.method, cfg.train, spec, cfg.privacy, sim, cfg.eval, cfg.site, cfg.run.name, cfg.run.rounds,
              safeguard=cfg.safeguard, own_train=cfg.alone_train)
    return job, split, initial


def build_strategy(cfg: KumikiConfig, sim: dict | None = None):
    job, split, initial = starting_point(cfg, sim)
    return entry(cfg.method.name).strategy_for(cfg)(cfg, job, split, initial)


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


def evaluates(cfg: KumikiConfig, rnd: int, last: bool) -> bool:
    """Whether round ``rnd`` is evaluated: every ``eval.every``-th round (``eval_every``), and the run's last one."""
    return last or rnd % eval_every(cfg) == 0


def in_train_reply(cfg: KumikiConfig) -> bool:
    """Whether round k's evaluation rides in round k + 1's training messages: ``eval.in_train_reply``, for methods
    whose evaluate message carries what a training message does (WorldLM's does not: it evaluates the model its
    phase deploys, with the node summary; it keeps a separate evaluate message)."""
    return cfg.eval.in_train_reply and entry(cfg.method.name).config.eval_in_train_reply


def _exchange(grid: Grid, strategy, rnd: int, messages: list[Message], timeout: float) -> list[Message]:
    """One send-and-receive; the slowest site's reported compute goes to round ``rnd``'s critical path."""
    if not messages:
        return []
    replies = _for_sites(strategy, rnd, messages, list(grid.send_and_receive(messages, timeout=timeout)))
    strategy.note_compute(rnd, replies)
    return replies


def _for_sites(strategy, rnd: int, messages: list[Message], replies: list[Message]) -> list[Message]:
    """The sites' own replies. For a message whose node went away, Flower's SuperLink answers itself, an error
    reply whose source is the SuperLink's node id (1), not the site: counted as a site it showed up as a phantom
    ``node-1`` rejection next to the site's own "no reply". It is logged under the site's name and dropped; the
    site's missing reply is recorded as such."""
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    out = []
    for r in replies:
        md = r.metadata
        node = sent.get(md.reply_to_message_id)
        if md.src_node_id == SUPERLINK_NODE_ID and node is not None and node != md.src_node_id:
            profile = getattr(strategy, "profiles", {}).get(node)
            log.warning("round %d: the SuperLink answered for %s: %s", rnd, profile.site if profile else f"node {node}",
                        r.error.reason if r.has_error() else "(no error)")
            continue
        out.append(r)
    return out


def _evaluate(grid: Grid, strategy, rnd: int, eval_round: int, timeout: float, only=None) -> None:
    """Evaluate messages for ``eval_round`` (the model the strategy holds now), sent during round ``rnd``."""
    messages = list(strategy.configure_evaluate(eval_round, None, ConfigRecord(), grid, only=only))
    strategy.aggregate_evaluate(eval_round, _exchange(grid, strategy, rnd, messages, timeout))


def _pending_after_resume(cfg: KumikiConfig, start: int | None, recorder: Recorder) -> int | None:
    """A resumed run whose last checkpointed round has no row yet (its evaluation was to travel in the next
    round's messages): evaluate it in the first resumed round."""
    recorded = recorder.totals.last.get("round")  # rows are written in round order: the last is the newest
    return start if start and in_train_reply(cfg) and recorded != start else None


def check_reproducible_noise(cfg: KumikiConfig, engine: str) -> None:
    """``privacy.reproducible_noise`` makes the DP noise a function of values the server knows: fine for a
    simulation that must repeat bit for bit, never silently for real factories (a deployment engine)."""
    p = cfg.privacy
    if p.reproducible_noise and (p.enabled or p.central or _group_dp(cfg)):
        if engine not in ("inprocess", "simulation") and not p.force_reproducible_noise:
            raise ValueError("privacy.reproducible_noise = true seeds the DP noise from run.seed, site names and "
                             "rounds, which the server knows: it is not private. A deployment refuses it; remove it, "
                             "or set privacy.force_reproducible_noise = true for a research deployment")
        log.warning("privacy.reproducible_noise = true: DP noise is seeded from public values; NOT private")


def _group_dp(cfg: KumikiConfig) -> bool:
    groups = getattr(cfg.federation, "groups", None) or {}
    return any(getattr(g, "dp", "none") != "none" for g in (groups.values() if isinstance(groups, dict) else groups))


def run_federation(grid: Grid, cfg: KumikiConfig, sim: dict | None = None, engine: str = "deployment",
                   quiet: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg``'s rounds on ``grid``; ``resume`` continues the run in its run dir after its last checkpoint
    (or starts it, if the run dir holds none)."""
    check_reproducible_noise(cfg, engine)
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
    pending = _pending_after_resume(cfg, start, recorder)  # a round whose evaluation rides in this round's messages
    try:
        strategy.discover(grid, cfg.total_sites, cfg.server.discovery_timeout_s)
        for rnd in range((start or 0) + 1, cfg.run.rounds + 1):
            if not strategy.central_budget_left():
                log.warning("central DP: another release would exceed privacy.target_epsilon %g; the run ends after "
                            "round %d", cfg.privacy.target_epsilon, rnd - 1)
                recorder.ended = f"central privacy budget spent (after round {rnd - 1})"
                break
            t0 = time.perf_counter()
            messages = list(strategy.configure_train(rnd, None, ConfigRecord(), grid, evaluate=pending))
            if pending is not None:  # the sites that do not train this round evaluate in the same exchange
                messages += strategy.configure_evaluate(pending, None, ConfigRecord(), grid,
                                                        skip={m.metadata.dst_node_id for m in messages})
            replies = _exchange(grid, strategy, rnd, messages, timeout)
            trained = [r for r in replies if r.metadata.message_type == MessageType.TRAIN]
            if pending is not None:
                evaluated = [r for r in replies if r.metadata.message_type != MessageType.TRAIN]
                again = strategy.take_evaluations(pending, trained)
                if again:  # an error or a declined round carries no evaluation: ask before the model changes
                    evaluated += _exchange(grid, strategy, rnd, list(strategy.configure_evaluate(
                        pending, None, ConfigRecord(), grid, only=again)), timeout)
                strategy.aggregate_evaluate(pending, evaluated)
            strategy.aggregate_train(rnd, trained)
            # its row may be written later (its evaluation rides in the next round's messages): keep what it reports
            strategy.rounds[rnd].central_releases = strategy.central_releases
            strategy.rounds[rnd].method_record = strategy.record(rnd)
            if pending is not None:
                recorder.round(pending, strategy, strategy.rounds[pending].round_s)
                pending = None
            budget_spent = not strategy.train_nodes() and bool(strategy.budget_spent)
            last = rnd == cfg.run.rounds or budget_spent or not strategy.central_budget_left()
            if evaluates(cfg, rnd, last):
                if last:  # the report's numbers: the whole test split (earlier rounds score a fixed sample)
                    strategy.full_eval_rounds.add(rnd)
                if in_train_reply(cfg) and not last:
                    pending = rnd
                else:
                    _evaluate(grid, strategy, rnd, rnd, timeout)
            strategy.rounds[rnd].round_s = time.perf_counter() - t0
            # metrics first: a checkpoint of round k has round k's row, or keeps what that row needs until
            # its evaluation arrives with the next round (a resume drops rows after the checkpoint)
            if pending != rnd:
                recorder.round(rnd, strategy, strategy.rounds[rnd].round_s)
            checkpoint(strategy, run_dir, rnd)
            if budget_spent:
                log.warning("every training site has spent its privacy budget; the run ends after round %d", rnd)
                recorder.ended = f"every training site spent its privacy budget (after round {rnd})"
                break
        if pending is not None:  # resumed with an evaluation due, and no round left to carry it
            strategy.full_eval_rounds.add(pending)
            _evaluate(grid, strategy, pending, pending, timeout)
            recorder.round(pending, strategy, strategy.rounds[pending].round_s)
    except BaseException as exc:  # the run is over: record how it ended (status "failed"), then re-raise
        recorder.finish(strategy, error=str(exc) if isinstance(exc, Stopped) else f"{type(exc).__name__}: {exc}")
        write_report(run_dir)
        raise
    summary = recorder.finish(strategy)
    write_report(run_dir)
    return summary
