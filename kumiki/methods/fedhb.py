"""FedHB's config (spec ``fedhb.md``): the hierarchical Bayesian prior's knobs."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from kumiki.methods.base import ALL, BN_BUFFERS, MethodConfig
from kumiki.split import SplitRules


class FedHBConfig(MethodConfig):
    """FedHB (Kim & Hospedales, 2023): a hierarchical Bayesian prior whose per-coordinate precision pulls sites.

    arXiv 2305.04979 v1; spec ``fedhb.md``; the NIW-diag instantiation.

    Knobs (spec sections 5 and 11): ``lambda0`` (1e-6), ``mu0`` (0 or ``init``), ``nu0`` (3),
    ``psi0`` (``auto`` = nu / (mu_max * n_mean), or a positive number), ``mu_max`` (1),
    ``eps`` (1e-4), ``init_precision`` (0: round 1 is unregularized), ``fixed_precision``
    (none; a number freezes every w_k: 0 is the FedAvg limit, mu' the FedProx limit),
    ``prox_update`` (implicit / explicit), ``client_init`` (global / warm),
    ``personalize_epochs`` (5: epochs of J_i from L_0 before personalized evaluation),
    ``bn_stats`` (average: plain mean outside the Bayesian update; or personal).
    """

    name: Literal["fedhb"] = "fedhb"
    train_defaults: ClassVar[dict[str, Any]] = {"local_epochs": 2}
    coordinatewise_ok: ClassVar[bool] = False  # a closed-form posterior update
    #: Key prefix of the precision arrays w the server sends under the message's ``extra``.
    precision_prefix: ClassVar[str] = "precision/"
    lambda0: float = Field(1e-6, ge=0.0, description="prior strength of mu toward mu0")
    mu0: float | Literal["init"] = Field(0.0, description="prior mean: a number, or 'init' (seeded initial weights)")
    nu0: float = Field(3.0, ge=0.0, description="prior degrees of freedom per coordinate")
    psi0: float | Literal["auto"] = Field("auto", description="prior scale; 'auto' floors the per-sample pull at mu_max")
    mu_max: float = Field(1.0, gt=0.0, description="largest per-sample proximal pull (psi0 = auto)")
    eps: float = Field(1e-4, ge=0.0, description="client posterior std (q_i = N(m_i, eps^2 I))")
    init_precision: float = Field(0.0, ge=0.0, description="w_k before the first server update")
    fixed_precision: float | None = Field(None, ge=0.0, description="freeze every w_k at this value")
    prox_update: Literal["implicit", "explicit"] = Field("implicit", description="how the prior pull is applied")
    client_init: Literal["global", "warm"] = Field("global", description="start of m_i: the global mean or the last m_i")
    personalize_epochs: int = Field(5, ge=0, description="epochs of J_i from L_0 before personalized evaluation")
    bn_stats: Literal["average", "personal"] = Field("average", description="BatchNorm running statistics")

    @property
    def eval_train_epochs(self) -> int:
        """Epochs of training each personalized evaluation does (``eval.every = "auto"`` weighs them)."""
        return self.personalize_epochs

    @model_validator(mode="after")
    def _positive_psi0(self) -> FedHBConfig:
        if self.psi0 != "auto" and not self.psi0 > 0:
            raise ValueError("method.psi0 must be 'auto' or a positive number")
        return self

    def split_rules(self) -> SplitRules:
        return SplitRules(shared=ALL, personal=BN_BUFFERS if self.bn_stats == "personal" else ())
