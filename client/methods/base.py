"""SiteObjective: what a method does on a site, plugged into the one loop.

Defaults are FedAvg's: train every parameter on cross-entropy, predict with the
whole model. A method overrides only what differs (its loss, its stages, its
personalized or global prediction path, its new-site protocol).

Three evaluation paths (ARCHITECTURE section 7):

* ``personalized_model``: what a training site deploys, on its own test split;
* ``global_model``: the shared model alone (zero-shot), on training and unseen sites;
* ``adapt_unseen``: the method's own protocol for a site that never trained
  (``eval.unseen_adapt_epochs`` epochs on its train split), or None where the
  method has none (FedAvg, FedProx).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from client.bn import has_personal_bn, reestimate_bn
from client.loop import LossFn, Penalty, Trainer, forward
from client.state import SiteState
from client.tasks import Classification, Task, task_for
from kumiki.contract import Job
from kumiki.data.sites import SiteData
from kumiki.split import ParamSplit


@dataclass
class SiteJob:
    """One message's worth of work on one site."""

    model: nn.Module
    split: ParamSplit
    trainer: Trainer
    data: SiteData
    state: SiteState
    job: Job
    #: The tensors the server sent this round (w_t for the shared and group parts).
    received: dict[str, torch.Tensor]
    #: "train" or "unseen" (unseen sites only ever evaluate).
    role: str = "train"
    #: Method-specific non-model arrays from the server (message key ``extra``), e.g. FedHB's precision.
    extra: dict[str, torch.Tensor] | None = None
    #: What the site learns (its data's ``task``): the loss every objective trains on, and the metric.
    task: Task = field(default_factory=Classification)
    #: The dtype each received tensor travelled in (float16 under ``server.transport_dtype``): the reply's dtypes.
    wire: dict[str, torch.dtype] = field(default_factory=dict)
    #: The site's group (node config / site.json ``group``; M-Fed: its task group): which group tensors it gets.
    group: str = ""
    #: The validation records the safeguard holds out of the training split (``client.safeguard``), or None.
    val: Any = None

    @property
    def task_loss(self) -> LossFn:
        """The task's loss of ``model(x)`` (cross-entropy for classification): the base of every objective."""
        task = self.task
        return lambda model, x, y: task.loss(model(x), y)


class SiteObjective:
    #: False where the method has no shared-only prediction path (global metrics are then null).
    has_global = True
    #: training metrics (name prefixes) a DP site still sends: functions of its DP-trained parameters or of the
    #: plan (post-processing, inside epsilon). Every other training metric stays home under DP (client/app.py).
    dp_metrics: tuple[str, ...] = ()

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def make_task(self, name: str) -> Task:
        """The site's task object (a method may pass options: M-Fed's edge tolerance)."""
        return task_for(name)

    # -- training ---------------------------------------------------------
    def loss(self, sj: SiteJob) -> LossFn:
        """The per-example loss on a batch (what DP-SGD clips per example)."""
        return sj.task_loss

    def penalty(self, sj: SiteJob) -> Penalty | None:
        """A term of the parameters alone (FedProx's proximal term), kept out of ``loss`` so that DP-SGD adds its
        gradient after clipping and noise instead of dropping it (``Trainer.fit``)."""
        return None

    def fit(self, sj: SiteJob) -> dict[str, float]:
        return sj.trainer.fit(sj.model, sj.model.parameters(), self.loss(sj), tag=f"r{sj.job.round}",
                              penalty=self.penalty(sj))

    # -- evaluation -------------------------------------------------------
    def personalized_model(self, sj: SiteJob) -> nn.Module:
        """The model this site deploys (FedAvg-FT returns a fine-tuned private copy)."""
        return sj.model

    def predict_personal(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return forward(model, x)

    def global_model(self, sj: SiteJob) -> nn.Module:
        """The shared path. An unseen site re-estimates BN statistics its method keeps personal (``client.bn``)."""
        if sj.role != "unseen" or not has_personal_bn(sj.split):
            return sj.model  # a training site: its own statistics (or the shared ones)
        model = copy.deepcopy(sj.model)
        reestimate_bn(model, sj.trainer.batches("bn"))
        return model

    def predict_global(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return forward(model, x)

    def global_is_personal(self, personal: nn.Module, shared: nn.Module) -> bool:
        """True when both paths are one model with the same plain forward (FedAvg, FedProx on a training site):
        the site then evaluates it once and reports it under both names."""
        cls = type(self)
        return (personal is shared and cls.predict_personal is SiteObjective.predict_personal
                and cls.predict_global is SiteObjective.predict_global)

    # -- new sites ----------------------------------------------------------
    def adapt_unseen(self, sj: SiteJob, epochs: int) -> nn.Module | None:
        """A private model adapted to an unseen site by the method's protocol; None if it has none."""
        return None

    def predict_adapted(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.predict_personal(model, x)
