"""FLoRAL's ensemble baseline: C full models mixed by FLoRAL's router (its knobs are FLoRAL's)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from kumiki.methods.base import BN_BUFFERS
from kumiki.methods.floral import FloralConfig
from kumiki.split import SplitRules


class FloralEnsembleConfig(FloralConfig):
    """FLoRAL's ensemble baseline: C full models mixed by the same private router; copy c averaged with p(k|c)."""

    name: Literal["floral_ensemble"] = "floral_ensemble"  # type: ignore[assignment]
    variant: ClassVar[str] = "floral_ensemble"
    cluster_prefix: ClassVar[str] = "copies"

    def model_options(self) -> dict[str, Any]:
        return {"num_copies": self.num_adaptors, "sigma": self.router_noise, "tau": self.router_temp}

    def split_rules(self) -> SplitRules:
        bn = BN_BUFFERS if self.bn_stats == "personal" else ()
        return SplitRules(shared=("copies.*",), personal=("router.*",) + bn)
