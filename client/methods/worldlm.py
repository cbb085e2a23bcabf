"""WorldLM site objective (spec ``worldlm.md`` sections 5.2, 7, 8): tau local steps of next-token
cross-entropy on the site's own text, from B of its node and its own K, with the paper's optimizer (AdamW,
fresh every round: ``local_opt_state = reset``), all parameters trained. The site reports the tokens it
trained on (``tokens``: n_c, the weight of its update).

Evaluation: personalized = B + the site's own K; global = B + the node's summary Kbar (sent under
``extra`` as ``kbar/<tensor>``); an unseen site is evaluated zero-shot with B + Kbar of its sub-federation
(the spec's unseen-leaf protocol), then after one round of tau local steps (``unseen_adapted``).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from client.methods.base import SiteJob, SiteObjective
from kumiki.tasks import IGNORE


class LMObjective(SiteObjective):
    """tau local steps (``method.local_steps``; none: ``train.local_epochs`` epochs) of the task's loss."""

    dp_metrics = ("tokens",)  # under DP the planned count (``train``), not the sampled one

    def steps(self, sj: SiteJob) -> tuple[int | None, int | None]:
        """(epochs, max_steps) of one round."""
        tau = self.cfg.local_steps
        if tau is None:
            return None, None
        per_epoch = max(1, math.ceil(sj.data.num_train / sj.trainer.cfg.batch_size))
        return math.ceil(tau / per_epoch), tau

    def train(self, sj: SiteJob, model: nn.Module, tag: str) -> dict[str, float]:
        epochs, max_steps = self.steps(sj)
        dp = sj.trainer.dp
        before = dp.steps if dp is not None else 0
        m = sj.trainer.fit(model, model.parameters(), self.loss(sj), epochs=epochs, max_steps=max_steps, tag=tag)
        y = sj.data.y_train
        scored = float((y != IGNORE).sum()) / max(len(y), 1) if y.ndim == 2 else 1.0
        # under DP the Poisson-sampled count would leave outside epsilon: its expectation (steps x q x N) instead
        examples = m["examples"] if dp is None else (dp.steps - before) * dp.sample_rate * len(y)
        m["tokens"] = examples * scored
        return m

    def fit(self, sj: SiteJob) -> dict[str, float]:
        return self.train(sj, sj.model, f"r{sj.job.round}")

    def adapt_unseen(self, sj: SiteJob, epochs: int) -> nn.Module:
        """One round of local training from what the site was sent (B + Kbar of its sub-federation)."""
        model = copy.deepcopy(sj.model)
        self.train(sj, model, f"adapt{sj.job.round}")
        return model


class WorldLMObjective(LMObjective):
    def global_model(self, sj: SiteJob) -> nn.Module:
        """B + Kbar: the node's consensus key layers (``extra``), in place of the site's own."""
        prefix = self.cfg.kbar_prefix
        kbar = {k[len(prefix):]: v for k, v in (sj.extra or {}).items() if k.startswith(prefix)}
        if not kbar:
            return sj.model
        own = sj.model.state_dict()
        bad = sorted(k for k, v in kbar.items() if k not in own or tuple(v.shape) != tuple(own[k].shape)
                     or (v.is_floating_point() and not torch.isfinite(v).all()))
        if bad:  # a sub-federation may choose its own key layers: any of the model's tensors, with its shape
            raise ValueError(f"the server's key-layer summary does not fit this model: {bad[:3]}")
        model = copy.deepcopy(sj.model)
        model.load_state_dict(kbar, strict=False)
        return model
