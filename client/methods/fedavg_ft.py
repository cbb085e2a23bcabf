"""FedAvg + local fine-tuning (Wang et al. 2019; Yu et al. 2020).

Training is FedAvg's. Before personalized evaluation each site copies the
received global model, fine-tunes the copy for ``ft_epochs`` on its own train
split (all tensors, or the head only) at ``ft_lr``, and evaluates the copy. The
copy is never uploaded and never changes the global trajectory. An unseen site
runs the same procedure from the global model for ``eval.unseen_adapt_epochs``.
"""

from __future__ import annotations

import copy

from torch import nn

from client.methods.base import SiteJob, SiteObjective
from client.methods.fedper import body_modules


class FedAvgFTObjective(SiteObjective):
    def fine_tune(self, sj: SiteJob, epochs: int, tag: str) -> nn.Module:
        tuned = copy.deepcopy(sj.model)
        if epochs > 0:
            params = tuned.head.parameters() if self.cfg.ft_scope == "head" else tuned.parameters()
            frozen = body_modules(tuned) if self.cfg.ft_scope == "head" else []
            sj.trainer.fit(tuned, params, sj.task_loss, epochs=epochs, lr=self.cfg.ft_lr, tag=tag,
                           eval_modules=frozen)
        return tuned

    def personalized_model(self, sj: SiteJob) -> nn.Module:
        return self.fine_tune(sj, self.cfg.ft_epochs, f"ft{sj.job.round}")

    def adapt_unseen(self, sj: SiteJob, epochs: int) -> nn.Module:
        return self.fine_tune(sj, epochs, f"ft{sj.job.round}")
