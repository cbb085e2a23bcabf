"""FLoRAL's config (spec ``floral.md``): shared base and low-rank adaptors, a private router."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from kumiki.methods.base import BN_BUFFERS, MethodConfig
from kumiki.split import SplitRules


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
    dp_precondition: bool = Field(
        False, description="precondition under DP-SGD too (off: the preconditioner runs after the noise and, while "
                           "B is near 0, scales the noise on A by up to 1/precond_eps; docs/floral.md)")
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
