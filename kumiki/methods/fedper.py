"""FedPer's config: a shared body and a personal head."""

from __future__ import annotations

from typing import Literal

from kumiki.methods.base import ALL, MethodConfig
from kumiki.split import SplitRules


class FedPerConfig(MethodConfig):
    """FedPer (Arivazhagan et al., 2019): shared body, a personal head (``head.*``).

    No shared head exists, so there is no zero-shot global path; an unseen site fits a
    fresh seeded head on the frozen body for ``eval.unseen_adapt_epochs``.
    """

    name: Literal["fedper"] = "fedper"

    def split_rules(self) -> SplitRules:
        return SplitRules(shared=ALL, personal=("head.*",))
