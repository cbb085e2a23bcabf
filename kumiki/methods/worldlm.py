"""WorldLM's config (spec ``worldlm.md``): federations of federations, personalized key layers."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from kumiki.methods.base import ALL, MethodConfig
from kumiki.split import EVERY_GROUP, SplitRules


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
