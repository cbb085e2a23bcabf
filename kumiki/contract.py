"""The message contract between strategies and sites.

A train or evaluate message holds:
  ``arrays``  ArrayRecord: the shared tensors (+ the site's group tensors), nothing else, packed into one
              array (``packed``) whose index rides in ``config`` (``kumiki/packing.py``)
  ``config``  ConfigRecord: ``server-round`` and the job knobs below, as JSON strings
  ``extra``   optional ArrayRecord: server-side method state a site needs (FedHB's precision)
A site replies with ``arrays`` (train only: the same names it received, packed the same way, the index in
the reply's own ``config`` record) and
``metrics`` (MetricRecord with ``num-examples``). A train message whose config holds
``kumiki.evaluate-round = k`` also asks the site to evaluate the received model first, as the evaluate
message of round k would (the model it receives is round k's aggregate); the reply then carries that
evaluation as a second MetricRecord, ``evaluation`` (one message per site per round). ``query.profile`` asks a site
who it is (name, role, group, example counts) without sending any tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from kumiki.config import EvalSection, PrivacySection, SafeguardSection, SiteSection, TrainSection
from kumiki.methods.base import MethodConfig
from kumiki.npy import npy_bytes
from kumiki.registry import entry
from models.spec import ModelSpec

ARRAYS = "arrays"
EXTRA = "extra"  # optional ArrayRecord of method-specific non-model arrays (never model tensors)
CONFIG = "config"
METRICS = "metrics"
PROFILE = "profile"
NUM_EXAMPLES = "num-examples"
#: an evaluation metric ``withheld-<path> = 1``: under DP the site kept that path's metrics home (its model trained
#: on the training split outside DP-SGD; client/app.py ``evaluation_metrics``)
WITHHELD = "withheld-"
ROUND = "server-round"
QUERY_PROFILE = "profile"  # message type "query.profile"
#: Error code of a training reply from a site whose privacy budget is spent (it still evaluates).
ERR_BUDGET = 4300

_METHOD, _TRAIN, _MODEL, _PRIVACY, _SIM = "kumiki.method", "kumiki.train", "kumiki.model", "kumiki.privacy", "kumiki.sim"
_EVAL, _SITE, _RUN, _ROUNDS = "kumiki.eval", "kumiki.site", "kumiki.run", "kumiki.rounds"
_RUN_ID = "kumiki.run-id"
_SAFEGUARD = "kumiki.safeguard"
_OWN_TRAIN = "kumiki.own-train"
#: per-site config entry: the last round the server accepted this site's update for (0: none yet)
COMPLETED = "kumiki.completed"
#: train-message config entry: evaluate the received model as round k's evaluation before training
EVALUATE_ROUND = "kumiki.evaluate-round"
#: evaluate/train-message config entry: evaluate on the whole test split (the run's last round); without it a site
#: scores its fixed evaluation sample (``eval.sample``; client/eval_sample.py)
EVAL_FULL = "kumiki.eval-full"
#: MetricRecord of a train reply holding that evaluation (the keys of an evaluate reply's ``metrics``)
EVALUATION = "evaluation"


@dataclass(frozen=True)
class Job:
    """Everything a site needs for one message, decoded and validated."""

    round: int
    method: MethodConfig
    train: TrainSection
    model: ModelSpec
    privacy: PrivacySection
    sim: dict[str, Any] | None = None  # simulation only: where the materialized site folders live
    eval: EvalSection = field(default_factory=EvalSection)
    site: SiteSection = field(default_factory=SiteSection)
    run: str = ""  # the run's name: part of each site state's fingerprint
    rounds: int = 0  # rounds the run plans (a DP site solves its noise multiplier over them)
    #: this run's identity, drawn when it starts fresh and kept by a resume: a site whose state belongs to another
    #: run (an earlier run, or a rerun under the same name) archives it and starts fresh (``client.state``)
    run_id: str = ""
    #: the safeguard's knobs (``client/safeguard.py``); a message without them (an older server) turns it off
    safeguard: SafeguardSection = field(default_factory=lambda: SafeguardSection(enabled=False))
    #: the ``[train]`` of the safeguard's own model: the local-only baseline's (``KumikiConfig.alone_train``);
    #: None (an older server) trains it with ``train``
    own_train: TrainSection | None = None

    def to_config(self) -> ConfigRecord:
        rec: dict[str, Any] = {
            ROUND: self.round,
            _METHOD: self.method.model_dump_json(),
            _TRAIN: self.train.model_dump_json(),
            _MODEL: self.model.to_json(),
            _PRIVACY: self.privacy.model_dump_json(),
            _EVAL: self.eval.model_dump_json(),
            _SITE: self.site.model_dump_json(),
            _RUN: self.run,
            _ROUNDS: self.rounds,
            _RUN_ID: self.run_id,
            _SAFEGUARD: self.safeguard.model_dump_json(),
        }
        if self.sim is not None:
            rec[_SIM] = json.dumps(self.sim)
        if self.own_train is not None:
            rec[_OWN_TRAIN] = self.own_train.model_dump_json()
        return ConfigRecord(rec)

    @classmethod
    def from_config(cls, rec: ConfigRecord) -> Job:
        try:
            method_raw = json.loads(str(rec[_METHOD]))
            method = entry(method_raw["name"]).config.model_validate(method_raw)
            return cls(
                round=int(rec[ROUND]),
                method=method,
                train=TrainSection.model_validate_json(str(rec[_TRAIN])),
                model=ModelSpec.from_json(str(rec[_MODEL])),
                privacy=PrivacySection.model_validate_json(str(rec[_PRIVACY])),
                sim=json.loads(str(rec[_SIM])) if _SIM in rec else None,
                eval=EvalSection.model_validate_json(str(rec[_EVAL])) if _EVAL in rec else EvalSection(),
                site=SiteSection.model_validate_json(str(rec[_SITE])) if _SITE in rec else SiteSection(),
                run=str(rec[_RUN]) if _RUN in rec else "",
                rounds=int(rec[_ROUNDS]) if _ROUNDS in rec else 0,
                run_id=str(rec[_RUN_ID]) if _RUN_ID in rec else "",
                safeguard=(SafeguardSection.model_validate_json(str(rec[_SAFEGUARD])) if _SAFEGUARD in rec
                           else SafeguardSection(enabled=False)),
                own_train=TrainSection.model_validate_json(str(rec[_OWN_TRAIN])) if _OWN_TRAIN in rec else None,
            )
        except (KeyError, ValueError) as e:
            raise ValueError(f"malformed job config in message: {e}") from None


def to_array(value: Any) -> Array:
    """A numpy array or torch tensor as a Flower ``Array``: exactly the bytes ``Array(ndarray)`` would hold
    (np.save's), made with one copy of the data instead of np.save's two or three (``kumiki.npy.npy_bytes``)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    v = np.asarray(value)
    v = v if v.flags.c_contiguous else v.copy(order="C")  # ascontiguousarray would make 0-d arrays 1-d
    return Array(dtype=str(v.dtype), shape=tuple(int(d) for d in v.shape), stype="numpy.ndarray", data=npy_bytes(v))


def to_record(arrays: dict[str, Any]) -> ArrayRecord:
    """Named numpy arrays or torch tensors -> ArrayRecord (empty allowed: local-only sends nothing)."""
    rec = ArrayRecord()
    for k, v in arrays.items():
        rec[k] = to_array(v)
    return rec


def from_record(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}
