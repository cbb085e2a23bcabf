"""FedPer site update (Arivazhagan et al., arXiv 1912.00818).

Load the received base (``encoder.*``), keep the site's own head (``head.*``,
personal by the split), train all layers jointly for E epochs, upload the base.
Global / unseen path (no shared head exists): a fresh seeded head fitted for
``new_head_epochs`` on the frozen base, BN statistics frozen, on the site's own train
split (the baselines spec's new-client protocol, also FedRep's).
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn import functional as F

from client.methods.base import SiteJob, SiteObjective
from models import build_model


def fresh_head_on_frozen_body(sj: SiteJob, epochs: int) -> nn.Module:
    """A private copy of the model whose head is re-initialized and fitted with the body frozen."""
    model = copy.deepcopy(sj.model)
    model.head.load_state_dict(build_model(sj.job.model, sj.job.method.variant).head.state_dict())
    model.to(sj.trainer.device)

    def loss(m, x, y):
        m.encoder.eval()  # the body is frozen, its BN statistics too
        return F.cross_entropy(m(x), y)

    if epochs > 0:
        sj.trainer.fit(model, model.head.parameters(), loss, epochs=epochs, tag=f"newhead{sj.job.round}")
    return model


class FedPerObjective(SiteObjective):
    """Training is the base objective's (all layers, CE); only the split differs from FedAvg."""

    def global_model(self, sj: SiteJob) -> nn.Module:
        return fresh_head_on_frozen_body(sj, self.cfg.new_head_epochs)
