"""Local-only: the whole model is personal; the site trains alone, nothing travels.

There is no global path. An unseen site trains its own model from the common
seeded initialization for ``eval.unseen_adapt_epochs`` (Local has no transfer).
"""

from __future__ import annotations

import copy

from torch import nn

from client.methods.base import SiteJob, SiteObjective
from models import build_model


class LocalObjective(SiteObjective):
    has_global = False

    def adapt_unseen(self, sj: SiteJob, epochs: int) -> nn.Module:
        model = copy.deepcopy(sj.model)
        model.load_state_dict(build_model(sj.job.model, sj.job.method).state_dict())
        model.to(sj.trainer.device)
        sj.trainer.fit(model, model.parameters(), sj.task_loss, epochs=epochs, tag=f"local{sj.job.round}")
        return model
