"""SiteObjective: what a method does on a site, plugged into the one loop.

Defaults are FedAvg's: train every parameter on cross-entropy, predict with the
whole model. A method overrides only what differs (its loss, its stages, its
personalized or global prediction path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from client.loop import LossFn, Trainer, cross_entropy, forward
from client.state import SiteState
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


class SiteObjective:
    #: False where the method has no shared-only prediction path (global metrics are then null).
    has_global = True

    def __init__(self, cfg: Any):
        self.cfg = cfg

    # -- training ---------------------------------------------------------
    def loss(self, sj: SiteJob) -> LossFn:
        return cross_entropy

    def fit(self, sj: SiteJob) -> dict[str, float]:
        return sj.trainer.fit(sj.model, sj.model.parameters(), self.loss(sj), tag=f"r{sj.job.round}")

    # -- evaluation -------------------------------------------------------
    def personalized_model(self, sj: SiteJob) -> nn.Module:
        """The model this site deploys (FedAvg-FT returns a fine-tuned private copy)."""
        return sj.model

    def predict_personal(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return forward(model, x)

    def global_model(self, sj: SiteJob) -> nn.Module:
        return sj.model

    def predict_global(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return forward(model, x)
