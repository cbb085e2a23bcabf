"""No factory worse off: a training site also keeps a model that is only its own, and serves, at each evaluation,
whichever of its personalized (joined) model and its own model is better on a validation split it holds out.

Why: joining a federation is a bet a plant manager makes for his factory. With the safeguard the factory never
deploys a joined model that its own validation data says is worse than what it could train alone, and the
report shows what that choice was worth on test (docs/safeguard.md).

* **The holdout** (``split``): record i is validation when ``sha256(TAG, x_i, y_i) < val_fraction`` (as a fraction
  of 2^64). Membership depends on the record alone, so it is the same in every run, engine, seed and restart (a
  factory means the same split everywhere); the server, which has no image, cannot compute it; and adding or
  removing one record changes that record's membership only, so under DP the fit parts of two neighbouring data
  sets are still neighbours (a permutation drawn over the whole set would move many records at once). Neither
  model trains on the holdout: the site's ``SiteJob.data`` becomes the fit part, so every method, the DP
  accountant's sample rate and ``num-examples`` see only that.
* **The own model** (``train_own``): the plain classifier from the run's seeded initialization (the local-only
  baseline's start), trained by the one loop (``Trainer.fit``) on the fit part after the method's own training,
  with the ``[train]`` knobs the local-only baseline gets (``Job.own_train``: the run's ``[train]`` without the
  method's paper defaults), one pass of their ``local_epochs`` per round. It stands for "alone": with the
  method's optimizer it was better or worse than alone by the optimizer alone (FedHB's 2 epochs, DualFed's
  lr). It lives in the site state (``SiteState.extra["safeguard"]``, saved with the round like every personal
  part, so a resumed round is re-trained from the state before it) and is never put in a message.
* **The choice** (``choose``): made on validation between the two models that never trained on it, the joined
  (personalized) model and the own model: the own model is chosen only when its validation metric is strictly
  better (a tie chooses the joined model), and **the chosen model is served as it was trained**. The evaluation
  reports ``served-<metric>`` (the served model on test), ``own-<metric>`` (the own model on test),
  ``val_joined-<metric>``, ``val_own-<metric>`` (the choice's numbers) and ``safeguard-own`` (1: the own side is
  served); ``<state-dir>/safeguard.json`` records the latest choice for the factory's operator (what to deploy).
* **The refit, measured and not served** (``safeguard.measure_refit``, bench only): refitting the chosen side on
  the whole training split after the choice (select on a holdout, then refit) was served from commit fc7d5b8 and
  reverted: on the pilot's leaderboard and sweep runs it did not serve better models (docs/safeguard.md, "The
  refit") and it cost a second local training per site and round. With the knob on, a site also trains the own
  model's **refit twin** (``own_full``: the same recipe on the whole training split) and reports
  ``refit-<metric>``: the chosen side refit, on test (the own side: ``own_full``; the joined side: the
  personalized model rebuilt from the whole split where the method builds it at evaluation from the training
  split, FedAvg-FT's fine-tuned copy or FedHB's personalization, ``refit_joined``; else the joined model as it
  is). What is served does not change.
* **Under DP** the own model trains in the clear and the holdout is training data: every safeguard number would
  be a training-split value outside epsilon, so none leaves the site (``safeguard.json`` still records the choice
  at the site) and the own model's training never touches the privacy ledger.

It applies to training sites of federated methods on classification data; local-only (``method.federated``
false) already serves its own model, so its site trains on all its data as a factory alone would.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.loop import Trainer, evaluate, forward
from kumiki.data.sites import SiteData
from kumiki.tasks import TASKS, metric_key
from models import build_model
from kumiki.atomic import atomic_json

log = logging.getLogger("kumiki.client")

KEY = "safeguard"  # SiteState.extra entry: {"own": {name: tensor}, "round": int} (+ "own_full": measure_refit)
FILE = "safeguard.json"  # the latest choice, in the site's state dir
TAG = b"kumiki-safeguard-holdout-v1"
#: the evaluation keys the safeguard adds (besides ``served``, ``own``, ``val_joined`` and ``val_own`` metrics, and
#: ``refit`` under ``safeguard.measure_refit``)
FLAG = "safeguard-own"
PATHS = ("served", "own", "val_joined", "val_own", "refit")


@dataclass(frozen=True)
class Holdout:
    """A site's validation records, carved from its training split; ``full`` is the split before carving."""

    x: np.ndarray
    y: np.ndarray
    full: SiteData


def applies(job, role: str, data: SiteData) -> bool:
    """On for training sites of federated methods on classification data when ``safeguard.enabled``."""
    return (job.safeguard.enabled and role == "train" and job.method.federated
            and data.task == "classification")


def holdout_mask(x: np.ndarray, y: np.ndarray, fraction: float) -> np.ndarray:
    """True for the records held out: a hash of each record alone against ``fraction`` (module docstring)."""
    xs, ys = np.ascontiguousarray(x), np.ascontiguousarray(y)
    bound = int(fraction * 2.0 ** 64)
    out = np.empty(len(ys), dtype=bool)
    for i in range(len(ys)):
        h = hashlib.sha256(TAG)
        h.update(xs[i].tobytes())
        h.update(ys[i].tobytes())
        out[i] = int.from_bytes(h.digest()[:8], "little") < bound
    return out


#: (id of the full SiteData, fraction) -> (that SiteData, its fit part, its holdout): a process serving many
#: messages hashes a site's records once (the data object itself is cached by ``client.site``)
_CACHE: OrderedDict[tuple[int, float], tuple[SiteData, SiteData, Holdout | None]] = OrderedDict()
_CACHE_SIZE = 16


def split(data: SiteData, fraction: float) -> tuple[SiteData, Holdout | None]:
    """(the fit part, the holdout); (data, None) when the split leaves no validation record or fewer than two
    records to train on (the safeguard then stays off on this site, logged)."""
    key = (id(data), float(fraction))
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is data:
        _CACHE.move_to_end(key)
        return hit[1], hit[2]
    mask = holdout_mask(data.x_train, data.y_train, fraction)
    n_val = int(mask.sum())
    if n_val == 0 or len(mask) - n_val < 2:
        log.warning("site %s: safeguard off on this site: %d training records give %d validation records at "
                    "safeguard.val_fraction = %g", data.name, len(mask), n_val, fraction)
        fit, hold = data, None
    else:
        fit = dataclasses.replace(data, x_train=data.x_train[~mask], y_train=data.y_train[~mask])
        hold = Holdout(data.x_train[mask], data.y_train[mask], data)
    _CACHE[key] = (data, fit, hold)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return fit, hold


def own_model(sj, which: str = "own") -> nn.Module | None:
    """The site's own model (``which``: ``own``, trained on the fit part; ``own_full``, its refit twin on the whole
    training split, trained only under ``safeguard.measure_refit``) from its state, or None before its first
    training round (or without the twin)."""
    tensors = ((sj.state.extra or {}).get(KEY) or {}).get(which)
    if not tensors:
        return None
    model = build_model(sj.job.model, "plain")
    model.load_state_dict(tensors)
    return model.to(sj.trainer.device)


def train_own(sj) -> float:
    """One round of the own model on the fit part and, under ``safeguard.measure_refit``, of its refit twin on the
    whole training split (never DP: they never leave and nothing computed from them leaves a DP site); stored in
    ``sj.state.extra`` for the caller's save. Each has its own seed and the global RNG is restored after each, so
    the twin changes nothing else. Returns the seconds it took."""
    t0 = time.perf_counter()
    sides = [("own", sj.data)]
    if sj.job.safeguard.measure_refit and sj.val is not None:
        sides.append(("own_full", sj.val.full))
    out = {"round": int(sj.job.round)}
    for which, data in sides:
        model = own_model(sj, which) or build_model(sj.job.model, "plain").to(sj.trainer.device)
        knobs = sj.job.own_train or sj.job.train  # the local-only baseline's [train] (an older server: the method's)
        trainer = Trainer(data.x_train, data.y_train, knobs, seed=f"{sj.trainer.seed}:{which}",
                          device=sj.trainer.device)
        with torch.random.fork_rng(devices=[]):  # the method's randomness goes on as without the safeguard
            trainer.fit(model, model.parameters(), sj.task_loss, tag=f"{which}:r{sj.job.round}")
        out[which] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    sj.state.extra[KEY] = out
    return time.perf_counter() - t0


def refit_joined(sj, objective) -> nn.Module | None:
    """The personalized model rebuilt from the whole training split (validation included; ``measure_refit`` only),
    or None when the method's personalized model does not train on the training split at evaluation (FedPer's,
    Ditto's: it would be served as it is). Runs on a copy of the model with the same seeds and tags as the fit-part one, with the
    global RNG restored after."""
    full = sj.val.full
    trainer = Trainer(full.x_train, full.y_train, sj.job.train, seed=sj.trainer.seed, device=sj.trainer.device)
    with torch.random.fork_rng(devices=[]):
        model = objective.personalized_model(dataclasses.replace(sj, model=copy.deepcopy(sj.model), trainer=trainer,
                                                                 data=full))
    return model if trainer.reads else None


def serves_own(val_joined: float, val_own: float | None, higher_is_better: bool = True) -> bool:
    """The own model is served only when it is strictly better on validation (a tie serves the joined one)."""
    if val_own is None:
        return False
    return val_own > val_joined if higher_is_better else val_own < val_joined


def choose(sj, objective, personal: nn.Module, joined_test: dict, test=None) -> dict[str, float]:
    """The served model's evaluation keys (module docstring); ``joined_test`` is the personalized model's test
    evaluation already computed, on ``test`` = (x, y) (the round's evaluation sample; default the whole split),
    which the own and the served model are scored on too, so that served, own and joined compare on the same
    examples. The chosen model is served as trained; under ``measure_refit`` the chosen side refit on the whole
    training split (``own_full``, ``refit_joined``) is scored too (``refit``), and not served."""
    x_test, y_test = test if test is not None else (sj.data.x_test, sj.data.y_test)
    hold: Holdout = sj.val
    task = sj.task.name
    vj = evaluate(personal, hold.x, hold.y, objective.predict_personal, task=sj.task)["score"]
    m: dict[str, float] = {metric_key("val_joined", task): vj}
    own = own_model(sj)
    vo = ot = None
    if own is not None:
        vo = evaluate(own, hold.x, hold.y, forward, task=sj.task)["score"]
        ot = evaluate(own, x_test, y_test, forward, task=sj.task)["score"]
        m.update({metric_key("val_own", task): vo, metric_key("own", task): ot})
    pick = serves_own(vj, vo, TASKS[task].higher_is_better)
    m[metric_key("served", task)] = ot if pick else joined_test["score"]
    m[FLAG] = int(pick)
    refit = _refit_score(sj, objective, pick, joined_test["score"], x_test, y_test) \
        if sj.job.safeguard.measure_refit else None
    if refit is not None:
        m[metric_key("refit", task)] = refit
    return m


def _refit_score(sj, objective, pick: bool, joined: float, x_test, y_test) -> float | None:
    """``measure_refit``: the chosen side refit on the whole training split, on test (module docstring); None when
    the own side is chosen and its twin was not trained yet (a state from before the knob was turned on)."""
    if pick:
        twin = own_model(sj, "own_full")
        return evaluate(twin, x_test, y_test, forward, task=sj.task)["score"] if twin is not None else None
    refit = refit_joined(sj, objective)
    return joined if refit is None else evaluate(refit, x_test, y_test, objective.predict_personal,
                                                 task=sj.task)["score"]


def keys(task: str) -> set[str]:
    """Every evaluation key ``choose`` may add."""
    return {metric_key(p, task) for p in PATHS} | {FLAG}


def record(state_dir: Path, job, m: dict, task: str) -> None:
    """``<state-dir>/safeguard.json``: the latest choice, for the factory's operator (written atomically)."""
    if FLAG not in m:
        return
    obj = {"run": job.run, "run_id": job.run_id, "round": int(job.round),
           "serves": "own" if m[FLAG] else "joined",
           "validation": {"joined": m.get(metric_key("val_joined", task)), "own": m.get(metric_key("val_own", task))},
           "test": {"served": m.get(metric_key("served", task)), "own": m.get(metric_key("own", task))}}
    path = Path(state_dir) / FILE
    try:
        atomic_json(path, obj, indent=2)
    except OSError as exc:  # the choice still holds; only the operator's note is missing
        log.warning("site state %s: cannot write %s: %s", state_dir, FILE, exc)


def read_choice(state_dir: Path) -> dict | None:
    """The latest choice a site recorded (``record``), or None."""
    try:
        return json.loads((Path(state_dir) / FILE).read_text())
    except (OSError, ValueError):
        return None


__all__ = ["Holdout", "applies", "split", "own_model", "train_own", "refit_joined", "choose", "serves_own", "keys", "record",
           "read_choice"]
