"""The Kumiki ClientApp: one per site (SuperNode).

Every handler rebuilds the same pieces from the message and the site's disk:
job knobs (ConfigRecord) -> model + ParamSplit -> personal state (site store)
-> received shared tensors. Training replies carry ``split.outgoing(...)``
only, so no personal tensor can leave; a failure becomes an error reply that
the server logs and drops, never a half-written state.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import eval_sample, privacy
from client import safeguard
from client.bridge import bridge_mod
from client import site as sites
from client.loop import Trainer, evaluate, resolve_device
from client.methods.base import SiteJob
from client.state import SiteState, SiteStore, StateMismatch, StateMissing
from client.threads import apply_site_threads
from kumiki import contract as C, packing
from kumiki.tasks import metric_key
from kumiki.registry import entry
from kumiki.split import ParamSplit
from models import build_model, fill

log = logging.getLogger("kumiki.client")
app = ClientApp(mods=[bridge_mod])  # a regional aggregator's node answers through its region (WorldLM)

ERR_SITE = 4100  # the site cannot run the job (data, state or config problem)
ERR_TRAIN = 4200  # local training failed (non-finite loss, ...)
ERR_BUDGET = C.ERR_BUDGET  # the site's privacy budget is spent: it declines to train (and keeps evaluating)


class BadArrays(ValueError):
    """The server sent tensors this site must not accept."""


def _fingerprint(split: ParamSplit, job: C.Job, model: torch.nn.Module, site: str = "") -> str:
    """What a state file must have been written for: this split, model and site (the run is checked apart:
    another run's state is archived, not refused; see ``load_state``)."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return split.fingerprint({"method": job.method.name, "variant": job.method.variant, "shapes": shapes,
                              "site": site})


def load_state(store: SiteStore, fingerprint: str, split: ParamSplit, info: sites.SiteInfo, job: C.Job,
               completed: int, node_config: dict, before_round: int | None = None) -> SiteState:
    """The site's durable state, checked: present when the server says the site completed rounds (unless
    ``on_missing_state = reset``), and holding exactly the split's personal tensors. A training message passes
    ``before_round`` (its round): a round trained again after a server resume starts from the state before it."""
    store.claim(info.name)
    other = store.run_of()
    if other is not None and other != (job.run, job.run_id):
        if completed > 0:
            raise StateMismatch(
                f"site {info.name}: {store.path} belongs to run {other[0]!r} (id {other[1]}), but the server says this "
                f"site completed round {completed} of run {job.run!r} (id {job.run_id}); restore this run's state file")
        record = store.privacy_record()  # the site's DP record outlives the run: its ledger must too
        dest = store.archive(other)
        log.warning("site %s: the state of run %r (id %s) moved to %s; run %r (id %s) starts from fresh personal "
                    "state", info.name, other[0], other[1], dest, job.run, job.run_id)
    policy = str(node_config.get("on-missing-state", job.site.on_missing_state))
    if not store.exists() and completed > 0:
        if policy != "reset":
            raise StateMissing(
                f"site {info.name}: state file {store.path} is missing although this site completed round "
                f"{completed}; restore it, or set site.on_missing_state = 'reset' (or the node config "
                "on-missing-state='reset') to restart it from fresh personal state")
        log.warning("site %s: state file %s missing after round %d; restarting from fresh personal state "
                    "(on_missing_state = reset)", info.name, store.path, completed)
    state = store.load(fingerprint, before_round)
    if other is not None and other != (job.run, job.run_id) and record:
        state.extra[privacy.RECORD] = record
    state.run, state.run_id = job.run, job.run_id
    if state.personal and set(state.personal) != set(split.personal):
        missing, extra = sorted(set(split.personal) - set(state.personal)), sorted(set(state.personal) - set(split.personal))
        raise StateMismatch(f"site {info.name}: {store.path} lacks personal tensors {missing[:5]} or has unknown "
                            f"ones {extra[:5]}; move it away to restart the site")
    return state


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor holding a NaN or an inf, or None.

    One sum per tensor instead of an element-wise test (about 20x cheaper): a NaN or an inf anywhere makes the
    sum NaN or inf, so a finite sum proves the tensor finite. Only where a sum is not finite (a non-finite
    value, or finite values whose sum overflows) does the exact per-element test decide."""
    floats = [(k, v.detach()) for k, v in tensors.items() if v.is_floating_point()]
    if not floats:
        return None
    sums = torch.stack([v.sum().float() for _, v in floats])
    if bool(torch.isfinite(sums).all()):
        return None
    return next((k for k, v in floats if not bool(torch.isfinite(v).all())), None)


def check_incoming(received: dict[str, torch.Tensor], model: torch.nn.Module, allowed: tuple[str, ...]) -> None:
    own = model.state_dict()
    extra = sorted(set(received) - set(allowed))
    if extra:
        raise BadArrays(f"server sent tensors this site keeps private or does not know: {extra[:5]}")
    for k, v in received.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise BadArrays(f"tensor {k}: shape {tuple(v.shape)} != model's {tuple(own[k].shape)}")
        mine = own[k].dtype
        if v.dtype != mine and not (mine.is_floating_point and v.dtype == torch.float16):
            raise BadArrays(f"tensor {k}: dtype {v.dtype}, but the model holds {mine} (servers send {mine}, or "
                            "float16 for floating tensors with server.transport_dtype = 'float16')")
    bad = non_finite(received)
    if bad is not None:
        raise BadArrays(f"tensor {bad}: contains NaN or inf")


def widen(received: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Received tensors in the model's own dtypes (float16 transport: the site computes in float32)."""
    own = model.state_dict()
    return {k: v if v.dtype == own[k].dtype else v.to(own[k].dtype) for k, v in received.items()}


def to_wire(out: dict[str, torch.Tensor], wire: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Each outgoing tensor in the dtype it arrived in (the server accepts exactly that dtype)."""
    res = {}
    for k, v in out.items():
        dtype = wire.get(k, v.dtype)
        if dtype != v.dtype:
            v = v.to(dtype)
            if not torch.isfinite(v).all():
                raise FloatingPointError(f"local update of {k} exceeds {dtype}'s range (server.transport_dtype = "
                                         "'float16'); the server drops this update")
        res[k] = v
    return res


def _received(msg: Message, allowed: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors a message carries (one packed array and its index, ``kumiki/packing.py``), as tensors the
    site owns (one copy each); a malformed index or array is refused (an error reply), never a crash."""
    if C.ARRAYS not in msg.content.array_records:
        return {}
    try:
        arrays = packing.take(msg.content, allowed=allowed)
    except packing.PackError as exc:
        raise BadArrays(str(exc)) from None
    return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}


def prepare(msg: Message, context: Context, for_training: bool) -> tuple[SiteJob, object, SiteStore, sites.SiteInfo]:
    job = C.Job.from_config(msg.content[C.CONFIG])
    node_config = dict(context.node_config)
    apply_site_threads(node_config, job.sim)  # this site's share of the machine's cores (client/threads.py)
    info, data = sites.resolve(node_config, job.sim, job.model, job.method)
    holdout = None
    if safeguard.applies(job, info.role, data):  # the holdout leaves the site's data: no model trains on it
        data, holdout = safeguard.split(data, job.safeguard.val_fraction)
    if for_training and info.role != "train":
        raise ValueError(f"site {info.name} is an unseen site: it evaluates only and never trains")
    method = entry(job.method.name)
    objective = method.load_objective()(job.method)
    skeleton = build_model(job.model, job.method, init=False)  # names and shapes only: no random init yet
    split = ParamSplit.build(skeleton, job.method.split_rules())
    store = SiteStore(info.state_dir)
    completed = int(msg.content[C.CONFIG].get(C.COMPLETED, 0))
    state = load_state(store, _fingerprint(split, job, skeleton, info.name), split, info, job, completed,
                       node_config, before_round=job.round if for_training else None)
    received = _received(msg, split.travelling(info.group or None))
    check_incoming(received, skeleton, split.travelling(info.group or None))
    wire = {k: v.dtype for k, v in received.items()}
    received = widen(received, skeleton)
    device = resolve_device(job.train.device)
    loaded = {**state.personal, **received}
    # every tensor arrived or is in the state: no random init; else the seeded initial values fill the gaps
    model = fill(skeleton, loaded, device)
    if model is None:
        model = build_model(job.model, job.method)
        model.load_state_dict(loaded, strict=False)
    model.to(device)
    trainer = Trainer(data.x_train, data.y_train, job.train, seed=_seed(job, info), device=device)
    extra = msg.content[C.EXTRA].to_torch_state_dict() if C.EXTRA in msg.content else {}
    sj = SiteJob(model, split, trainer, data, state, job, received, role=info.role, extra=extra,
                 task=objective.make_task(data.task), group=info.group, wire=wire, val=holdout)
    return sj, objective, store, info


def _seed(job: C.Job, info: sites.SiteInfo) -> str:
    """The site's seed for one round's message: deterministic across processes (unlike hash())."""
    return f"{job.model.seed}:{info.name}:{job.round}"


def _privacy_dir(context: Context, info: sites.SiteInfo, sim: dict | None) -> str:
    """Where the site's privacy ledger lives: node config ``privacy-dir``; in a simulation the run
    family's ledger dir; else the site's state dir (a deployment's state dir outlives runs)."""
    configured = dict(context.node_config).get("privacy-dir")
    if configured:
        return str(configured)
    if sim and "privacy_root" in sim:
        return f"{sim['privacy_root']}/{info.name}"
    return str(info.state_dir)


def _decline(msg: Message, info: sites.SiteInfo, exc: BaseException) -> Message:
    """A spent privacy budget is expected, not a failure: a warning and a coded reply (the site still evaluates)."""
    log.warning("site %s: %s", info.name, exc)
    return Message(Error(code=ERR_BUDGET, reason=str(exc)), reply_to=msg)


def _error(msg: Message, code: int, exc: BaseException) -> Message:
    log.error("site job failed: %s: %s", type(exc).__name__, exc)
    log.debug("%s", traceback.format_exc())
    return Message(Error(code=code, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    try:
        sj, objective, store, info = prepare(msg, context, for_training=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a logged error reply
        return _error(msg, ERR_SITE, exc)
    evaluation, eval_s = None, 0.0
    if C.EVALUATE_ROUND in msg.content[C.CONFIG]:  # one message per round: evaluate what arrived, then train
        t1 = time.perf_counter()
        evaluation = evaluate_first(sj, objective, info, msg.content[C.CONFIG][C.EVALUATE_ROUND], context,
                                    full=bool(msg.content[C.CONFIG].get(C.EVAL_FULL, False)))
        eval_s = time.perf_counter() - t1
        if evaluation is not None:
            evaluation["eval-time-s"] = eval_s
    dp = None
    if sj.job.privacy.enabled:
        try:
            ledger, dp = privacy.start(sj, _privacy_dir(context, info, sj.job.sim), f"{sj.trainer.seed}:dp")
        except privacy.BudgetExhausted as exc:
            return _decline(msg, info, exc)
        except Exception as exc:  # noqa: BLE001
            return _error(msg, ERR_SITE, exc)
        sj.trainer.dp = dp
    try:
        metrics = objective.fit(sj)
        if dp is not None:  # checked and recorded before anything leaves the site
            try:
                spent = privacy.finish(ledger, dp, sj.job.privacy, sj.state)
            except privacy.BudgetExhausted as exc:
                return _decline(msg, info, exc)
            # under DP nothing computed from the training split leaves outside epsilon: the loss and the method's
            # own numbers (M-Fed's decoder term) stay home; the accountant's go, and what the objective declares
            # post-processing of its DP-trained parameters or plan (``dp_metrics``: FLoRAL's pi, WorldLM's tokens)
            kept = {k: v for k, v in metrics.items() if objective.dp_metrics and k.startswith(objective.dp_metrics)}
            metrics = {"epsilon": spent, "noise-multiplier": dp.noise_multiplier, "dp-steps": float(dp.steps), **kept}
        state = {k: v.detach().cpu() for k, v in sj.model.state_dict().items()}
        out = to_wire(sj.split.outgoing(state, info.group or None), sj.wire)
        bad = non_finite(out)
        if bad is not None:
            raise FloatingPointError(f"local update of {bad} is not finite")
        sj.state.personal = {k: state[k].clone() for k in sj.split.personal}
        own_s = safeguard.train_own(sj) if sj.val is not None else None  # saved with the round, never sent
        sj.state.last_round = sj.job.round
        store.save(sj.state)
    except Exception as exc:  # noqa: BLE001
        return _error(msg, ERR_TRAIN, exc)
    m = {
        C.NUM_EXAMPLES: sj.data.num_train,
        "fit-time-s": time.perf_counter() - t0 - eval_s,  # the site's compute for training (evaluation apart)
    }
    if own_s is not None:  # the safeguard's extra compute: its own model's round (inside fit-time-s)
        m["safeguard-time-s"] = own_s
    if dp is None:
        m["train-loss"] = float(metrics.get("loss", 0.0))
    m.update({f"train-{k}": float(v) for k, v in metrics.items() if k not in ("loss", "examples")})
    content = RecordDict({C.METRICS: MetricRecord(m)})
    packing.put(content, out)  # one array and its index, as the server sent them (kumiki/packing.py)
    if evaluation is not None:
        content[C.EVALUATION] = MetricRecord(evaluation)
    return Message(content, reply_to=msg)


def evaluate_first(sj: SiteJob, objective, info: sites.SiteInfo, rnd, context: Context,
                   full: bool = False) -> dict | None:
    """Round ``rnd``'s evaluation inside a training message, equal to what round ``rnd``'s evaluate message
    computes: the received model is that round's aggregate and the personal state the one after it. It runs on a
    copy of the model, with that message's seeds, without a DP context and with the global RNG restored after, so
    training then goes on exactly as without it and the privacy ledger never sees it. None (logged) when it fails:
    the server then asks with an evaluate message of its own."""
    try:
        job = replace(sj.job, round=int(rnd))
        trainer = Trainer(sj.data.x_train, sj.data.y_train, job.train, seed=_seed(job, info), device=sj.trainer.device)
        ev = replace(sj, model=copy.deepcopy(sj.model), trainer=trainer, job=job)
        with torch.random.fork_rng(devices=[]):
            m = evaluation_metrics(ev, objective, info, full=eval_sample.is_full(job, {C.EVAL_FULL: full}))
        if job.privacy.enabled:
            m["epsilon"] = privacy.spent(ev, _privacy_dir(context, info, job.sim))
        return m
    except Exception as exc:  # noqa: BLE001 - the training part of the message goes on
        log.error("site %s: evaluation of round %s failed: %s: %s", info.name, rnd, type(exc).__name__, exc)
        return None


#: the site's own log of the metrics it kept home (in its state dir): what its operator reads
LOCAL_LOG = "evaluation-local.jsonl"


def evaluation_metrics(sj: SiteJob, objective, info: sites.SiteInfo, full: bool = True) -> dict[str, float | int]:
    """The site's evaluation of the model it holds now: personalized (training sites), global (methods with a
    shared path) and, on unseen sites, the method's new-site protocol (``eval.unseen_adapt_epochs``). ``full``:
    the whole test split (the last round); else the site's fixed evaluation sample (``eval.sample``).

    Under per-site DP (``privacy.enabled``) no metric of a model built from the training split outside DP-SGD
    leaves the site: FedAvg-FT's fine-tuned copy, FedHB's personalization and every unseen site's adaptation train
    in the clear here, so a test metric of theirs is a training-split value epsilon does not cover. Such a path is
    noticed, whatever the method, by the trainer's reads of the training split while its model is built
    (``Trainer.reads``); its metrics go to the site's own log (``evaluation-local.jsonl`` in its state dir) and
    the reply carries only ``withheld-<path> = 1``. Charging those steps to the ledger instead would let the
    server spend a site's budget by asking for evaluations, and would make epsilon depend on how often it asks;
    the site keeps its best personalized model and its operator the figure (docs/privacy.md)."""
    task = sj.task.name
    x_test, y_test = eval_sample.test_split(sj.job, sj.data, info.name, full)
    m: dict[str, float | int] = {C.NUM_EXAMPLES: len(y_test), "unseen": int(info.role == "unseen")}
    private = sj.job.privacy.enabled
    kept: dict[str, float] = {}

    def build(make):
        """(the path's model, True when building it read the training split: trained outside DP-SGD)."""
        before = sj.trainer.reads
        model = make()
        return model, sj.trainer.reads != before

    def put(path: str, model, predict, r: dict | None = None, clear: bool = False) -> dict:
        r = r or evaluate(model, x_test, y_test, predict, task=sj.task)
        values = {metric_key(path, task): r["score"], f"{path}-loss": r["loss"]}
        if private and clear:
            kept.update(values)
            m[C.WITHHELD + path] = 1
        else:
            m.update(values)
        return r

    personal = done = None
    personal_clear = False
    if info.role == "train":
        personal, personal_clear = build(lambda: objective.personalized_model(sj))
        done = put("personalized", personal, objective.predict_personal, clear=personal_clear)
        if sj.val is not None:
            t0 = time.perf_counter()
            chosen = safeguard.choose(sj, objective, personal, done, (x_test, y_test))
            safeguard.record(info.state_dir, sj.job, chosen, task)
            if not private:  # under DP every safeguard number is a training-split value: it stays
                m.update(chosen)
            m["safeguard-eval-time-s"] = time.perf_counter() - t0  # its extra evaluation (a time, not a value)
    if objective.has_global:
        shared, clear = build(lambda: objective.global_model(sj))
        same = done is not None and objective.global_is_personal(personal, shared)  # FedAvg: evaluated once
        put("global", shared, objective.predict_global, done if same else None, clear=clear or (same and personal_clear))
    epochs = sj.job.eval.unseen_adapt_epochs
    if info.role == "unseen" and epochs > 0:
        adapted, clear = build(lambda: objective.adapt_unseen(sj, epochs))
        if adapted is not None:
            put("adapted", adapted, objective.predict_adapted, clear=clear)
    if kept:
        keep_local(info, sj.job.round, kept)
    return m


def keep_local(info: sites.SiteInfo, rnd: int, metrics: dict[str, float]) -> None:
    """Metrics that must not leave the site (evaluation under DP): a line in its own log, and the site's logger."""
    log.info("site %s, round %s: kept at the site under DP (trained outside DP-SGD): %s", info.name, rnd,
             ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    try:
        path = Path(info.state_dir) / LOCAL_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"round": int(rnd), "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "metrics": metrics}) + "\n")
    except OSError as exc:  # the site's own record; the evaluation reply goes on without it
        log.warning("site %s: could not write %s: %s", info.name, LOCAL_LOG, exc)


@app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    try:
        sj, objective, _, info = prepare(msg, context, for_training=False)
        m = evaluation_metrics(sj, objective, info, full=eval_sample.is_full(sj.job, msg.content[C.CONFIG]))
        if sj.job.privacy.enabled and info.role == "train":
            m["epsilon"] = privacy.spent(sj, _privacy_dir(context, info, sj.job.sim))
    except Exception as exc:  # noqa: BLE001
        return _error(msg, ERR_SITE, exc)
    m["eval-time-s"] = time.perf_counter() - t0
    return Message(RecordDict({C.METRICS: MetricRecord(m)}), reply_to=msg)


@app.query(C.QUERY_PROFILE)
def profile(msg: Message, context: Context) -> Message:
    """Who am I: the server maps node ids to site names, roles and groups with this."""
    try:
        job = C.Job.from_config(msg.content[C.CONFIG])
        info, data = sites.resolve(dict(context.node_config), job.sim, job.model, job.method)
    except Exception as exc:  # noqa: BLE001
        return _error(msg, ERR_SITE, exc)
    rec = ConfigRecord({
        "site": info.name, "role": info.role, "group": info.group, "task": data.task,
        "num-train": data.num_train, "num-test": len(data.y_test),
        # the inputs' scale as the site checked it (site.json ``inputs``; kumiki/data/inputs.py): the report shows it
        "inputs": data.inputs,
    })
    domain = dict(context.node_config).get("domain", data.meta.get("domain"))
    if domain:  # optional: the camera/domain the site's operator described (shown in the report)
        rec["domain"] = "".join(c for c in str(domain) if c.isprintable())[:64]
    return Message(RecordDict({C.PROFILE: rec}), reply_to=msg)
