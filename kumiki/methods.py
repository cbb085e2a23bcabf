"""Typed knobs of every method, and the split each method declares.

A method's config model is the contract both sides share: the server builds
its strategy from it, the site rebuilds it from the message's ConfigRecord,
and both derive the same :class:`~kumiki.split.ParamSplit` from
``split_rules()``. Defaults are the papers' (see ``../shared/methods/``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kumiki.split import SplitRules

#: Tensor-name patterns of the models in ``models/`` (plain: encoder + head).
ALL = ("*",)


class MethodConfig(BaseModel):
    """Base: subclasses add ``name: Literal[...]`` and their knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Which model layout the method needs (see ``models.build_model``).
    variant: ClassVar[str] = "plain"
    #: False for methods that never exchange tensors (local-only).
    federated: ClassVar[bool] = True

    def split_rules(self) -> SplitRules:
        return SplitRules(shared=ALL)


class FedAvgConfig(MethodConfig):
    """FedAvg (McMahan et al., 2017): the whole model is shared."""

    name: Literal["fedavg"] = "fedavg"


class FedProxConfig(MethodConfig):
    """FedProx (Li et al., 2020): FedAvg plus a proximal term on the sites."""

    name: Literal["fedprox"] = "fedprox"
    mu: float = Field(0.01, ge=0.0, description="proximal weight mu in (mu/2)||w - w_t||^2")


class FedAvgFTConfig(MethodConfig):
    """FedAvg, then each site fine-tunes a private copy before personalized evaluation."""

    name: Literal["fedavg_ft"] = "fedavg_ft"
    ft_epochs: int = Field(1, ge=0, description="local fine-tuning epochs before evaluation")
    ft_scope: Literal["all", "head"] = Field("all", description="which tensors fine-tuning updates")
    ft_lr: float | None = Field(None, gt=0.0, description="fine-tuning learning rate (default: train.lr)")


class LocalConfig(MethodConfig):
    """Local-only: each site trains alone; nothing is ever exchanged."""

    name: Literal["local"] = "local"
    federated: ClassVar[bool] = False

    def split_rules(self) -> SplitRules:
        return SplitRules(personal=ALL)


# ---------------------------------------------------------------- issue 3: personalization methods
#: BatchNorm buffers (running statistics and the batch counter).
BN_BUFFERS = ("*.running_mean", "*.running_var", "*.num_batches_tracked")


class DualFedConfig(MethodConfig):
    """DualFed (Zhu et al., ACM MM 2024, arXiv 2407.17754; spec ``dualfed.md``).

    Model variant ``dual``: shared ``encoder.*`` and ``shared_head.*``; personal
    ``projector.*``, ``personal_head.*`` and every BatchNorm buffer. Knobs (spec
    section 9, small-CPU column):

    * ``con_lambda`` (10): weight lambda of the supervised contrastive loss in stage A;
    * ``con_temp`` (0.2): SupCon temperature tau;
    * ``stage_epochs`` (1): epochs of stage A and, separately, of stage B per round;
    * ``weighting`` (uniform): server mean, ``uniform`` (code) or ``num_examples``;
    * ``stage_b_bn_mode`` (train): BN mode of the encoder while stage B fits the shared head;
    * ``unseen_bn`` (target_reestimate): BN statistics of the shared path on unseen sites,
      re-estimated from the site's unlabelled train data (no weight update).

    The optimizer comes from ``[train]`` (a fresh SGD per stage); the spec's values are
    lr 0.01, momentum 0.5, weight decay 0, batch 64.
    """

    name: Literal["dualfed"] = "dualfed"
    variant: ClassVar[str] = "dual"
    con_lambda: float = Field(10.0, ge=0.0, description="weight of the SupCon loss in stage A")
    con_temp: float = Field(0.2, gt=0.0, description="SupCon temperature")
    stage_epochs: int = Field(1, ge=1, description="local epochs per stage (A, then B)")
    weighting: Literal["uniform", "num_examples"] = Field("uniform", description="server mean weights")
    stage_b_bn_mode: Literal["train", "eval"] = Field("train", description="encoder BN mode in stage B")
    unseen_bn: Literal["target_reestimate"] = Field(
        "target_reestimate", description="BN statistics of the shared path on unseen sites"
    )

    def split_rules(self) -> SplitRules:
        return SplitRules(shared=("encoder.*", "shared_head.*"),
                          personal=("projector.*", "personal_head.*") + BN_BUFFERS)


class FedHBConfig(MethodConfig):
    """FedHB (Kim & Hospedales, arXiv 2305.04979 v1; spec ``fedhb.md``), NIW-diag instantiation.

    Knobs (spec sections 5 and 11): ``lambda0`` (1e-6), ``mu0`` (0 or ``init``), ``nu0`` (3),
    ``psi0`` (``auto`` = nu / (mu_max * n_mean), or a positive number), ``mu_max`` (1),
    ``eps`` (1e-4), ``init_precision`` (0: round 1 is unregularized), ``fixed_precision``
    (none; a number freezes every w_k: 0 is the FedAvg limit, mu' the FedProx limit),
    ``prox_update`` (implicit / explicit), ``client_init`` (global / warm),
    ``personalize_epochs`` (5: epochs of J_i from L_0 before personalized evaluation),
    ``bn_stats`` (average: plain mean outside the Bayesian update; or personal).
    """

    name: Literal["fedhb"] = "fedhb"
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

    @model_validator(mode="after")
    def _positive_psi0(self) -> FedHBConfig:
        if self.psi0 != "auto" and not self.psi0 > 0:
            raise ValueError("method.psi0 must be 'auto' or a positive number")
        return self

    def split_rules(self) -> SplitRules:
        return SplitRules(shared=ALL, personal=BN_BUFFERS if self.bn_stats == "personal" else ())


class FedPerConfig(MethodConfig):
    """FedPer (Arivazhagan et al., 2019): shared body, personal ``head.*``.

    ``new_head_epochs`` (5): the global/unseen path fits a fresh seeded head on the frozen body.
    """

    name: Literal["fedper"] = "fedper"
    new_head_epochs: int = Field(5, ge=0, description="epochs of a fresh head on the frozen body (global path)")

    def split_rules(self) -> SplitRules:
        return SplitRules(shared=ALL, personal=("head.*",))


class FedRepConfig(MethodConfig):
    """FedRep (Collins et al., ICML 2021): ``head_epochs`` of head updates, then ``body_epochs`` of body updates.

    Defaults tau_h = 5, tau_phi = 1 (baselines spec, small CPU); ``new_head_epochs`` as FedPer's.
    """

    name: Literal["fedrep"] = "fedrep"
    head_epochs: int = Field(5, ge=1, description="tau_h: head epochs with the body frozen")
    body_epochs: int = Field(1, ge=1, description="tau_phi: body epochs with the new head frozen")
    new_head_epochs: int = Field(5, ge=0, description="epochs of a fresh head on the frozen body (global path)")

    def split_rules(self) -> SplitRules:
        return SplitRules(shared=ALL, personal=("head.*",))


class DittoConfig(MethodConfig):
    """Ditto (Li et al., ICML 2021): a personal model v_k kept in site state, pulled toward the global w.

    ``lam`` (0.1): lambda in F_k(v) + (lambda/2)||v - w_t||^2; ``personal_epochs`` (none = train.local_epochs).
    """

    name: Literal["ditto"] = "ditto"
    lam: float = Field(0.1, ge=0.0, description="pull of the personal model toward the global one")
    personal_epochs: int | None = Field(None, ge=1, description="s: personal-track epochs (default: train.local_epochs)")
