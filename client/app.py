"""The Kumiki ClientApp: one per site (SuperNode).

Every handler rebuilds the same pieces from the message and the site's disk:
job knobs (ConfigRecord) -> model + ParamSplit -> personal state (site store)
-> received shared tensors. Training replies carry ``split.outgoing(...)``
only, so no personal tensor can leave; a failure becomes an error reply that
the server logs and drops, never a half-written state.
"""

from __future__ import annotations

import logging
import time
import traceback

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import privacy
from client import site as sites
from client.loop import Trainer, evaluate, resolve_device
from client.methods.base import SiteJob
from client.state import SiteState, SiteStore, StateMismatch, StateMissing
from kumiki import contract as C
from kumiki.tasks import metric_key
from kumiki.registry import entry
from kumiki.split import ParamSplit
from models import build_model

log = logging.getLogger("kumiki.client")
app = ClientApp()

ERR_SITE = 4100  # the site cannot run the job (data, state or config problem)
ERR_TRAIN = 4200  # local training failed (non-finite loss, ...)
ERR_BUDGET = C.ERR_BUDGET  # the site's privacy budget is spent: it declines to train (and keeps evaluating)


class BadArrays(ValueError):
    """The server sent tensors this site must not accept."""


def _fingerprint(split: ParamSplit, job: C.Job, model: torch.nn.Module, site: str = "") -> str:
    """What a state file must have been written for: this split, model, site and run."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return split.fingerprint({"method": job.method.name, "variant": job.method.variant, "shapes": shapes,
                              "site": site, "run": job.run})


def load_state(store: SiteStore, fingerprint: str, split: ParamSplit, info: sites.SiteInfo, job: C.Job,
               completed: int, node_config: dict, before_round: int | None = None) -> SiteState:
    """The site's durable state, checked: present when the server says the site completed rounds (unless
    ``on_missing_state = reset``), and holding exactly the split's personal tensors. A training message passes
    ``before_round`` (its round): a round trained again after a server resume starts from the state before it."""
    store.claim(info.name)
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
    if state.personal and set(state.personal) != set(split.personal):
        missing, extra = sorted(set(split.personal) - set(state.personal)), sorted(set(state.personal) - set(split.personal))
        raise StateMismatch(f"site {info.name}: {store.path} lacks personal tensors {missing[:5]} or has unknown "
                            f"ones {extra[:5]}; move it away to restart the site")
    return state


def check_incoming(received: dict[str, torch.Tensor], model: torch.nn.Module, allowed: tuple[str, ...]) -> None:
    own = model.state_dict()
    extra = sorted(set(received) - set(allowed))
    if extra:
        raise BadArrays(f"server sent tensors this site keeps private or does not know: {extra[:5]}")
    for k, v in received.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise BadArrays(f"tensor {k}: shape {tuple(v.shape)} != model's {tuple(own[k].shape)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise BadArrays(f"tensor {k}: contains NaN or inf")


def prepare(msg: Message, context: Context, for_training: bool) -> tuple[SiteJob, object, SiteStore, sites.SiteInfo]:
    job = C.Job.from_config(msg.content[C.CONFIG])
    node_config = dict(context.node_config)
    info, data = sites.resolve(node_config, job.sim, job.model, job.method)
    if for_training and info.role != "train":
        raise ValueError(f"site {info.name} is an unseen site: it evaluates only and never trains")
    method = entry(job.method.name)
    objective = method.load_objective()(job.method)
    model = build_model(job.model, job.method)
    split = ParamSplit.build(model, job.method.split_rules())
    store = SiteStore(info.state_dir)
    completed = int(msg.content[C.CONFIG].get(C.COMPLETED, 0))
    state = load_state(store, _fingerprint(split, job, model, info.name), split, info, job, completed, node_config,
                       before_round=job.round if for_training else None)
    received = msg.content[C.ARRAYS].to_torch_state_dict() if C.ARRAYS in msg.content else {}
    check_incoming(received, model, split.travelling(info.group or None))
    model.load_state_dict({**state.personal, **received}, strict=False)
    device = resolve_device(job.train.device)
    model.to(device)
    seed = f"{job.model.seed}:{info.name}:{job.round}"  # deterministic across processes (unlike hash())
    trainer = Trainer(data.x_train, data.y_train, job.train, seed=seed, device=device)
    extra = msg.content[C.EXTRA].to_torch_state_dict() if C.EXTRA in msg.content else {}
    sj = SiteJob(model, split, trainer, data, state, job, received, role=info.role, extra=extra,
                 task=objective.make_task(data.task), group=info.group)
    return sj, objective, store, info


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
                spent = privacy.finish(ledger, dp, sj.job.privacy)
            except privacy.BudgetExhausted as exc:
                return _decline(msg, info, exc)
            metrics.update({"epsilon": spent, "noise-multiplier": dp.noise_multiplier, "dp-steps": float(dp.steps)})
        state = {k: v.detach().cpu() for k, v in sj.model.state_dict().items()}
        out = sj.split.outgoing(state, info.group or None)
        for k, v in out.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise FloatingPointError(f"local update of {k} is not finite")
        sj.state.personal = {k: state[k].clone() for k in sj.split.personal}
        sj.state.last_round = sj.job.round
        store.save(sj.state)
    except Exception as exc:  # noqa: BLE001
        return _error(msg, ERR_TRAIN, exc)
    m = {
        C.NUM_EXAMPLES: sj.data.num_train,
        "train-loss": float(metrics.get("loss", 0.0)),
        "fit-time-s": time.perf_counter() - t0,
    }
    m.update({f"train-{k}": float(v) for k, v in metrics.items() if k not in ("loss", "examples")})
    return Message(RecordDict({C.ARRAYS: C.to_record(out), C.METRICS: MetricRecord(m)}), reply_to=msg)


def evaluation_metrics(sj: SiteJob, objective, info: sites.SiteInfo) -> dict[str, float | int]:
    """The site's evaluation of the model it holds now: personalized (training sites), global (methods with a
    shared path) and, on unseen sites, the method's new-site protocol (``eval.unseen_adapt_epochs``)."""
    d, task = sj.data, sj.task.name
    m: dict[str, float | int] = {C.NUM_EXAMPLES: len(d.y_test), "unseen": int(info.role == "unseen")}

    def put(path: str, model, predict) -> None:
        r = evaluate(model, d.x_test, d.y_test, predict, task=sj.task)
        m.update({metric_key(path, task): r["score"], f"{path}-loss": r["loss"]})

    if info.role == "train":
        put("personalized", objective.personalized_model(sj), objective.predict_personal)
    if objective.has_global:
        put("global", objective.global_model(sj), objective.predict_global)
    epochs = sj.job.eval.unseen_adapt_epochs
    if info.role == "unseen" and epochs > 0:
        adapted = objective.adapt_unseen(sj, epochs)
        if adapted is not None:
            put("adapted", adapted, objective.predict_adapted)
    return m


@app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    try:
        sj, objective, _, info = prepare(msg, context, for_training=False)
        m = evaluation_metrics(sj, objective, info)
        if sj.job.privacy.enabled and info.role == "train":
            m["epsilon"] = privacy.spent(sj, _privacy_dir(context, info, sj.job.sim))
    except Exception as exc:  # noqa: BLE001
        return _error(msg, ERR_SITE, exc)
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
    })
    domain = dict(context.node_config).get("domain", data.meta.get("domain"))
    if domain:  # optional: the camera/domain the site's operator described (shown in the report)
        rec["domain"] = "".join(c for c in str(domain) if c.isprintable())[:64]
    return Message(RecordDict({C.PROFILE: rec}), reply_to=msg)
