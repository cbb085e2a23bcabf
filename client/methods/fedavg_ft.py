"""FedAvg + local fine-tuning (Wang et al. 2019; Yu et al. 2020).

Training is FedAvg's. Before personalized evaluation each site copies the
received global model, fine-tunes the copy for ``ft_epochs`` on its own train
split (all tensors, or the head only) and evaluates the copy. The copy is never
uploaded and never changes the global trajectory.
"""

from __future__ import annotations

import copy

from torch import nn

from client.methods.base import SiteJob, SiteObjective


class FedAvgFTObjective(SiteObjective):
    def personalized_model(self, sj: SiteJob) -> nn.Module:
        tuned = copy.deepcopy(sj.model)
        if self.cfg.ft_epochs == 0:
            return tuned
        params = tuned.head.parameters() if self.cfg.ft_scope == "head" else tuned.parameters()
        sj.trainer.fit(tuned, params, epochs=self.cfg.ft_epochs, lr=self.cfg.ft_lr, tag=f"ft{sj.job.round}")
        return tuned
