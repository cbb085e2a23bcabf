"""Local-only's config: every tensor is personal, nothing travels."""

from __future__ import annotations

from typing import ClassVar, Literal

from kumiki.methods.base import ALL, MethodConfig
from kumiki.split import SplitRules


class LocalConfig(MethodConfig):
    """Local-only: each site trains alone; nothing is ever exchanged."""

    name: Literal["local"] = "local"
    federated: ClassVar[bool] = False

    def split_rules(self) -> SplitRules:
        return SplitRules(personal=ALL)
