"""Typed knobs of every method, and the split each method declares.

A method's config model is the contract both sides share: the server builds
its strategy from it, the site rebuilds it from the message's ConfigRecord,
and both derive the same :class:`~kumiki.split.ParamSplit` from
``split_rules()``. Defaults are the papers' (see ``../shared/methods/``).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kumiki.split import EVERY_GROUP, SplitRules

#: Tensor-name patterns of the models in ``models/`` (plain: encoder + head).
ALL = ("*",)


class MethodConfig(BaseModel):
    """Base: subclasses add ``name: Literal[...]`` and their knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    #: Which model layout the method needs (see ``models.build_model``).
    variant: ClassVar[str] = "plain"
    #: False for methods that never exchange tensors (local-only).
    federated: ClassVar[bool] = True
    #: The paper's local optimizer: fills every ``[train]`` key the operator did not set.
    train_defaults: ClassVar[dict[str, Any]] = {}
    #: False where the server update is not a (weighted) mean, so a trimmed mean or median cannot replace it.
    coordinatewise_ok: ClassVar[bool] = True
    #: The tasks (``kumiki/tasks.py``) the method can train; None: any task its model variant has an output for.
    tasks_supported: ClassVar[tuple[str, ...] | None] = None
    #: False where an evaluate message carries more than a training message (``eval.in_train_reply`` is then off)
    eval_in_train_reply: ClassVar[bool] = True
    #: True for methods that run the federation tree's levels (``kumiki/hierarchy.py``; WorldLM, HierFAVG).
    hierarchical: ClassVar[bool] = False
    #: The ``[federation]`` policy keys the method honours (``root_rounds``, a group's ``rounds``, ``dp``...).
    tree_policy: ClassVar[tuple[str, ...]] = ()

    def resolve(self, cfg) -> MethodConfig:
        """This config with what depends on the rest of the run filled in (default: itself)."""
        return self

    def split_rules(self) -> SplitRules:
        return SplitRules(shared=ALL)

    def model_options(self) -> dict[str, Any]:
        """Keyword arguments of the method's model variant (``models.build_model``)."""
        return {}

    def epochs_per_round(self, train) -> int:
        """Passes over the site's training data in one round (a DP site plans its noise with it)."""
        return train.local_epochs

    def site_tasks(self, sites: int) -> list[str] | None:
        """The task of each of ``sites`` materialized sites where the method assigns them (M-Fed), else None:
        every site then learns its dataset's task."""
        return None

    def site_groups(self, sites: int) -> list[str] | None:
        """The group of each of ``sites`` materialized sites (their site.json ``group``) where the method assigns
        them (M-Fed's task groups), else None."""
        return None

    def site_group(self, task: str, group: str) -> str:
        """A site's group, given its task and the group its node config or site.json names ("" if none)."""
        return group

    def check_run(self, cfg) -> None:
        """Combination checks of this method against the whole config (``KumikiConfig``); raise ValueError."""


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
    ft_lr: float = Field(0.01, gt=0.0, description="fine-tuning learning rate (train.lr 0.05 overshoots on BN CNNs)")


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
    """DualFed (Zhu et al., ACM MM 2024): shared encoder and head; a personal projector and head, two stages.

    arXiv 2407.17754; spec ``dualfed.md``.

    Model variant ``dual``: shared ``encoder.*`` and ``shared_head.*``; personal
    ``projector.*``, ``personal_head.*`` and every BatchNorm buffer. Knobs (spec
    section 9, small-CPU column):

    * ``con_lambda`` (auto): weight lambda of the supervised contrastive loss in stage A. ``auto`` is
      the spec's small-CPU 10, except with a GroupNorm encoder, where lambda = 10 stalls learning
      (digits, CNN-S: personalized 53% after 15 rounds) and 1 learns (91%);
    * ``con_temp`` (0.2): SupCon temperature tau;
    * ``stage_epochs`` (1): epochs of stage A per round;
    * ``stage_b_epochs`` (5, ours; the spec uses stage_epochs): epochs of stage B. With one epoch the
      shared head, a linear probe re-fitted from the average each round on a drifting encoder, stays
      underfitted at 10-15 rounds: global 40% on digits with CNN-S against 91% with five;
    * ``weighting`` (uniform): server mean, ``uniform`` (code) or ``num_examples``;
    * ``stage_b_bn_mode`` (train): BN mode of the encoder while stage B fits the shared head;
    * ``unseen_bn`` (target_reestimate): BN statistics of the shared path on unseen sites,
      re-estimated from the site's unlabelled train data (no weight update).

    A fresh SGD per stage; ``train_defaults`` brings the spec's lr 0.01, momentum 0.5, batch 64
    (with ``[train]``'s lr 0.05 the SupCon term, weighted 10, diverges on BN CNNs).
    """

    name: Literal["dualfed"] = "dualfed"
    variant: ClassVar[str] = "dual"
    tasks_supported: ClassVar[tuple[str, ...] | None] = ("classification",)  # SupCon needs class labels
    train_defaults: ClassVar[dict[str, Any]] = {"lr": 0.01, "momentum": 0.5, "batch_size": 64}
    con_lambda: float | Literal["auto"] = Field(
        "auto", description="weight of SupCon in stage A; auto = 10, or 1 with model.norm = group")
    con_temp: float = Field(0.2, gt=0.0, description="SupCon temperature")
    stage_epochs: int = Field(1, ge=1, description="local epochs per stage (A, then B)")
    stage_b_epochs: int = Field(
        5, ge=1, description="epochs of stage B (ours: the spec's 1 leaves the shared head underfitted at 10-15 rounds)")
    weighting: Literal["uniform", "num_examples"] = Field("uniform", description="server mean weights")
    stage_b_bn_mode: Literal["train", "eval"] = Field("train", description="encoder BN mode in stage B")
    unseen_bn: Literal["target_reestimate"] = Field(
        "target_reestimate", description="BN statistics of the shared path on unseen sites"
    )

    @model_validator(mode="after")
    def _lambda(self) -> DualFedConfig:
        if self.con_lambda != "auto" and not self.con_lambda >= 0:
            raise ValueError("method.con_lambda must be 'auto' or a number >= 0")
        return self

    def epochs_per_round(self, train) -> int:
        return self.stage_epochs + self.stage_b_epochs

    def supcon_weight(self, norm: str) -> float:
        """lambda for an encoder with this normalization (``con_lambda = auto`` depends on it)."""
        if self.con_lambda == "auto":
            return 1.0 if norm == "group" else 10.0
        return float(self.con_lambda)

    def split_rules(self) -> SplitRules:
        return SplitRules(shared=("encoder.*", "shared_head.*"),
                          personal=("projector.*", "personal_head.*") + BN_BUFFERS)


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

    @model_validator(mode="after")
    def _positive_psi0(self) -> FedHBConfig:
        if self.psi0 != "auto" and not self.psi0 > 0:
            raise ValueError("method.psi0 must be 'auto' or a positive number")
        return self

    def split_rules(self) -> SplitRules:
        return SplitRules(shared=ALL, personal=BN_BUFFERS if self.bn_stats == "personal" else ())


class FedPerConfig(MethodConfig):
    """FedPer (Arivazhagan et al., 2019): shared body, a personal head (``head.*``).

    No shared head exists, so there is no zero-shot global path; an unseen site fits a
    fresh seeded head on the frozen body for ``eval.unseen_adapt_epochs``.
    """

    name: Literal["fedper"] = "fedper"

    def split_rules(self) -> SplitRules:
        return SplitRules(shared=ALL, personal=("head.*",))


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


class DittoConfig(MethodConfig):
    """Ditto (Li et al., ICML 2021): a personal model v_k kept in site state, pulled toward the global w.

    ``lam`` (0.1): lambda in F_k(v) + (lambda/2)||v - w_t||^2; ``personal_epochs`` (none = train.local_epochs).
    """

    name: Literal["ditto"] = "ditto"
    lam: float = Field(0.1, ge=0.0, description="pull of the personal model toward the global one")
    personal_epochs: int | None = Field(None, ge=1, description="s: personal-track epochs (default: train.local_epochs)")

    def epochs_per_round(self, train) -> int:
        return (self.personal_epochs or train.local_epochs) + train.local_epochs


# ---------------------------------------------------------------- issue 8: FLoRAL and its baselines
class FloralConfig(MethodConfig):
    """FLoRAL (Almansoori et al., CPAL 2025): a shared base plus C shared low-rank adaptors, mixed by a private router.

    arXiv 2410.03497; spec ``floral.md``. Every adapted layer computes
    Base(x) + alpha * sum_c max(pi_c, min_prob) (B_c A_c x + b_c), pi = softmax(router); the server
    averages the base with p(k) and adaptor c's factors A_c, B_c, b_c separately with p(k|c).

    Two defaults are ours, for runs of tens of rounds: ``rank_budget`` 0.1 (the paper's FLoRAL(10%);
    the code's default is 1%) and ``router_lr`` 0.3 (the paper's scarce-data value; 0.1 otherwise).
    The router needs SGD steps to separate the clusters: on digits, default CNN, 2 label-shift clusters,
    100 examples per site (3 steps a round), 15 rounds, it does not at one local epoch (48.8% vs FedAvg's
    45.6% at 8 sites) and does at three (73.8%); at 4 clusters it does not in 15 rounds (``bench/floral.py
    --quick``, bench/RESULTS.md; docs/floral.md).
    """

    name: Literal["floral"] = "floral"
    variant: ClassVar[str] = "floral"
    train_defaults: ClassVar[dict[str, Any]] = {"momentum": 0.0, "weight_decay": 0.0}
    coordinatewise_ok: ClassVar[bool] = False  # adaptor c is a p(k|c)-weighted mean, not one mean over sites
    #: Tensors whose aggregation weight is p(k|c): ``<prefix>.<c>.``.
    cluster_prefix: ClassVar[str] = "adaptors"

    num_adaptors: int = Field(4, ge=1, le=64, description="C: adaptor sets (the number of site clusters you expect)")
    rank_budget: float = Field(0.1, gt=0.0, description="rho < 1: rank = max(1, rho d_in d_out / (d_in + d_out)) "
                                                         "per layer; >= 1: that rank everywhere (0.1 = FLoRAL(10%))")
    layers: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                              description="fnmatch patterns of the Linear/Conv2d layers to adapt (model names)")
    router_lr: float = Field(0.3, gt=0.0, description="router learning rate (the paper's 5%-data value; 0.1 with "
                                                       "full data and hundreds of rounds)")
    adaptor_lr: float | None = Field(None, gt=0.0, description="adaptor learning rate (none = train.lr)")
    router_noise: float = Field(1.0, ge=0.0, description="sigma: U[0,1) noise on the router logits in training")
    router_temp: float = Field(1.0, gt=0.0, description="tau: softmax temperature of the router")
    min_prob: float = Field(0.01, ge=0.0, lt=1.0, description="clamp of each mixture weight (not renormalized)")
    alpha: float = Field(1.0, gt=0.0, description="scale of the adaptor sum")
    precondition: bool = Field(True, description="precondition adaptor gradients (the paper's PrecondLoRA)")
    precond_eps: float = Field(1e-5, gt=0.0, description="eps of the preconditioner")
    adaptor_bias: bool = Field(True, description="an output bias b_c per adaptor where the base layer has one")
    adaptor_bias_init: Literal["torch_default", "zero"] = Field("torch_default", description="b_c's initialization")
    conv_dims: Literal["kernel", "code"] = Field("kernel", description="conv adaptor d_in, d_out (rank rule, A's "
                                                 "init): C * k ('kernel') or the official code's C * 2 ('code')")
    absent_cluster: Literal["keep", "code"] = Field(
        "keep", description="adaptor c when no site this round weighs it (p(c) < 1e-6): keep it, or average it "
                            "with p(k|c) anyway, as the official code does ('code')")
    bn_stats: Literal["federated", "personal"] = Field("federated", description="BatchNorm statistics: averaged "
                                                                               "with p(k), or kept on the site")
    unseen_router_steps: int = Field(50, ge=0, description="router-only SGD steps a new site takes before its "
                                                           "adapted evaluation (0: uniform mixture only)")

    def model_options(self) -> dict[str, Any]:
        return {"num_adaptors": self.num_adaptors, "budget": self.rank_budget, "layers": tuple(self.layers),
                "alpha": self.alpha, "min_prob": self.min_prob, "sigma": self.router_noise, "tau": self.router_temp,
                "bias": self.adaptor_bias, "bias_init": self.adaptor_bias_init, "conv_dims": self.conv_dims}

    def split_rules(self) -> SplitRules:
        bn = BN_BUFFERS if self.bn_stats == "personal" else ()
        return SplitRules(shared=("base.*", f"{self.cluster_prefix}.*"), personal=("router.*",) + bn)


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


class LocalAdaptorsConfig(FloralConfig):
    """FLoRAL's local-adaptor baseline: the base is federated (FedAvg), one adaptor set per site never travels."""

    name: Literal["local_adaptors"] = "local_adaptors"  # type: ignore[assignment]
    num_adaptors: int = Field(1, ge=1, le=1, description="one private adaptor set")
    #: The official baseline is FLoRAL(1%) (``floral_locallora.yaml`` inherits ``floral.yaml``'s rank 0.01).
    rank_budget: float = Field(0.01, gt=0.0, description="rho < 1: rank = max(1, rho d_in d_out / (d_in + d_out)) "
                                                          "per layer; >= 1: that rank everywhere (0.01 = FLoRAL(1%))")
    #: Ours: at train.lr (0.05) the preconditioned steps of a fresh private adaptor set overshoot on CNN-S
    #: (pilot, seed 0: personalized 69.6, first-round loss 3.17); at 0.01, 83.1 (FedAvg 74.6).
    adaptor_lr: float | None = Field(0.01, gt=0.0, description="adaptor learning rate (none = train.lr)")

    def split_rules(self) -> SplitRules:
        bn = BN_BUFFERS if self.bn_stats == "personal" else ()
        return SplitRules(shared=("base.*",), personal=("router.*", "adaptors.*") + bn)


# ---------------------------------------------------------------- issue 10: WorldLM and its hierarchical baseline
class WorldLMConfig(MethodConfig):
    """WorldLM (Iacob et al., 2024): federations of federations; a shared backbone, personalized key layers.

    arXiv 2405.14446; spec ``worldlm.md`` (a reconstruction: its defaults, its open choices as knobs). The tree
    comes from ``[federation]`` (``kumiki/hierarchy.py``). The backbone B is averaged across the tree (FedAvg
    outer step, or FedAdam: ours); the key layers K are personalized per sub-federation by attention over the
    groups' layer embeddings plus the siblings' residual layer embeddings; levels train top-down in sequence
    (root phase, then every sub-federation's own phase). Language only.

    ``local_steps`` is tau (50; none: ``train.local_epochs`` passes over the site's data, the budget every
    other method trains on). ``train_defaults`` brings the spec's AdamW lr 1e-3, betas (0.9, 0.95), clip 1.0,
    batch 16.
    """

    name: Literal["worldlm"] = "worldlm"
    tasks_supported: ClassVar[tuple[str, ...] | None] = ("language",)
    coordinatewise_ok: ClassVar[bool] = False  # attention-weighted key layers, an outer optimizer on the backbone
    hierarchical: ClassVar[bool] = True
    #: its evaluate message carries the node summary Kbar and the model the phase deploys (not a training payload)
    eval_in_train_reply: ClassVar[bool] = False
    tree_policy: ClassVar[tuple[str, ...]] = ("root_rounds", "rounds", "key_layers", "fraction_train", "dp",
                                              "share_residuals")
    train_defaults: ClassVar[dict[str, Any]] = {"optimizer": "adamw", "lr": 1e-3, "betas": [0.9, 0.95],
                                                "grad_clip": 1.0, "batch_size": 16, "weight_decay": 0.0}
    #: prefix of the key-layer summary arrays (Kbar) an evaluation message carries under ``extra``
    kbar_prefix: ClassVar[str] = "kbar/"

    local_steps: int | None = Field(50, ge=1, le=100_000, description="tau: local AdamW steps per round (none: "
                                                                      "train.local_epochs epochs)")
    key_layers: list[str] | Literal["auto"] = Field(
        "auto", description="tensor-name patterns of the key layers K; auto = the last max(1, round(0.3 L)) blocks, "
                            "the final norm and the head")
    temperature: float = Field(0.1, gt=0.0, description="T of the attention softmax over groups")
    attn_on: Literal["delta", "params"] = Field("delta", description="embed each group's change from the common "
                                                                     "reference (delta) or its raw parameters")
    similarity: Literal["cosine", "neg_l2", "dot_scaled"] = Field("cosine", description="similarity of embeddings")
    attn_granularity: Literal["layer", "all"] = Field("layer", description="one weight set per key layer (module), "
                                                                           "or one over all of K")
    embed_dim: int = Field(512, ge=8, le=65536, description="layer embeddings: seeded sketch to this size for "
                                                            "larger layers")
    use_residuals: bool = Field(True, description="residual layer embeddings of sibling federations join the "
                                                  "attention")
    residual_refresh: Literal["per_round", "phase_start"] = Field(
        "per_round", description="residuals recomputed after every round, or frozen at the phase start")
    outer_optimizer: Literal["fedavg", "fedadam"] = Field("fedavg", description="backbone step: fedavg (B + lr * "
                                                                                "Delta) or fedadam (ours)")
    server_lr: float = Field(1.0, gt=0.0, description="fedavg: server learning rate on Delta")
    adam_lr: float = Field(1e-2, gt=0.0, description="fedadam: eta")
    adam_betas: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        default_factory=lambda: [0.9, 0.99], min_length=2, max_length=2, description="fedadam: beta1, beta2")
    adam_tau: float = Field(1e-3, gt=0.0, description="fedadam: tau (adaptivity)")

    def resolve(self, cfg) -> WorldLMConfig:
        if self.key_layers != "auto":
            return self
        from models.lm import default_key_layers

        return self.model_copy(update={"key_layers": default_key_layers(cfg.model.blocks)})

    def keys(self) -> tuple[str, ...]:
        return tuple(self.key_layers) if self.key_layers != "auto" else ()

    def split_rules(self) -> SplitRules:
        """K is group-level, one copy per group (``EVERY_GROUP``); the backbone is shared; nothing is personal."""
        return SplitRules(shared=ALL, groups={EVERY_GROUP: self.keys()} if self.keys() else {})


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


# ---------------------------------------------------------------- issue 9: M-Fed
#: M-Fed's tasks, their decoder architectures (the first is the task's default; ``models/mfed.py``)
MFED_DECODERS: dict[str, tuple[str, ...]] = {
    "classification": ("mlp", "linear"),
    "segmentation": ("convt", "upsample"),
    "edges": ("upsample", "convt"),
    "denoising": ("convt", "upsample"),
}
#: encoder BatchNorm buffers (decoder buffers belong to their task group)
ENCODER_BN = tuple(f"encoder.{p}" for p in BN_BUFFERS)


def mfed_slot(entry: str) -> tuple[str, str]:
    """``"segmentation"`` or ``"segmentation/upsample"`` -> (task, decoder architecture), the default filled in."""
    task, _, kind = entry.partition("/")
    if task not in MFED_DECODERS:
        raise ValueError(f"unknown M-Fed task {task!r} in {entry!r}; tasks: {', '.join(MFED_DECODERS)}")
    kinds = MFED_DECODERS[task]
    kind = kind or kinds[0]
    if kind not in kinds:
        raise ValueError(f"{task} has no decoder {kind!r} in {entry!r}; choose {' or '.join(kinds)}")
    return task, kind


def mfed_group(task: str, kind: str) -> str:
    """The ParamSplit group of a (task, decoder): ``task:<task>``, or ``task:<task>/<decoder>`` for a non-default
    decoder (sites of one task with different decoders are separate groups: their tensors differ)."""
    return f"task:{task}" if kind == MFED_DECODERS[task][0] else f"task:{task}/{kind}"


def mfed_key(task: str, kind: str) -> str:
    """The decoder's module name in the model (``decoders.<key>.*``)."""
    return task if kind == MFED_DECODERS[task][0] else f"{task}_{kind}"


def mfed_parse_group(group: str) -> tuple[str, str]:
    """Inverse of :func:`mfed_group` (ValueError for anything else)."""
    if not group.startswith("task:"):
        raise ValueError(f"group {group!r} is not an M-Fed task group (task:<task> or task:<task>/<decoder>)")
    task, kind = mfed_slot(group[len("task:"):])
    if mfed_group(task, kind) != group:
        raise ValueError(f"group {group!r}: write the default decoder's group as {mfed_group(task, kind)!r}")
    return task, kind


class MFedConfig(MethodConfig):
    """M-Fed (Zhou et al., arXiv 2504.09800, 2025): one encoder shared across tasks, per-task decoders pulled toward
    their task's global decoder.

    Spec ``mfed.md`` (a reconstruction from the abstract: its defaults, its open choices as knobs). Sites
    learn different tasks (classification, segmentation, edges, denoising) with different decoders; the
    encoder ``encoder.*`` is averaged over all sites, each decoder ``decoders.<key>.*`` only over its task
    group's sites (group ``task:<task>``, or ``task:<task>/<decoder>`` for a non-default decoder). Each site
    keeps its own local decoder d_k across rounds and trains it with the task loss plus
    (mu/2)||d_k - D_bar_t||^2 toward its task's global decoder (``decoder_reg = prox``).

    Task assignment: ``tasks`` entries (``"segmentation"`` or ``"segmentation/upsample"``) go round-robin
    over the sites (training sites first, then unseen ones: site i gets entry i mod len); ``sites`` lists
    one entry per site instead. A deployed site names its group in its site.json or node config
    (``group``); without one it joins its task's default decoder group.
    """

    name: Literal["mfed"] = "mfed"
    variant: ClassVar[str] = "mfed"
    tasks_supported: ClassVar[tuple[str, ...] | None] = tuple(MFED_DECODERS)
    #: the spec's optimizer (section 9): Adam, lr 1e-3, weight decay 0, fresh every round; batch 32 ([train]'s),
    #: not the spec's 64, which leaves a site of 61 examples one step per round (digits, 15 rounds, CNN-S:
    #: segmentation mIoU 83.0 vs 85.5 and classification 99.1 vs 99.4 with 32; MLP: 61.9 vs 79.7, 91.6 vs 95.1)
    train_defaults: ClassVar[dict[str, Any]] = {"optimizer": "adam", "lr": 1e-3}

    tasks: list[str] = Field(default_factory=lambda: ["classification", "segmentation"], min_length=1,
                             description="task[/decoder] entries assigned round-robin to the sites")
    sites: list[str] | None = Field(None, min_length=1, description="one task[/decoder] entry per site (training "
                                                                     "sites first, then unseen); overrides tasks")
    decoder_reg: Literal["prox", "output", "consistency", "none"] = Field(
        "prox", description="the local decoder's pull toward the global one: prox (mu/2)||d - D||^2, output "
                            "gamma l(D(E(x)), y), consistency gamma Div(d(E(x)), D(E(x))), or none")
    mu: float = Field(0.1, ge=0.0, description="weight of the prox term")
    gamma: float = Field(0.5, ge=0.0, description="weight of the output and consistency terms")
    mu_schedule: Literal["constant", "linear_ramp"] = Field(
        "constant", description="the term's weight: constant, or growing linearly to its value over mu_ramp_rounds")
    mu_ramp_rounds: int = Field(10, ge=1, description="rounds of linear_ramp")
    decoder_init: Literal["keep_local", "from_global"] = Field(
        "keep_local", description="each round's decoder start: the site's own d_k, or the global D_bar_t")
    encoder_weighting: Literal["num_examples", "task_balanced"] = Field(
        "num_examples", description="encoder mean over sites: by examples, or each task's mean weighted equally")
    encoder_scope: Literal["all", "task", "none"] = Field(
        "all", description="who shares an encoder: all sites, each task's sites (per-task FedAvg), or none (local)")
    encoder_bn_stats: Literal["shared", "personal"] = Field(
        "shared", description="the encoder's BatchNorm statistics: averaged with it, or kept on each site")
    edge_tolerance_px: int = Field(1, ge=0, le=5, description="edges F-score: a pixel within this distance counts")
    edge_balance: Literal["batch", "example"] = Field(
        "batch", description="edges loss: edge pixels weigh #non-edge/#edge of the batch, or of each example "
                             "(needed with privacy.enabled)")

    @model_validator(mode="after")
    def _entries(self) -> MFedConfig:
        for e in [*self.tasks, *(self.sites or [])]:
            mfed_slot(e)
        return self

    def assignment(self, sites: int) -> list[tuple[str, str]]:
        """(task, decoder) of each of ``sites`` sites."""
        entries = self.sites if self.sites is not None else [self.tasks[i % len(self.tasks)] for i in range(sites)]
        return [mfed_slot(e) for e in entries[:sites]]

    def slots(self) -> list[tuple[str, str]]:
        """Every (task, decoder) of the federation, in a fixed order (the model's decoders)."""
        return sorted({mfed_slot(e) for e in (self.sites if self.sites is not None else self.tasks)})

    def site_tasks(self, sites: int) -> list[str] | None:
        return [t for t, _ in self.assignment(sites)]

    def site_groups(self, sites: int) -> list[str] | None:
        return [mfed_group(t, k) for t, k in self.assignment(sites)]

    def site_group(self, task: str, group: str) -> str:
        return group or (mfed_group(task, MFED_DECODERS[task][0]) if task in MFED_DECODERS else group)

    def check_run(self, cfg) -> None:
        train, unseen = cfg.data.sites, cfg.data.unseen_sites
        if self.sites is not None and len(self.sites) != train + unseen:
            raise ValueError(f"method.sites lists {len(self.sites)} sites, but data.sites + data.unseen_sites = "
                             f"{train + unseen}; give one task[/decoder] entry per site, training sites first")
        slots = self.assignment(train + unseen)
        taught = set(slots[:train])
        idle = sorted(set(self.slots()) - taught) if cfg.data.dataset != "site-folders" else []
        if idle:
            key = "method.sites" if self.sites is not None else "method.tasks"
            raise ValueError(f"{key}: {', '.join(mfed_group(*s) for s in idle)} would have no training site with "
                             f"data.sites = {train}; every task and decoder needs one (more training sites, or "
                             "fewer entries)")
        lost = sorted(set(slots[train:]) - taught)
        if lost and cfg.data.dataset != "site-folders":
            raise ValueError(f"method.sites: unseen sites of {', '.join(mfed_group(*s) for s in lost)} have no "
                             "training site of their task and decoder to learn it from")
        if cfg.privacy.enabled and self.edge_balance == "batch" and any(t == "edges" for t, _ in self.slots()):
            raise ValueError("privacy.enabled: the edges loss weighs pixels by the batch's edge share, which couples "
                             "the examples of a batch; set method.edge_balance = \"example\"")
        if self.encoder_scope == "task" and (cfg.privacy.central or cfg.server.aggregation == "norm_bound"):
            raise ValueError("method.encoder_scope = \"task\" keeps one encoder per task, which privacy.central and "
                             "server.aggregation = \"norm_bound\" do not handle; use encoder_scope = \"all\"")
        shape = cfg.data.input_shape
        if shape is not None and any(t != "classification" for t, _ in self.slots()) and (shape[1] % 4 or shape[2] % 4):
            raise ValueError(f"data.input_shape {shape}: M-Fed's dense decoders need a height and width that are "
                             "multiples of 4")
        if cfg.model.arch not in ("cnn", "mlp"):
            raise ValueError(f"M-Fed has no encoder for model.arch = {cfg.model.arch!r}")

    def model_options(self) -> dict[str, Any]:
        return {"decoders": {mfed_key(t, k): (t, k) for t, k in self.slots()}}

    def split_rules(self) -> SplitRules:
        if self.encoder_scope == "none":  # local-only on the multi-task model: nothing travels
            return SplitRules(personal=ALL)
        return SplitRules(shared=("encoder.*",),
                          personal=ENCODER_BN if self.encoder_bn_stats == "personal" else (),
                          groups={mfed_group(t, k): (f"decoders.{mfed_key(t, k)}.*",) for t, k in self.slots()})
