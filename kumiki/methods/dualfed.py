"""DualFed's config (spec ``dualfed.md``): the dual model's split, the two stages' knobs."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from kumiki.methods.base import BN_BUFFERS, MethodConfig
from kumiki.split import SplitRules

#: stage B's learning rate under ``stage_b_lr = "auto"`` (without DP): measured on digits, bench/dualfed.py
AUTO_HEAD_LR = 0.1


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
    * ``balanced_head`` (auto = on without DP; ours, issue 25): stage B adds log p_site(y) to the shared
      head's logits in its loss (balanced softmax), so the averaged head is fitted for a uniform label
      prior. On digits (CNN-S, Dirichlet 0.3, 10 rounds) it lifts global 81 -> 95% and unseen zero-shot
      9 -> 28% (bench/dualfed.py). Off under DP-SGD: the prior depends on every example of the site, so
      each example's clipped gradient would depend on the others;
    * ``stage_b_lr`` (auto = max(0.1, ``train.lr``) without DP; ours, issue 25): stage B's learning rate. The shared head
      is a linear softmax on frozen features (convex), re-fitted from the average each round; at the spec's
      lr 0.01 the rows of a class few sites hold move 1/M of a small step per round and stay short, so the
      averaged head never predicts that class: digits' unseen site (76% one digit that is 1.3% of the training
      data) got 34.8% zero-shot against FedAvg's 78.3% while a linear probe fitted centrally on the same
      frozen encoder gets 97.8%. Under DP-SGD auto keeps ``train.lr`` (a larger step also scales the noise).
      Not larger: the personalized prediction sums both heads' logits, and a head grown long drowns the personal
      one (digits MLP, train.lr 0.05: personalized 95.6% at 0.05, 95.4 at 0.1, 94.6 at 0.2, 91.2 at 0.5);
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
    balanced_head: bool | Literal["auto"] = Field(
        "auto", description="stage B's loss on logits + log of the site's label prior (balanced softmax; ours), so a "
                            "label-skewed site does not teach the shared head its prior; auto: on, except under "
                            "privacy.enabled (the prior is a statistic of the whole site); false: the paper's CE")
    stage_b_lr: float | Literal["auto"] = Field(
        "auto", description="stage B's learning rate (ours): the shared head is a linear probe on frozen features "
                            "and learns the classes few sites hold too slowly at the encoder's rate; auto: max(0.1, "
                            "train.lr), except under privacy.enabled (train.lr)")
    stage_b_bn_mode: Literal["train", "eval"] = Field("train", description="encoder BN mode in stage B")
    unseen_bn: Literal["target_reestimate"] = Field(
        "target_reestimate", description="BN statistics of the shared path on unseen sites"
    )

    @model_validator(mode="after")
    def _lambda(self) -> DualFedConfig:
        if self.con_lambda != "auto" and not self.con_lambda >= 0:
            raise ValueError("method.con_lambda must be 'auto' or a number >= 0")
        if self.stage_b_lr != "auto" and not self.stage_b_lr > 0:
            raise ValueError("method.stage_b_lr must be 'auto' or a number > 0")
        return self

    def balanced(self, private: bool) -> bool:
        """Whether stage B uses the balanced loss (``balanced_head``; auto: not under DP-SGD)."""
        return (not private) if self.balanced_head == "auto" else bool(self.balanced_head)

    def head_lr(self, train_lr: float, private: bool) -> float:
        """Stage B's learning rate (``stage_b_lr``; auto: max(0.1, train.lr), or train.lr under DP-SGD)."""
        if self.stage_b_lr == "auto":
            return train_lr if private else max(AUTO_HEAD_LR, train_lr)
        return float(self.stage_b_lr)

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
