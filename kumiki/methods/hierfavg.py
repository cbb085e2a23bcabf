"""HierFAVG's config: WorldLM's hierarchical baseline (whole-model FedAvg per level)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from kumiki.methods.base import ALL, MethodConfig
from kumiki.methods.worldlm import WorldLMConfig
from kumiki.split import SplitRules


class HierFAVGConfig(MethodConfig):
    """HierFAVG (Liu et al., ICC 2020): whole-model FedAvg in each sub-federation every round, then across
    sub-federations every ``kappa2`` rounds. No personalization; WorldLM's hierarchical baseline.

    Local training is WorldLM's (tau AdamW steps), so both methods spend the same token budget.
    """

    name: Literal["hierfavg"] = "hierfavg"
    tasks_supported: ClassVar[tuple[str, ...] | None] = None
    hierarchical: ClassVar[bool] = True
    coordinatewise_ok: ClassVar[bool] = False
    tree_policy: ClassVar[tuple[str, ...]] = ("fraction_train", "dp")
    train_defaults: ClassVar[dict[str, Any]] = WorldLMConfig.train_defaults
    local_steps: int | None = Field(50, ge=1, le=100_000, description="kappa1: local steps per round (none: "
                                                                      "train.local_epochs epochs)")
    kappa2: int = Field(2, ge=1, le=100_000, description="rounds between two averagings across sub-federations")

    def split_rules(self) -> SplitRules:
        return SplitRules(shared=ALL)
