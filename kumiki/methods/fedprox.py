"""FedProx's config: FedAvg's strategy with a proximal term on the sites (``client/methods/fedprox.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kumiki.methods.base import MethodConfig


class FedProxConfig(MethodConfig):
    """FedProx (Li et al., 2020): FedAvg plus a proximal term on the sites."""

    name: Literal["fedprox"] = "fedprox"
    mu: float = Field(0.01, ge=0.0, description="proximal weight mu in (mu/2)||w - w_t||^2")
