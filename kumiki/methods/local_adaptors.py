"""FLoRAL's local-adaptor baseline: a federated base, one private adaptor set per site."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kumiki.methods.base import BN_BUFFERS
from kumiki.methods.floral import FloralConfig
from kumiki.split import SplitRules


class LocalAdaptorsConfig(FloralConfig):
    """FLoRAL's local-adaptor baseline: the base is federated (FedAvg), one adaptor set per site never travels."""

    name: Literal["local_adaptors"] = "local_adaptors"  # type: ignore[assignment]
    num_adaptors: int = Field(1, ge=1, le=1, description="one private adaptor set")
    #: The official baseline is FLoRAL(1%) (``floral_locallora.yaml`` inherits ``floral.yaml``'s rank 0.01).
    rank_budget: float = Field(0.01, gt=0.0, description="rho < 1: rank = max(1, rho d_in d_out / (d_in + d_out)) "
                                                          "per layer; >= 1: that rank everywhere (0.01 = FLoRAL(1%))")
    #: Ours: at train.lr (0.05) the preconditioned steps of a fresh private adaptor set overshoot on CNN-S
    #: (pilot, seed 0: personalized 69.6, first-round loss 3.17); at 0.01, 83.1 (FedAvg 74.6).
    adaptor_lr: float | None = Field(0.01, gt=0.0, description="adaptor learning rate (none = train.lr)")

    def split_rules(self) -> SplitRules:
        bn = BN_BUFFERS if self.bn_stats == "personal" else ()
        return SplitRules(shared=("base.*",), personal=("router.*", "adaptors.*") + bn)
