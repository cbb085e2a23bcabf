"""FedRep's config: head epochs, then body epochs, per round."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kumiki.methods.base import ALL, MethodConfig
from kumiki.split import SplitRules


class FedRepConfig(MethodConfig):
    """FedRep (Collins et al., ICML 2021): ``head_epochs`` of head updates, then ``body_epochs`` of body updates.

    Defaults tau_h = 5, tau_phi = 1 (baselines spec, small CPU). The head stage keeps the
    body in eval mode, so the shared body (BN statistics included) is bit-identical after it.
    Unseen sites: a fresh head on the frozen body, as FedPer's.
    """

    name: Literal["fedrep"] = "fedrep"
    head_epochs: int = Field(5, ge=1, description="tau_h: head epochs with the body frozen")
    body_epochs: int = Field(1, ge=1, description="tau_phi: body epochs with the new head frozen")

    def epochs_per_round(self, train) -> int:
        return self.head_epochs + self.body_epochs

    def split_rules(self) -> SplitRules:
        return SplitRules(shared=ALL, personal=("head.*",))
