"""FedAvg's config: the whole model is shared; no knobs (the strategy is ``strategies/fedavg.py``)."""

from __future__ import annotations

from typing import Literal

from kumiki.methods.base import MethodConfig


class FedAvgConfig(MethodConfig):
    """FedAvg (McMahan et al., 2017): the whole model is shared."""

    name: Literal["fedavg"] = "fedavg"
