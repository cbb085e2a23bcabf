"""Typed knobs of every method, and the split each method declares.

A method's config model is the contract both sides share: the server builds
its strategy from it, the site rebuilds it from the message's ConfigRecord,
and both derive the same :class:`~kumiki.split.ParamSplit` from
``split_rules()``. Defaults are the papers' (see ``../shared/methods/``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from kumiki.split import SplitRules

#: Tensor-name patterns of the models in ``models/`` (plain: encoder + head).
ALL = ("*",)


class MethodConfig(BaseModel):
    """Base: subclasses add ``name: Literal[...]`` and their knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Which model layout the method needs (see ``models.build_model``).
    variant: ClassVar[str] = "plain"
    #: False for methods that never exchange tensors (local-only).
    federated: ClassVar[bool] = True

    def split_rules(self) -> SplitRules:
        return SplitRules(shared=ALL)


class FedAvgConfig(MethodConfig):
    """FedAvg (McMahan et al., 2017): the whole model is shared."""

    name: Literal["fedavg"] = "fedavg"


class FedProxConfig(MethodConfig):
    """FedProx (Li et al., 2020): FedAvg plus a proximal term on the sites."""

    name: Literal["fedprox"] = "fedprox"
    mu: float = Field(0.01, ge=0.0, description="proximal weight mu in (mu/2)||w - w_t||^2")


class FedAvgFTConfig(MethodConfig):
    """FedAvg, then each site fine-tunes a private copy before personalized evaluation."""

    name: Literal["fedavg_ft"] = "fedavg_ft"
    ft_epochs: int = Field(1, ge=0, description="local fine-tuning epochs before evaluation")
    ft_scope: Literal["all", "head"] = Field("all", description="which tensors fine-tuning updates")
    ft_lr: float | None = Field(None, gt=0.0, description="fine-tuning learning rate (default: train.lr)")


class LocalConfig(MethodConfig):
    """Local-only: each site trains alone; nothing is ever exchanged."""

    name: Literal["local"] = "local"
    federated: ClassVar[bool] = False

    def split_rules(self) -> SplitRules:
        return SplitRules(personal=ALL)
