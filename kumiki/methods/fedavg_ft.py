"""FedAvg+FT's config: FedAvg, then a private fine-tuned copy on each site before personalized evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kumiki.methods.base import MethodConfig


class FedAvgFTConfig(MethodConfig):
    """FedAvg, then each site fine-tunes a private copy before personalized evaluation."""

    name: Literal["fedavg_ft"] = "fedavg_ft"
    ft_epochs: int = Field(1, ge=0, description="local fine-tuning epochs before evaluation")
    ft_scope: Literal["all", "head"] = Field("all", description="which tensors fine-tuning updates")
    ft_lr: float = Field(0.01, gt=0.0, description="fine-tuning learning rate (train.lr 0.05 overshoots on BN CNNs)")

    @property
    def eval_train_epochs(self) -> int:
        """Epochs of training each personalized evaluation does (``eval.every = "auto"`` weighs them)."""
        return self.ft_epochs
