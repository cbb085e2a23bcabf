"""Ditto's config: the personal model's pull toward the global one."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kumiki.methods.base import MethodConfig


class DittoConfig(MethodConfig):
    """Ditto (Li et al., ICML 2021): a personal model v_k kept in site state, pulled toward the global w.

    ``lam`` (0.1): lambda in F_k(v) + (lambda/2)||v - w_t||^2; ``personal_epochs`` (none = train.local_epochs).
    """

    name: Literal["ditto"] = "ditto"
    lam: float = Field(0.1, ge=0.0, description="pull of the personal model toward the global one")
    personal_epochs: int | None = Field(None, ge=1, description="s: personal-track epochs (default: train.local_epochs)")

    def epochs_per_round(self, train) -> int:
        return (self.personal_epochs or train.local_epochs) + train.local_epochs
